"""Evaluation metrics on the test split: NLL (nats per example), bits/dim, NFE.

Evaluation runs in eval mode, so each CNF block solves at its evaluation tolerance
(``eval.atol``/``eval.rtol``, 1e-5 by default as in 002 §4.2), with fixed dequantisation and
Hutchinson noise (``eval.seed``), so re-evaluating a run gives the same numbers.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from fastcnf.models.flow_model import bits_per_dim_from_log_prob
from fastcnf.training.hooks import StepContext

__all__ = ["evaluate_density", "fork_rng"]


class fork_rng:
    """Run a block with the global torch RNG seeded, restoring the training RNG afterwards
    (evaluation must not perturb training: resumed runs equal uninterrupted ones)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self):
        self.state = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        torch.manual_seed(self.seed)
        return self

    def __exit__(self, *exc):
        torch.set_rng_state(self.state)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        return False


@torch.no_grad()
def evaluate_density(trainer, hooks) -> dict[str, Any]:
    """Test NLL and bits/dim of ``trainer.model`` with the hooks' extra metrics."""
    cfg, bundle, model, task = trainer.cfg, trainer.bundle, trainer.model, trainer.task
    split = bundle.test
    n = len(split) if cfg.eval.max_examples <= 0 else min(cfg.eval.max_examples, len(split))
    was_training = model.training
    model.eval()
    for h in hooks:
        h.eval_begin(trainer)
    total_lp, count, nfe_f, batches = 0.0, 0, 0, 0
    with fork_rng(cfg.eval.seed):
        gen = torch.Generator(device="cpu").manual_seed(cfg.eval.seed)
        for start in range(0, n, cfg.eval.batch_size):
            xb = split.x[start:start + cfg.eval.batch_size]
            yb = None if split.y is None else split.y[start:start + cfg.eval.batch_size]
            x, y = task.prepare(xb, yb, generator=gen)
            x = x.to(trainer.device, trainer.dtype)
            y = None if y is None else y.to(trainer.device)
            ctx = StepContext(x=x, y=y)
            task.step(model, ctx)
            total_lp += float(ctx["log_prob"].double().sum())
            count += x.shape[0]
            nfe_f += model.nfe_last()[0]
            batches += 1
            for h in hooks:
                h.eval_batch(trainer, ctx)
    model.train(was_training)
    mean_lp = total_lp / max(count, 1)
    metrics: dict[str, Any] = {
        "test_nll_nats": -mean_lp,
        "test_bits_per_dim": (float(bits_per_dim_from_log_prob(torch.tensor(mean_lp), bundle.dim, bundle.levels))
                              if bundle.is_image else None),
        "test_examples": count,
        "eval_nfe_forward": nfe_f / max(batches, 1),
        "eval_tol": cfg.eval.atol,
    }
    if not math.isfinite(metrics["test_nll_nats"]):
        metrics["test_nll_nats"] = None
    for h in hooks:
        metrics.update(h.eval_metrics(trainer))
    return metrics
