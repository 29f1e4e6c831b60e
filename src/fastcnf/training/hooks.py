"""Hooks: how features plug into the one training loop.

A feature (conditioning loss, learned tolerances, learned end time, parts, ...) is a
:class:`Hook`. The trainer calls every hook at fixed points of each step; a hook that needs
nothing at a point simply inherits the no-op. The features a trainer may use are listed in
:data:`fastcnf.training.features.FEATURES`. Hooks see the trainer through the small
:class:`TrainerView` protocol.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from fastcnf.config import Config
from fastcnf.data.base import DataBundle

__all__ = ["Hook", "StepContext", "TrainerView"]


class TrainerView(Protocol):
    """What a hook may read from the trainer."""

    cfg: Config
    model: nn.Module
    bundle: DataBundle
    device: torch.device
    dtype: torch.dtype
    out_dir: Path
    iteration: int
    steps_per_epoch: int


class StepContext(dict):
    """What one training step produced, shared by the task and the hooks: ``x``, ``y``, ``z``,
    ``logdet``, ``log_prob``, ``nll``, ``loss`` (Tensors) and anything a hook adds."""


class Hook:
    """No-op base class; override what the feature needs.

    Order in a step: ``before_step`` -> forward (task) -> ``loss_terms`` -> backward ->
    ``after_backward`` -> optimiser step -> ``after_step``.
    """

    name = "hook"

    def setup(self, trainer: TrainerView) -> None:
        """Called once after the model and data exist and before the optimiser is built."""

    def param_groups(self, trainer: TrainerView) -> list[dict]:
        """Extra optimiser parameter groups this hook trains with the main optimiser."""
        return []

    def excluded_parameters(self, trainer: TrainerView) -> list[Tensor]:
        """Model parameters the main optimiser must not train (e.g. T under TO-FLOW)."""
        return []

    def before_step(self, trainer: TrainerView, ctx: StepContext) -> None:
        """Before the forward pass (sample a tolerance, an end time, choose a part ...)."""

    def loss_terms(self, trainer: TrainerView, ctx: StepContext) -> dict[str, Tensor]:
        """Extra loss terms, added to the loss and logged under their names."""
        return {}

    def after_backward(self, trainer: TrainerView, ctx: StepContext) -> None:
        """After ``loss.backward()``, before the optimiser step (NFE of both passes known)."""

    def after_step(self, trainer: TrainerView, ctx: StepContext) -> None:
        """After the optimiser step (coordinate-descent steps, clipping ...)."""

    def log_columns(self, trainer: TrainerView) -> list[str]:
        """Names of the extra log.csv columns this hook fills in :meth:`log_values`."""
        return []

    def log_values(self, trainer: TrainerView, ctx: StepContext) -> dict[str, Any]:
        return {}

    def eval_metrics(self, trainer: TrainerView) -> dict[str, Any]:
        """Extra entries of metrics.json, after an evaluation on the test split."""
        return {}

    def figures(self, trainer: TrainerView, fig_dir) -> None:
        """Write the feature's figures."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
