"""The methods whose hooks step tensors outside the main optimiser (or in groups of their own), as
overrides of the deterministic toy configuration of ddp_common.py."""
VARIANTS: dict[str, list[str]] = {
    # TO-FLOW's T, Algorithm 1's order (T steps on eq. 12-13 after the weights) and the simultaneous one
    "toflow_algorithm1": ["endtime.policy=toflow", "endtime.lr=0.05"],
    "toflow_simultaneous": ["endtime.policy=toflow", "endtime.lr=0.05", "endtime.order=simultaneous"],
    # learned tolerance gates (their own Adam, REINFORCE); rk4 ignores the tolerance, so the weights
    # are those of one process on the global batch
    "learned_tolerances": ["tolerances.policy=learned", "tolerances.init_tol=1e-4", "tolerances.gate_lr=0.05"],
    # training by parts: one optimiser group per part, then end-to-end fine-tuning
    "parts": ["model.num_blocks=2", "parts.enabled=true", "parts.boundaries=[1]", "parts.finetune=1"],
}
