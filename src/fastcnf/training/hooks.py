"""Hooks: how features plug into the one training loop.

A feature (conditioning loss, learned tolerances, learned end time, parts, ...) is a
:class:`Hook`. The trainer calls every hook at fixed points of each step; a hook that needs
nothing at a point simply inherits the no-op. Features register a builder in
:data:`HOOK_BUILDERS`: ``builder(cfg, trainer) -> Hook | None`` (None when the feature is off).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from fastcnf.training.trainer import Trainer

__all__ = ["Hook", "HOOK_BUILDERS", "StepContext"]


class StepContext(dict):
    """What one training step produced, shared by the task and the hooks: ``x``, ``y``, ``z``,
    ``logdet``, ``log_prob``, ``nll``, ``loss`` (Tensors) and anything a hook adds."""


class Hook:
    """No-op base class; override what the feature needs.

    Order in a step: ``before_step`` -> forward (task) -> ``loss_terms`` -> backward ->
    ``after_backward`` -> optimiser step -> ``after_step``.
    """

    name = "hook"

    def setup(self, trainer: "Trainer") -> None:
        """Called once after the model and data exist and before the optimiser is built."""

    def param_groups(self, trainer: "Trainer") -> list[dict]:
        """Extra optimiser parameter groups this hook trains with the main optimiser."""
        return []

    def excluded_parameters(self, trainer: "Trainer") -> list[Tensor]:
        """Model parameters the main optimiser must not train (e.g. T under TO-FLOW)."""
        return []

    def before_step(self, trainer: "Trainer", ctx: StepContext) -> None:
        """Before the forward pass (sample a tolerance, an end time, choose a part ...)."""

    def loss_terms(self, trainer: "Trainer", ctx: StepContext) -> dict[str, Tensor]:
        """Extra loss terms, added to the loss and logged under their names."""
        return {}

    def after_backward(self, trainer: "Trainer", ctx: StepContext) -> None:
        """After ``loss.backward()``, before the optimiser step (NFE of both passes known)."""

    def after_step(self, trainer: "Trainer", ctx: StepContext) -> None:
        """After the optimiser step (coordinate-descent steps, clipping ...)."""

    def log_columns(self, trainer: "Trainer") -> list[str]:
        """Names of the extra log.csv columns this hook fills in :meth:`log_values`."""
        return []

    def log_values(self, trainer: "Trainer", ctx: StepContext) -> dict[str, Any]:
        return {}

    def eval_begin(self, trainer: "Trainer") -> None:
        """Before an evaluation pass over the test split (reset accumulators)."""

    def eval_batch(self, trainer: "Trainer", ctx: StepContext) -> None:
        """Each evaluation batch's outputs (``x``, ``y``, ``z``, ``logdet``, ``log_prob``)."""

    def eval_metrics(self, trainer: "Trainer") -> dict[str, Any]:
        """Extra entries of metrics.json, after an evaluation pass."""
        return {}

    def figures(self, trainer: "Trainer", fig_dir) -> None:
        """Write the feature's figures."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


#: feature builders ``(cfg, trainer) -> Hook | None``; feature modules append to this list
HOOK_BUILDERS: list[Callable[[Any, "Trainer"], Hook | None]] = []
