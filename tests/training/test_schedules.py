"""LR schedules and optimiser groups (fastcnf.training.schedules): documented rates at given steps."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from ddp_common import det_cfg  # noqa: E402

from fastcnf.training.schedules import LRSchedule, set_group_lrs  # noqa: E402
from fastcnf.training.trainer import Trainer  # noqa: E402


def test_linear_warmup_reaches_the_base_rate_after_its_iterations() -> None:
    s = LRSchedule(base_lr=1e-2, warmup_iterations=4)
    assert [s(i) for i in range(6)] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2])


def test_step_decay_divides_the_rate_at_each_boundary() -> None:
    # 002: 1e-2 then 1e-3 (one boundary); 000: 1e-3 and 1e-4 at two boundaries
    s = LRSchedule(base_lr=1e-2, kind="step", decay_at=(400, 125), decay_factor=0.1)
    assert s(0) == pytest.approx(1e-2) and s(124) == pytest.approx(1e-2)
    assert s(125) == pytest.approx(1e-3) and s(399) == pytest.approx(1e-3)
    assert s(400) == pytest.approx(1e-4) and s(10_000) == pytest.approx(1e-4)


def test_warmup_and_decay_multiply() -> None:
    s = LRSchedule(base_lr=1e-2, kind="step", warmup_iterations=10, decay_at=(5,), decay_factor=0.5)
    assert s(4) == pytest.approx(1e-2 * 0.5)  # before the boundary, warm-up 5/10
    assert s(5) == pytest.approx(1e-2 * 0.5 * 0.6)  # decayed and warm-up 6/10


def test_cosine_decays_from_the_base_rate_to_min_lr() -> None:
    s = LRSchedule(base_lr=1.0, kind="cosine", total_iterations=110, warmup_iterations=10, min_lr=0.1)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)


def test_decay_in_epochs_is_converted_with_steps_per_epoch() -> None:
    from fastcnf.methods import load_recipe

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
        rates.append(set_group_lrs(t.optimizer, t.schedule(i)))
    assert rates == pytest.approx([1e-3, 2e-3, 2e-3, 2e-4])
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(2e-4)


def test_optimizer_leaves_out_excluded_parameters_and_keeps_unscheduled_group_rates() -> None:
    import torch

    from fastcnf.config import TrainConfig
    from fastcnf.method import Hook
    from fastcnf.training.schedules import build_optimizer

    model = torch.nn.Linear(2, 2)
    extra = torch.nn.Parameter(torch.zeros(1))

    class _Hook(Hook):
        def param_groups(self, trainer):
            return [{"params": [extra], "name": "extra", "lr": 0.5},
                    {"params": [torch.nn.Parameter(torch.zeros(1))], "name": "scaled", "lr_scale": 0.1,
                     "follow_schedule": True}]

    opt = build_optimizer(TrainConfig(lr=1e-3), model, [_Hook()], None, excluded=[model.bias])
    groups = {g["name"]: g for g in opt.param_groups}
    assert [id(p) for p in groups["model"]["params"]] == [id(model.weight)]
    assert set_group_lrs(opt, 2e-3) == 2e-3
    assert groups["model"]["lr"] == pytest.approx(2e-3)
    assert groups["extra"]["lr"] == pytest.approx(0.5)  # its own rate, not the schedule's
    assert groups["scaled"]["lr"] == pytest.approx(2e-4)


def test_fused_adam_step_counts_a_new_version_of_every_weight(tmp_path) -> None:
    """The fused Adam kernel writes the weights without bumping their version; the trainer bumps it, so the
    packed trace kernel (cached on the versions) sees the update, and its step equals the per-tensor loop's."""
    import torch

    from fastcnf.methods import load_recipe

    cfg = load_recipe("toy-ffjord", ["model.hidden_dims=[8,8]", "data.n_test=50", "train.batch_size=16",
                                     "solver.atol=1e-3", "solver.rtol=1e-3", "eval.figures=false", "threads=1"])
    trainer = Trainer(cfg, tmp_path, progress=False)
    assert trainer.optimizer.defaults["fused"]
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    reference = torch.optim.Adam([torch.nn.Parameter(p.detach().clone()) for p in params], lr=cfg.train.lr,
                                 weight_decay=cfg.train.weight_decay, foreach=False)
    before = [p._version for p in params]
    trainer.train_step()
    assert all(p._version > v for p, v in zip(params, before))
    for ref, p in zip(reference.param_groups[0]["params"], params):
        ref.grad = p.grad.clone()
    reference.step()
    for ref, p in zip(reference.param_groups[0]["params"], params):
        torch.testing.assert_close(p.detach(), ref.detach(), atol=1e-7, rtol=1e-6)
