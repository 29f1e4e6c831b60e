"""LR schedules (fastcnf.training.schedules.LRSchedule): documented rates at given steps."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from common import det_cfg  # noqa: E402

from fastcnf.training.schedules import LRSchedule
from fastcnf.training.trainer import Trainer


def test_linear_warmup() -> None:
    s = LRSchedule(base_lr=1e-2, warmup_iterations=4)
    assert [s(i) for i in range(6)] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2])


def test_step_decay_at_iterations() -> None:
    # 002: 1e-2 then 1e-3 (one boundary); 000: 1e-3 and 1e-4 at two boundaries
    s = LRSchedule(base_lr=1e-2, kind="step", decay_at=(400, 125), decay_factor=0.1)
    assert s(0) == pytest.approx(1e-2) and s(124) == pytest.approx(1e-2)
    assert s(125) == pytest.approx(1e-3) and s(399) == pytest.approx(1e-3)
    assert s(400) == pytest.approx(1e-4) and s(10_000) == pytest.approx(1e-4)


def test_warmup_then_decay() -> None:
    s = LRSchedule(base_lr=1e-2, kind="step", warmup_iterations=10, decay_at=(5,), decay_factor=0.5)
    assert s(4) == pytest.approx(1e-2 * 0.5)  # before the boundary, warm-up 5/10
    assert s(5) == pytest.approx(1e-2 * 0.5 * 0.6)  # decayed and warm-up 6/10


def test_cosine() -> None:
    s = LRSchedule(base_lr=1.0, kind="cosine", total_iterations=110, warmup_iterations=10, min_lr=0.1)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)


def test_decay_in_epochs_uses_steps_per_epoch() -> None:
    from fastcnf.config import load_recipe

    cfg = load_recipe("toy-ffjord", ["train.schedule=step", "train.decay_unit=epochs", "train.decay_at=[2,5]"])
    s = LRSchedule.from_config(cfg.train, steps_per_epoch=7, base_lr=1e-2)
    assert s.decay_at == (14, 35)
    assert s(13) == pytest.approx(1e-2) and s(14) == pytest.approx(1e-3) and s(35) == pytest.approx(1e-4)


def test_trainer_uses_scaled_warmed_up_decayed_rate() -> None:
    """The trainer's rate = scaled lr x warm-up x decay (digits: 1797*0.8 examples, epochs of batch 16)."""
    t = Trainer(det_cfg("train.lr=1e-3", "train.lr_scaling=linear", "train.reference_batch_size=8",
                        "train.schedule=step", "train.decay_at=[3]", "train.warmup_iterations=2"),
                "unused", progress=False)
    rates = []
    for i in range(4):
        t.iteration = i
        rates.append(t.set_lr())
    assert rates == pytest.approx([1e-3, 2e-3, 2e-3, 2e-4])
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(2e-4)
