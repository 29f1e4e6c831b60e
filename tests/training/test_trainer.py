"""The trainer and its checkpoints (fastcnf.training.trainer, .checkpoint): resume equals an uninterrupted
run, checkpoints are atomic and safe, schedules reach the optimiser, NaN stops cleanly."""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
import torch

from fastcnf.methods import load_recipe
from fastcnf.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fastcnf.training.trainer import Trainer, TrainingDiverged, _all_finite

TINY = [
    "model.hidden_dims=[8,8]", "data.n_test=200", "eval.batch_size=200", "train.batch_size=32",
    "solver.atol=1e-3", "solver.rtol=1e-3", "eval.atol=1e-4", "eval.rtol=1e-4", "eval.figures=false",
]


def tiny_cfg(*extra: str, iterations: int = 6):
    return load_recipe("toy-ffjord", TINY + [f"train.iterations={iterations}", *extra])


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("data", ["8gaussians", "digits", "flow-matching", "weight-average"])
def test_resume_equals_uninterrupted_run(tmp_path: Path, data: str) -> None:
    if data == "flow-matching":  # times, noise and OT pairs are drawn from the checkpointed RNG
        def make(n: int):
            return load_recipe("digits-fm-conditional", [
                f"train.iterations={n}", "model.unet.channels=8", "model.unet.levels=1", "train.batch_size=16",
                "data.n_test=16", "eval.batch_size=16", "eval.atol=1e-2", "eval.rtol=1e-2", "train.checkpoint_every=3",
                "eval.figures=false", "data.n_train=64", "eval.sample_accuracy_per_class=0", "train.warmup_iterations=0",
                "train.schedule=constant"])  # a cosine schedule would depend on the run length
    elif data == "digits":  # a multiscale CNF with Hutchinson noise and dequantisation noise
        def make(n: int):
            return load_recipe("digits-cnf", [
                f"train.iterations={n}", "model.hidden_dims=[4]", "train.batch_size=16", "data.n_test=32",
                "eval.batch_size=32", "solver.atol=1e-2", "solver.rtol=1e-2", "eval.atol=1e-2",
                "eval.rtol=1e-2", "train.checkpoint_every=3", "eval.figures=false", "data.n_train=64"])
    elif data == "weight-average":  # train.ema_decay: the average continues where it stopped
        def make(n: int):
            return tiny_cfg("train.checkpoint_every=3", "train.ema_decay=0.7", iterations=n)
    else:
        def make(n: int):
            return tiny_cfg("train.checkpoint_every=3", iterations=n)
    full = Trainer(make(6), tmp_path / "full", progress=False)
    full.fit()
    # an interrupted run: 3 iterations, then a new process resumes to 6
    part = Trainer(make(3), tmp_path / "part", progress=False)
    part.fit()
    resumed = Trainer(make(6), tmp_path / "part", resume=True, progress=False)
    assert resumed.iteration == 3
    resumed.fit()
    a, b = _weights(full), _weights(resumed)  # the final weights (with train.ema_decay: the average)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=f"parameter {k} differs")
    if data == "weight-average":  # and the trained weights and the average's state in the checkpoints
        sa, sb = (load_checkpoint(t.ckpt_path) for t in (full, resumed))
        assert sa["ema"]["updates"] == sb["ema"]["updates"] == 6
        for k in sa["model"]:  # bit-identical
            assert torch.equal(sa["model"][k], sb["model"][k]), k
        for k in sa["ema"]["average"]:
            assert torch.equal(sa["ema"]["average"][k], sb["ema"]["average"][k]), k
            torch.testing.assert_close(sa["ema"]["average"][k], a[k], atol=0, rtol=0)
    rows = list(csv.DictReader(open(tmp_path / "part" / "log.csv")))
    assert [int(r["iteration"]) for r in rows] == list(range(1, 7))
    full_rows = list(csv.DictReader(open(tmp_path / "full" / "log.csv")))
    assert [float(r["loss"]) for r in rows] == pytest.approx([float(r["loss"]) for r in full_rows], abs=1e-6)


def test_run_directory_holds_config_log_metrics_checkpoint_and_figures(tmp_path: Path) -> None:
    metrics = Trainer(tiny_cfg("eval.figures=true", "eval.n_samples=4", iterations=3), tmp_path,
                      progress=False).fit()
    for name in ("config.yaml", "log.csv", "metrics.json", "checkpoints/last.pt", "model.safetensors",
                 "figures/training_curves.png", "figures/density.png"):
        assert (tmp_path / name).exists(), name
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("test_nll_nats", "test_bits_per_dim", "nfe_forward_mean", "nfe_backward_mean", "iterations",
                "train_seconds", "seed", "eval_tol"):
        assert key in on_disk, key
    assert on_disk["iterations"] == 3 and on_disk["test_bits_per_dim"] is None and on_disk["eval_tol"] == 1e-4
    header = next(csv.reader(open(tmp_path / "log.csv")))
    for col in ("loss", "nll", "nfe_forward", "nfe_backward", "lr", "seconds", "T.cnf0"):
        assert col in header
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert on_disk["nfe_forward_mean"] == pytest.approx(sum(float(r["nfe_forward"]) for r in rows) / 3)
    assert metrics["test_nll_nats"] == pytest.approx(on_disk["test_nll_nats"])


def test_evaluation_is_repeatable_and_does_not_disturb_training_rng(tmp_path: Path) -> None:
    trainer = Trainer(tiny_cfg(iterations=1), tmp_path, progress=False)
    state = torch.get_rng_state()
    m1 = trainer.evaluate()
    assert torch.equal(state, torch.get_rng_state())
    m2 = trainer.evaluate()
    assert m1["test_nll_nats"] == m2["test_nll_nats"]


def test_interrupted_checkpoint_write_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"iteration": 1, "w": torch.ones(3)}, path)

    def boom(obj, fh, *a, **k):
        fh.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint({"iteration": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["iteration"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary left behind


def test_truncated_or_foreign_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"iteration": 1, "w": torch.ones(100)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)
    torch.save({"x": 1}, path)
    with pytest.raises(CheckpointError, match="not a fastcnf checkpoint"):
        load_checkpoint(path)


def test_checkpoint_loading_executes_no_pickle_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    torch.save({"format": "fastcnf-checkpoint-v1", "payload": Evil()}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    trainer = Trainer(tiny_cfg("train.checkpoint_every=2", iterations=4), tmp_path, progress=False)
    original = trainer.task.step

    def poisoned(model, ctx):
        original(model, ctx)
        if trainer.iteration >= 2:
            ctx["loss"] = ctx["loss"] * float("nan")

    trainer.task.step = poisoned
    with pytest.raises(TrainingDiverged, match="iteration 3"):
        trainer.fit()
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_learning_rate_schedule_reaches_the_optimizer(tmp_path: Path) -> None:
    cfg = tiny_cfg("train.schedule=step", "train.decay_at=[2]", "train.decay_factor=0.1",
                   "train.warmup_iterations=2", iterations=4)
    Trainer(cfg, tmp_path, progress=False).fit()
    lrs = [float(r["lr"]) for r in csv.DictReader(open(tmp_path / "log.csv"))]
    assert lrs == pytest.approx([0.5e-3, 1e-3, 1e-4, 1e-4])


def test_from_run_dir_rebuilds_the_run_with_overrides(tmp_path: Path) -> None:
    Trainer(tiny_cfg(iterations=2), tmp_path, progress=False).fit()
    again = Trainer.from_run_dir(tmp_path, ["train.iterations=3"], resume=True, progress=False)
    assert again.iteration == 2 and again.cfg.train.iterations == 3
    again.fit()
    assert len(list(csv.DictReader(open(tmp_path / "log.csv")))) == 3


def test_all_finite_matches_an_element_by_element_check():
    """The trainer's divergence check flattens the tensors per device and dtype; it must agree with
    checking every element of every tensor, whatever the mix of dtypes, shapes and missing gradients."""

    gen = torch.Generator().manual_seed(0)
    for trial in range(60):
        tensors = []
        for _ in range(int(torch.randint(0, 6, (1,), generator=gen))):
            kind = int(torch.randint(0, 4, (1,), generator=gen))
            if kind == 0:
                tensors.append(None)
                continue
            dtype = (torch.float32, torch.float64, torch.float16)[kind - 1]
            shape = tuple(int(s) for s in torch.randint(1, 4, (int(torch.randint(0, 3, (1,), generator=gen)),),
                                                          generator=gen))
            t = torch.randn(shape, generator=gen).to(dtype)
            if float(torch.rand((), generator=gen)) < 0.15:
                t.view(-1)[int(torch.randint(0, t.numel(), (1,), generator=gen))] = (
                    float("nan"), float("inf"), -float("inf"))[trial % 3]
            tensors.append(t.t() if t.dim() == 2 else t)  # non-contiguous views too
        brute = all(math.isfinite(float(v)) for t in tensors if t is not None for v in t.reshape(-1).tolist())
        assert _all_finite(iter(tensors)) == brute, (trial, tensors)
