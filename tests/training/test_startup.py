"""The trainer's gradient-path planning pass and start line (fastcnf.training.startup)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from fastcnf.methods import load_recipe
from fastcnf.training import trainer as trainer_module
from fastcnf.training.startup import start_line
from fastcnf.training.trainer import Trainer


def _cfg(*extra: str):
    return load_recipe("toy-ffjord", ["model.hidden_dims=[8,8]", "model.num_blocks=2", "train.iterations=3",
                                      "train.batch_size=16", "data.n_test=64", "eval.figures=false",
                                      "train.checkpoint_every=0", "threads=1", "solver.atol=1e-3",
                                      "solver.rtol=1e-3", "eval.atol=1e-3", "eval.rtol=1e-3", *extra])


def test_planning_leaves_the_run_unchanged_and_metrics_record_each_blocks_path(tmp_path: Path, monkeypatch):
    """The planning pass restores the batch order and the random streams: the weights after training
    equal a run without it; metrics.json names each block's path and why."""
    planned = Trainer(_cfg("model.divergence=hutchinson"), tmp_path / "a", progress=False)
    planned.fit()
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert set(metrics["gradient_paths"]) == {"cnf0", "cnf1"}
    for record in metrics["gradient_paths"].values():
        assert record["path"] == "direct" and "fits" in record["why"]  # Hutchinson: no fused solve
    assert planned.gradient_paths == metrics["gradient_paths"]
    monkeypatch.setattr(trainer_module, "plan_gradients", lambda trainer: {})
    unplanned = Trainer(_cfg("model.divergence=hutchinson"), tmp_path / "b", progress=False)
    unplanned.fit()
    for (name, a), b in zip(planned.model.state_dict().items(), unplanned.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_start_line_names_recipe_data_parameters_paths_device_threads(tmp_path: Path):
    trainer = Trainer(_cfg("solver.gradient=adjoint"), tmp_path, progress=False)
    paths = trainer_module.plan_gradients(trainer)
    assert {p["path"] for p in paths.values()} == {"adjoint"}
    line = start_line(trainer, paths)
    n_params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    for part in ("recipe toy-ffjord", "data 8gaussians", f"{n_params:,} parameters",
                 "cnf0 adjoint (solver.gradient=adjoint)", "device cpu", f"threads {torch.get_num_threads()}"):
        assert part in line, (part, line)
    assert "\n" not in line
