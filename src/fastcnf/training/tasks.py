"""Tasks: what a model is trained to do. The trainer's loop is the same for all of them.

* :class:`DensityTask` — normalizing flows (CNF, multiscale CNF, Glow): maximum likelihood;
  the loss is the mean NLL in nats (vectors) or bits/dim (images, as FFJORD trains).

A task builds the model, turns a raw batch into model input, computes the loss of a step into
a :class:`~fastcnf.training.hooks.StepContext`, evaluates on the test split and draws figures.
Other model families (e.g. LatentODE) register their own task in :data:`TASKS`.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from fastcnf.data.base import DataBundle, dequantize
from fastcnf.models.flow_model import FlowModel, bits_per_dim_from_log_prob
from fastcnf.training.hooks import StepContext

__all__ = ["Task", "DensityTask", "TASKS", "make_task"]


class Task:
    """Interface of a task (see the module docstring)."""

    name = "task"

    def __init__(self, cfg, bundle: DataBundle) -> None:
        self.cfg = cfg
        self.bundle = bundle

    def build_model(self) -> torch.nn.Module:  # pragma: no cover - interface
        raise NotImplementedError

    def prepare(self, x: Tensor, y: Tensor | None, generator: torch.Generator | None = None):
        return x, y

    def step(self, model, ctx: StepContext) -> None:  # pragma: no cover - interface
        """Fill ``ctx`` with at least ``loss`` (scalar) and ``nll``."""
        raise NotImplementedError

    def evaluate(self, trainer, hooks) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def figures(self, trainer, fig_dir) -> None:
        pass


class DensityTask(Task):
    """Maximum likelihood for flows: ``loss = -mean log p(x | y)`` (nats) or bits/dim (images)."""

    name = "density"

    def build_model(self) -> FlowModel:
        from fastcnf.models.builder import build_model

        return build_model(self.cfg, self.bundle)

    def prepare(self, x, y, generator=None):
        b = self.bundle
        if b.is_image:
            x = dequantize(x, b.levels, generator=generator)
        return x, y

    def step(self, model: FlowModel, ctx: StepContext) -> None:
        x, y = ctx["x"], ctx["y"]
        # A hook may replace the forward pass (training by parts, 003): ``ctx["objective"](model, x)``
        # returns the ``(z, logdet)`` of a truncated flow with z of the full latent size; the loss
        # below is then the truncated objective, in bits/dim normalised by the FULL data dimension.
        objective = ctx.get("objective")
        z, logdet = objective(model, x) if objective is not None else model(x)
        labels = model.check_label(y, x.shape[0]) if y is not None else None
        log_prob = model.prior.log_prob(z, labels) + logdet
        ctx.update(z=z, logdet=logdet, log_prob=log_prob, labels=labels)
        ctx["nll"] = -log_prob.mean()
        if self.bundle.is_image:
            ctx["bits_per_dim"] = bits_per_dim_from_log_prob(log_prob, self.bundle.dim, self.bundle.levels).mean()
            ctx["loss"] = ctx["bits_per_dim"]
        else:
            ctx["loss"] = ctx["nll"]

    @torch.no_grad()
    def evaluate(self, trainer, hooks) -> dict[str, Any]:
        from fastcnf.evaluation.metrics import evaluate_density

        return evaluate_density(trainer, hooks)

    def figures(self, trainer, fig_dir) -> None:
        from fastcnf.evaluation import plots

        plots.density_figures(trainer, fig_dir)


#: task name -> class; the trainer picks ``TASKS[cfg.task]`` (default ``density``)
TASKS: dict[str, Callable[..., Task]] = {"density": DensityTask}


def make_task(cfg, bundle: DataBundle) -> Task:
    name = getattr(cfg, "task", "density")
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[name](cfg, bundle)
