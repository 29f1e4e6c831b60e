"""Tasks: what a model is trained to do. The trainer's loop is the same for all of them.

A task builds the model, turns a raw batch into model input, computes the loss of a step into a
:class:`~fastcnf.method.StepContext`, evaluates on the test split and draws its figures.
:class:`DensityTask` trains normalizing flows (CNFs, multiscale CNFs, Glow) by ``train.objective``
(:data:`fastcnf.methods.OBJECTIVES`); the LatentODE task is
:class:`fastcnf.training.latent_ode_task.LatentODETask`. The table of tasks is :data:`fastcnf.training.trainer.TASKS`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastcnf.config import Config
from fastcnf.data.base import DataBundle, dequantize
from fastcnf.evaluation.metrics import evaluate_density, fork_rng
from fastcnf.evaluation.plots import class_conditional_samples, density_figures
from fastcnf.method import StepContext
from fastcnf.methods import OBJECTIVES, build_model
from fastcnf.models.flow_model import FlowModel, bits_per_dim_from_log_prob

__all__ = ["Task", "DensityTask"]


class Task:
    """Interface of a task (see the module docstring)."""

    name = "task"

    def __init__(self, cfg: Config, bundle: DataBundle) -> None:
        self.cfg = cfg
        self.bundle = bundle

    def build_model(self) -> nn.Module:  # pragma: no cover - interface
        raise NotImplementedError

    def prepare(self, x: Tensor, y: Tensor | None, generator: torch.Generator | None = None):
        """A raw training batch -> model input (e.g. dequantised images)."""
        return x, y

    def step(self, model: nn.Module, ctx: StepContext) -> None:  # pragma: no cover - interface
        """Fill ``ctx`` with at least ``loss`` (scalar) and ``nll``."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, device, dtype) -> dict[str, Any]:  # pragma: no cover - interface
        """Test-split metrics of ``model``."""
        raise NotImplementedError

    def figures(self, model: nn.Module, fig_dir: Path, device, dtype) -> None:
        """The task's figures."""


class DensityTask(Task):
    """Flows trained by ``train.objective``: maximum likelihood (the loss is the mean NLL in nats on
    vectors, bits/dim on images, as FFJORD trains) or a method's objective."""

    name = "density"

    def __init__(self, cfg: Config, bundle: DataBundle) -> None:
        super().__init__(cfg, bundle)
        self.objective = OBJECTIVES[cfg.train.objective](cfg, bundle)

    def build_model(self) -> FlowModel:
        return build_model(self.cfg, self.bundle)

    def prepare(self, x, y, generator=None):
        if self.bundle.is_image:
            x = dequantize(x, self.bundle.levels, generator=generator)
        return x, y

    def step(self, model: FlowModel, ctx: StepContext) -> None:
        self.objective(model, ctx)
        if self.bundle.is_image and "log_prob" in ctx:
            ctx["bits_per_dim"] = bits_per_dim_from_log_prob(ctx["log_prob"], self.bundle.dim, self.bundle.levels).mean()
            if self.objective.computes_latent:  # maximum likelihood: FFJORD trains on bits/dim
                ctx["loss"] = ctx["bits_per_dim"]

    def evaluate(self, model: FlowModel, device, dtype) -> dict[str, Any]:
        return evaluate_density(model, self.bundle, self.cfg.eval, device, dtype)

    def figures(self, model: FlowModel, fig_dir: Path, device, dtype) -> None:
        density_figures(model, self.bundle, fig_dir, self.cfg.eval.n_samples, self.cfg.recipe, device, dtype)
        if getattr(model.prior, "conditional", False):
            with fork_rng(self.cfg.eval.seed):
                class_conditional_samples(model, self.bundle, fig_dir, self.cfg.eval.n_samples, self.cfg.recipe)

