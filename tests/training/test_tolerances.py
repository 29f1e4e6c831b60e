"""The tolerance feature in the training loop (fastcnf.training.tolerances; Nguyen et al. 2019,
"InfoCNF", §3): per-block tolerances are logged, the learned gates are trained by their own
optimiser end to end, and under data parallelism (gloo, 2 processes) the gates start from rank 0's
and their REINFORCE gradients are averaged, so every rank keeps the same gates although each rank
samples its own tolerances and sees its own shard's NFE."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from ddp_common import launch_two_ranks  # noqa: E402

from fastcnf.config import load_recipe  # noqa: E402
from fastcnf.training.tolerances import LearnedToleranceHook, StaticToleranceHook  # noqa: E402
from fastcnf.training.trainer import Trainer  # noqa: E402

WORKER = Path(__file__).parent / "workers" / "tolerance_worker.py"


def test_per_block_hook_logs_each_blocks_training_tolerance(tmp_path):
    cfg = load_recipe("toy-ffjord", ["model.num_blocks=2", "model.hidden_dims=[8]", "tolerances.policy=per_block",
                                     "tolerances.atol=[1e-2, 1e-4]", "train.iterations=2", "train.batch_size=16",
                                     "data.n_test=32", "train.checkpoint_every=0", "eval.figures=false", "threads=1"])
    trainer = Trainer(cfg, tmp_path, progress=False)
    hook = next(h for h in trainer.hooks if isinstance(h, StaticToleranceHook))
    assert hook.log_columns(trainer) == ["tol.cnf0", "tol.cnf1"]
    trainer.fit()
    with open(tmp_path / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(float(r["tol.cnf0"]), float(r["tol.cnf1"])) for r in rows] == [(1e-2, 1e-4)] * 2


def test_learned_tolerance_hook_end_to_end_in_the_trainer(tmp_path):
    cfg = load_recipe("mix1d-infocnf", [
        "train.iterations=6", "model.hidden_dims=[8]", "data.n_train=500", "data.n_test=300",
        "train.batch_size=64", "train.checkpoint_every=0", "tolerances.gate_lr=0.2",
        "tolerances.include_loss=false", "tolerances.alpha=1.0", "tolerances.init_tol=1e-6"])
    trainer = Trainer(cfg, tmp_path, progress=False)
    hook = next(h for h in trainer.hooks if isinstance(h, LearnedToleranceHook))
    before = [p.detach().clone() for p in hook.policy.parameters()]
    metrics = trainer.fit()
    after = list(hook.policy.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "the gates were not updated"
    assert not any(id(p) in {id(q) for g in trainer.optimizer.param_groups for q in g["params"]} for p in after)
    with open(tmp_path / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    tols = [float(r["tol.cnf0"]) for r in rows] + [float(r["tol.cnf1"]) for r in rows]
    assert len(set(tols)) > 2 and all(0 < t < 1 for t in tols)
    assert set(metrics["tolerances"]) == {"cnf0", "cnf1"} and metrics["eval_tol"] == 1e-5
    assert (tmp_path / "figures" / "tolerances.png").exists()
    assert (tmp_path / "figures" / "tolerance_distribution.png").exists()
    # the gates belong to the model (its state dict), not to the main optimiser
    assert any(k.startswith("tolerance_policy.gates.") for k in trainer.model.state_dict())
    # no pinned solver leaks out of training (sampling uses the evaluation tolerance)
    assert all(b.pinned_solver is None for b in trainer.model.cnf_blocks())


def test_learned_tolerance_gates_stay_identical_on_two_ranks(tmp_path) -> None:
    launch_two_ranks(WORKER, [str(tmp_path), "3"])
    r0, r1 = (torch.load(tmp_path / f"gates{r}.pt", weights_only=False) for r in range(2))
    assert r0["agree"] and r1["agree"]
    assert r0["gates"].keys() == r1["gates"].keys()
    for k in r0["gates"]:
        torch.testing.assert_close(r0["gates"][k], r1["gates"][k], atol=0, rtol=0, msg=f"gate {k} differs")
    # the gates did learn (they moved away from their initial head bias)
    bias = [v for k, v in r0["gates"].items() if k.endswith("head.bias")]
    assert bias and any(abs(float(b[0]) + 4.0) > 1e-6 for b in bias)
