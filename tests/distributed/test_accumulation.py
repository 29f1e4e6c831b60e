"""Gradient accumulation gives exactly the full-batch gradient; LR scaling is reported."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import det_cfg  # noqa: E402

from fastcnf.config import ConfigError
from fastcnf.training.distributed import merge_contexts, scaled_lr, split_micro
from fastcnf.training.hooks import StepContext
from fastcnf.training.trainer import Trainer


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


def test_split_and_merge_weights() -> None:
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
def test_lr_scaling_rules(rule: str, expected: float) -> None:
    assert scaled_lr(1e-3, 8000, 800, rule) == pytest.approx(expected)
    assert scaled_lr(1e-3, 8000, 0, rule) == pytest.approx(1e-3)  # reference 0: the batch itself


def test_effective_values_reported(tmp_path: Path) -> None:
    cfg = det_cfg("train.iterations=2", "train.lr=1e-3", "train.lr_scaling=linear", "train.reference_batch_size=4",
                  "train.accumulation_steps=2", "train.warmup_iterations=0", "eval.atol=1e-3", "eval.rtol=1e-3")
    t = Trainer(cfg, tmp_path, progress=False)
    ctx = t.train_step()
    assert ctx["lr"] == pytest.approx(4e-3)
    t.iteration = 2
    m = t.large_batch_summary({"train_seconds": 2.0})
    assert m["effective_lr"] == pytest.approx(4e-3) and m["base_lr"] == pytest.approx(1e-3)
    assert (m["global_batch_size"], m["micro_batch_size"], m["world_size"]) == (16, 8, 1)
    assert m["examples_per_second"] == pytest.approx(16.0)


def test_indivisible_batch_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="divisible"):
        Trainer(det_cfg("train.accumulation_steps=3"), "unused", progress=False)
    with pytest.raises(ConfigError, match="lr_scaling"):
        Trainer(det_cfg("train.lr_scaling=cubic"), "unused", progress=False)
