"""Shared tiny configuration of the distributed tests: deterministic (exact trace, fixed-step rk4,
float64, toy sampler), so W processes must reproduce one process on the global batch."""
from __future__ import annotations

import torch

from fastcnf.config import load_recipe

DETERMINISTIC = [
    "dtype=float64", "model.hidden_dims=[8,8]", "model.divergence=exact", "solver.method=rk4",
    "solver.step_size=0.25", "train.batch_size=16", "train.lr=1e-2", "train.checkpoint_every=0",
    "data.n_test=64", "eval.batch_size=64", "threads=1",
]


def det_cfg(*extra: str):
    return load_recipe("toy-ffjord", DETERMINISTIC + list(extra))


def run_steps(trainer, n: int) -> list[float]:
    """``n`` optimiser steps without fit()'s evaluation and files; returns the logged losses."""
    losses = []
    for _ in range(n):
        ctx = trainer.train_step()
        trainer.iteration += 1
        losses.append(trainer._row(ctx, 0.0)["loss"])
    return losses


def params(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
