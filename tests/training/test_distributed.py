"""Large batches and data parallelism (fastcnf.training.distributed): gradient accumulation gives
exactly the full-batch gradient, LR scaling is reported, and 2 processes (torch.distributed, gloo on
CPU) on halves of each global batch reproduce one process on the whole batch; a resumed 2-process run
equals an uninterrupted one."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from ddp_common import det_cfg, launch_two_ranks, params, run_steps  # noqa: E402

from fastcnf.config import ConfigError  # noqa: E402
from fastcnf.training import distributed as ddp  # noqa: E402
from fastcnf.training.accumulation import merge_contexts, split_micro  # noqa: E402
from fastcnf.training.schedules import large_batch_summary, scaled_lr  # noqa: E402
from fastcnf.method import StepContext  # noqa: E402
from fastcnf.training.trainer import Trainer  # noqa: E402

STEPS = 4
WORKER = Path(__file__).parent / "workers" / "ddp_worker.py"

def _grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("steps", [2, 4])
def test_accumulated_gradient_equals_full_batch_gradient(steps: int) -> None:
    full = Trainer(det_cfg("train.iterations=1"), "unused", progress=False)
    acc = Trainer(det_cfg("train.iterations=1", f"train.accumulation_steps={steps}"), "unused", progress=False)
    cf, ca = full.train_step(), acc.train_step()
    gf, ga = _grads(full), _grads(acc)
    assert gf and gf.keys() == ga.keys()
    for k in gf:
        torch.testing.assert_close(ga[k], gf[k], atol=1e-6, rtol=0, msg=f"gradient of {k}")
        torch.testing.assert_close(ga[k], gf[k], atol=1e-12, rtol=1e-9)  # float64: rounding only
    # the merged step context is the full batch's: mean loss, per-example log p concatenated
    assert float(ca["loss"]) == pytest.approx(float(cf["loss"].detach()), abs=1e-12)
    torch.testing.assert_close(ca["log_prob"], cf["log_prob"].detach(), atol=1e-12, rtol=0)


def test_accumulated_gradient_with_regularizer_and_clipping() -> None:
    """Regularisers are batch means too; clipping acts on the accumulated (full) gradient."""
    extra = ["model.kinetic_weight=0.1", "train.grad_clip=0.05"]
    full = Trainer(det_cfg("train.iterations=1", *extra), "unused", progress=False)
    acc = Trainer(det_cfg("train.iterations=1", "train.accumulation_steps=4", *extra), "unused", progress=False)
    full.train_step(), acc.train_step()
    for (n, a), (_, b) in zip(full.model.named_parameters(), acc.model.named_parameters()):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=0, msg=f"parameter {n} after a clipped step")


def test_micro_batches_carry_their_share_and_merge_back_to_the_batch() -> None:
    x = torch.arange(12.0).reshape(6, 2)
    ctx = StepContext(x=x, y=torch.arange(6), flag="shared")
    micros = split_micro(ctx, 3)
    assert [w for w, _ in micros] == [pytest.approx(1 / 3)] * 3
    assert all(m["flag"] == "shared" for _, m in micros)
    for _, m in micros:
        m["loss"] = m["x"].sum(1).mean()
        m["log_prob"] = m["x"].sum(1)
    merge_contexts(ctx, micros)
    assert float(ctx["loss"]) == pytest.approx(float(x.sum(1).mean()))
    torch.testing.assert_close(ctx["log_prob"], x.sum(1))


@pytest.mark.parametrize("rule,expected", [("none", 1e-3), ("linear", 1e-2), ("sqrt", 1e-3 * math.sqrt(10))])
def test_lr_scaling_follows_the_batch_ratio_rule(rule: str, expected: float) -> None:
    assert scaled_lr(1e-3, 8000, 800, rule) == pytest.approx(expected)
    assert scaled_lr(1e-3, 8000, 0, rule) == pytest.approx(1e-3)  # reference 0: the batch itself


def test_effective_lr_and_batch_sizes_are_reported(tmp_path: Path) -> None:
    cfg = det_cfg("train.iterations=2", "train.lr=1e-3", "train.lr_scaling=linear", "train.reference_batch_size=4",
                  "train.accumulation_steps=2", "train.warmup_iterations=0", "eval.atol=1e-3", "eval.rtol=1e-3")
    t = Trainer(cfg, tmp_path, progress=False)
    ctx = t.train_step()
    assert ctx["lr"] == pytest.approx(4e-3)
    m = large_batch_summary(t.cfg, t.dist.world_size, t.base_lr, 2, 2.0)
    assert m["effective_lr"] == pytest.approx(4e-3) and m["base_lr"] == pytest.approx(1e-3)
    assert (m["global_batch_size"], m["micro_batch_size"], m["world_size"]) == (16, 8, 1)
    assert m["examples_per_second"] == pytest.approx(16.0)


def test_indivisible_batch_and_unknown_scaling_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="divisible"):
        Trainer(det_cfg("train.accumulation_steps=3"), "unused", progress=False)
    with pytest.raises(ConfigError, match="lr_scaling"):
        Trainer(det_cfg("train.lr_scaling=cubic"), "unused", progress=False)



@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """Launch the worker as 2 ranks with torchrun's environment (gloo, 127.0.0.1, free port)."""
    out = tmp_path_factory.mktemp("ddp")
    launch_two_ranks(WORKER, [str(out), str(STEPS)])
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _assert_same(a: dict, b: dict, atol: float = 1e-10) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=f"parameter {k} differs")


def test_two_ranks_equal_one_process_on_the_global_batch(two_ranks) -> None:
    r0, r1 = two_ranks
    assert (r0["world"], r1["world"]) == (2, 2)
    assert r0["agree"] and r1["agree"]
    _assert_same(r0["params"], r1["params"], atol=0.0)  # identical on every rank
    single = Trainer(det_cfg(f"train.iterations={STEPS}"), "unused", progress=False)
    losses = run_steps(single, STEPS)
    _assert_same(params(single), r0["params"])
    # logged losses are all-reduced: the global batch's mean loss
    assert r0["losses"] == pytest.approx(losses, abs=1e-10)
    assert r1["losses"] == pytest.approx(losses, abs=1e-10)


def test_resumed_two_rank_run_equals_uninterrupted(two_ranks) -> None:
    for r in two_ranks:
        _assert_same(r["resumed"], r["params"], atol=0.0)


def test_two_ranks_with_accumulation_equal_one_process(two_ranks) -> None:
    single = Trainer(det_cfg(f"train.iterations={STEPS}"), "unused", progress=False)
    run_steps(single, STEPS)
    _assert_same(params(single), two_ranks[0]["accum"])



def test_flow_matching_trains_data_parallel_with_identical_ranks(two_ranks) -> None:
    """Flow matching composes with DDP: gradients are averaged, so both ranks hold the same moving
    weights, and the logged loss is the all-reduced mean (the same number on both ranks)."""
    r0, r1 = two_ranks
    _assert_same(r0["fm_params"], r1["fm_params"], atol=0.0)
    moved = max(float((r0["fm_params"][k] - r0["fm_start"][k]).abs().max()) for k in r0["fm_start"])
    assert moved > 0
    assert r0["fm_losses"] == r1["fm_losses"]
    assert all(math.isfinite(v) for v in r0["fm_losses"])


def test_gradients_are_reduced_in_their_own_dtype(monkeypatch) -> None:
    """sync_gradients sends float32 gradients as float32 (one buffer per dtype, flags included) and
    averages them: with two identical ranks simulated, every gradient is unchanged and a tensor
    without a gradient anywhere keeps grad None."""
    import torch.distributed as dist

    sent = []

    def all_reduce(buf, op=None):
        sent.append(buf.dtype)
        buf.mul_(2)  # two ranks holding the same values

    monkeypatch.setattr(ddp, "_active", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    a = torch.nn.Parameter(torch.randn(3, dtype=torch.float32))
    b = torch.nn.Parameter(torch.randn(2, dtype=torch.float64))
    unused = torch.nn.Parameter(torch.zeros(4, dtype=torch.float32))
    a.grad, b.grad = torch.randn(3, dtype=torch.float32), torch.randn(2, dtype=torch.float64)
    ga, gb = a.grad.clone(), b.grad.clone()
    ddp.sync_gradients([a, b, unused])
    assert sorted(sent, key=str) == [torch.float32, torch.float64]
    assert a.grad.dtype == torch.float32 and torch.equal(a.grad, ga) and torch.equal(b.grad, gb)
    assert unused.grad is None


def test_command_exit_after_the_group_flushes_and_keeps_the_code() -> None:
    """Under torchrun the command passes a barrier and exits without destroying the group: every
    rank's buffered output arrives, the exit code is the command's, nothing after it runs."""
    logs = launch_two_ranks(Path(__file__).parent / "workers" / "exit_worker.py", [])
    assert [log.strip() for log in logs] == ["rank 0 of 2: sum 3", "rank 1 of 2: sum 3"]


def test_exit_process_without_a_group_is_sys_exit() -> None:
    from fastcnf.training.distributed import exit_process, leave_at_exit

    leave_at_exit()  # one process: nothing to leave
    with pytest.raises(SystemExit) as e:
        exit_process(5)
    assert e.value.code == 5
