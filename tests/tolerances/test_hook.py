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

sys.path.insert(0, str(Path(__file__).parents[1] / "training" / "workers"))
from ddp_common import launch_two_ranks  # noqa: E402

from fastcnf.methods import load_recipe  # noqa: E402
from fastcnf.tolerances.hook import LearnedToleranceHook, StaticToleranceHook  # noqa: E402
from fastcnf.training.trainer import Trainer  # noqa: E402

WORKER = Path(__file__).parents[1] / "training" / "workers" / "tolerance_worker.py"


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


def _mix1d(tmp_path, extra=()):
    cfg = load_recipe("mix1d-infocnf", [
        "model.hidden_dims=[8]", "data.n_train=256", "data.n_test=64", "train.batch_size=64",
        "train.checkpoint_every=0", "eval.figures=false", "threads=1", *extra])
    return Trainer(cfg, tmp_path, progress=False)


def test_accumulated_micro_batches_share_one_tolerance_per_step(tmp_path):
    """InfoCNF App. D: one tolerance per batch. With 4 micro-batches every block samples once per
    step (one REINFORCE record), solves all 4 micro-batches at it, and is rewarded with the NFE per
    micro-batch (the step's total / 4)."""
    trainer = _mix1d(tmp_path, ["train.accumulation_steps=4", "train.iterations=1"])
    hook = next(h for h in trainer.hooks if isinstance(h, LearnedToleranceHook))
    seen: list[tuple[int, float]] = []
    policy = hook.policy
    choose = policy.choose

    def spy(index, block, x):
        solver = choose(index, block, x)
        if block.training:
            seen.append((index, solver.atol))
        return solver

    policy.choose = spy
    records: list = []
    original = hook.after_backward

    def capture(tr, ctx):
        records.extend(policy.records)
        original(tr, ctx)

    hook.after_backward = capture
    trainer.train_step()
    assert len(seen) == 8  # 2 blocks x 4 micro-batches
    assert [r[0] for r in records] == [0, 1]  # one sample (and one log-probability) per block
    for i, _, tol, *_ in records:
        assert {t for j, t in seen if j == i} == {tol}


def test_partial_passes_use_a_baseline_from_past_steps_only():
    """Training by parts runs some blocks: the first step of a part has no baseline yet
    (advantage = return, the unbiased zero baseline), later steps use the previous returns."""
    from fastcnf.tolerances.reinforce import ReturnBaseline

    cfg = load_recipe("mix1d-infocnf", ["tolerances.baseline_momentum=0.5", "tolerances.loss_baseline_momentum=0.5"])
    hook = LearnedToleranceHook(cfg)
    base = hook.partial_baselines.setdefault("1", ReturnBaseline(*hook.momenta))
    first = base(2.0, torch.tensor([-10.0], dtype=torch.float64))
    assert float(first) == -12.0  # first step: the return itself, advantage 0 (no gradient)
    for current in (-20.0, -500.0):  # the baseline does not depend on the current return
        probe = ReturnBaseline(*hook.momenta)
        probe.load_state_dict(base.state_dict())
        assert float(probe(1.0, torch.tensor([current], dtype=torch.float64))) == -12.0


def test_stacks_layout_gives_the_first_block_of_each_scale_its_own_tolerance():
    from fastcnf.data.base import DataBundle, DataSplit
    from fastcnf.methods import build_model

    x, y = torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.arange(4)
    bundle = DataBundle(name="fake", train=DataSplit(x, y), test=DataSplit(x, y), shape=(1, 28, 28), num_classes=10,
                        levels=256, split="fake")
    model = build_model(load_recipe("mnist-infocnf-large"), bundle)
    tols = {b.name: b.solver.atol for b in model.cnf_blocks()}
    assert len(tols) == 10
    assert {n: t for n, t in tols.items() if t == 1e-5} == {f"scale{i}.cnf0": 1e-5 for i in range(3)}
    assert all(t == 1e-4 for n, t in tols.items() if not n.endswith(".cnf0"))
