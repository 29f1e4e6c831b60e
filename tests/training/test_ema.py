"""The moving average of the weights (fastcnf.training.ema, ``train.ema_decay``): the average equals the
closed-form bias-corrected sum of the weights after each step, the trainer tests, validates and exports it
while the checkpoint keeps the trained weights, and 0 turns it off."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fastcnf.config import ConfigError
from fastcnf.evaluation.metrics import evaluate_density
from fastcnf.methods import load_recipe
from fastcnf.training.checkpoint import load_checkpoint
from fastcnf.training.ema import WeightAverage, averaged_weights
from fastcnf.training.trainer import Trainer
from fastcnf.training.validation import final_weights

TINY_FM = ["model.hidden_dims=[8,8]", "data.n_train=500", "data.n_test=100", "eval.batch_size=100",
           "train.batch_size=32", "eval.atol=1e-4", "eval.rtol=1e-4", "eval.figures=false",
           "train.checkpoint_every=0", "threads=1"]


def closed_form(snapshots: list[dict[str, torch.Tensor]], d: float) -> dict[str, torch.Tensor]:
    """sum_s d^(t-s) (1 - d) theta_s / (1 - d^t), in float64, term by term."""
    t = len(snapshots)
    norm = 1.0 - d ** t
    return {k: sum(d ** (t - s) * (1 - d) * snap[k].double() for s, snap in enumerate(snapshots, 1)) / norm
            for k in snapshots[0]}


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.999])
def test_average_equals_the_bias_corrected_sum(decay: float) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    avg = WeightAverage(net, decay)
    snaps = []
    for _ in range(7):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        snaps.append({k: v.detach().clone() for k, v in net.named_parameters()})
        avg.update(net)
        want = closed_form(snaps, decay)
        for k, v in avg.shadow.items():
            torch.testing.assert_close(v.double(), want[k], atol=1e-5, rtol=1e-5)
    assert avg.updates == 7
    # the first average is the first weights exactly: the initial weights carry no weight
    first = WeightAverage(net, decay)
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    with torch.no_grad():
        net[0].weight.add_(1.0)
    first.update(net)
    assert torch.equal(first.shadow["0.weight"], net[0].weight) and not torch.equal(first.shadow["0.weight"], before["0.weight"])


def test_applied_swaps_the_average_in_and_restores_the_trained_weights() -> None:
    net = nn.Linear(2, 1)
    avg = WeightAverage(net, 0.5)
    with torch.no_grad():
        net.weight.fill_(1.0)
    avg.update(net)
    with torch.no_grad():
        net.weight.fill_(4.0)
    avg.update(net)  # (0.5 * 1 + 4) / 1.5 = 3
    with avg.applied(net):
        torch.testing.assert_close(net.weight, torch.full((1, 2), 3.0))
    torch.testing.assert_close(net.weight, torch.full((1, 2), 4.0))
    state = {"model": {k: v.clone() for k, v in net.state_dict().items()}, "ema": avg.state_dict()}
    torch.testing.assert_close(averaged_weights(state)["weight"], torch.full((1, 2), 3.0))
    torch.testing.assert_close(averaged_weights(state)["bias"], avg.shadow["bias"])


def test_decay_zero_is_off_and_out_of_range_is_a_config_error() -> None:
    net = nn.Linear(2, 1)
    avg = WeightAverage(net, 0.0)
    avg.update(net)
    assert not avg.enabled and avg.state_dict() == {} and avg.updates == 0
    assert averaged_weights({"model": net.state_dict(), "ema": {}}) is None
    for bad in ("1.0", "-0.1", "1.5"):
        with pytest.raises(ConfigError, match="train.ema_decay must be in"):
            load_recipe("toy-fm", [f"train.ema_decay={bad}"])


def test_trainer_tests_and_exports_the_average_and_checkpoints_the_trained_weights(tmp_path: Path) -> None:
    decay, n = 0.8, 6
    cfg = load_recipe("toy-fm", TINY_FM + [f"train.iterations={n}", f"train.ema_decay={decay}"])
    trainer = Trainer(cfg, tmp_path, progress=False)
    snaps: list[dict[str, torch.Tensor]] = []
    step = trainer.train_step

    def recording_step():
        ctx = step()
        snaps.append({k: v.detach().clone() for k, v in trainer.model.named_parameters()})
        return ctx

    trainer.train_step = recording_step
    metrics = trainer.fit()
    want = closed_form(snaps, decay)
    final = dict(trainer.model.named_parameters())
    exported = load_file(tmp_path / "model.safetensors")
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    for k in want:
        torch.testing.assert_close(final[k].detach().double(), want[k], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(exported[k], final[k].detach())
        torch.testing.assert_close(final_weights(state)[k], final[k].detach())
        assert torch.equal(state["model"][k], snaps[-1][k])  # the trained weights, for resuming
    assert any(not torch.equal(state["model"][k], final[k]) for k in want)  # the average is not the last step
    # the test NLL in metrics.json is the average's
    nll = evaluate_density(trainer.model, trainer.bundle, cfg.eval)["test_nll_nats"]
    assert json.loads((tmp_path / "metrics.json").read_text())["test_nll_nats"] == pytest.approx(nll, abs=1e-6)
    assert metrics["test_nll_nats"] == pytest.approx(nll, abs=1e-6)


def test_validation_scores_and_keeps_the_average(tmp_path: Path) -> None:
    cfg = load_recipe("toy-fm", TINY_FM + ["train.iterations=6", "train.ema_decay=0.8", "data.val_fraction=0.2",
                                            "train.val_every=3"])
    trainer = Trainer(cfg, tmp_path, progress=False)
    averages: dict[int, dict[str, torch.Tensor]] = {}
    step = trainer.train_step

    def recording_step():
        ctx = step()
        averages[trainer.iteration + 1] = {k: v.clone() for k, v in trainer.ema.shadow.items()}
        return ctx

    trainer.train_step = recording_step
    metrics = trainer.fit()
    best = metrics["best_iteration"]
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    for k, v in averages[best].items():  # the kept (and final) weights are the average at the best validation
        assert torch.equal(state["validation"]["best_model"][k], v)
        assert torch.equal(dict(trainer.model.named_parameters())[k].detach(), v)
    val = evaluate_density(trainer.model, trainer.val_task.bundle, cfg.eval)["test_nll_nats"]
    assert metrics["best_val_nll_nats"] == pytest.approx(val, abs=1e-6)
