"""One rank of the learned-tolerance data-parallel test (launched by tests/training/test_tolerances.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from ddp_common import det_cfg, run_steps  # noqa: E402

from fastcnf.training import distributed as ddp  # noqa: E402
from fastcnf.tolerances.hook import LearnedToleranceHook  # noqa: E402
from fastcnf.training.trainer import Trainer  # noqa: E402

# an adaptive solver, so each rank's shard gives its own NFE and so its own REINFORCE gradient
LEARNED = ["solver.method=dopri5", "tolerances.policy=learned", "tolerances.init_tol=1e-4",
           "tolerances.init_std=1.0", "tolerances.gate_lr=0.05", "tolerances.alpha=1.0"]


def main(out: Path, steps: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(1000 + int(__import__("os").environ["RANK"]))  # different samples per rank
    t = Trainer(det_cfg(f"train.iterations={steps}", *LEARNED), out / "run", progress=False)
    hook = next(h for h in t.hooks if isinstance(h, LearnedToleranceHook))
    run_steps(t, steps)
    gates = {k: v.detach().clone() for k, v in hook.policy.state_dict().items()}
    torch.save({"gates": gates, "agree": ddp.parameters_agree(list(hook.policy.parameters())),
                "rank": t.dist.rank}, out / f"gates{t.dist.rank}.pt")
    # the command line's way to end under torchrun: a barrier, then os._exit without the process group's
    # destructors (destroy_process_group at the end let gloo abort a rank now and then)
    ddp.leave_at_exit()
    ddp.exit_process(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
