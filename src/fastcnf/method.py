"""The protocol every method of the papers implements, and how it plugs into the one training loop.

A *method* (flow matching, the learned end time, learned tolerances, CCNF / InfoCNF conditioning,
training by parts) lives in one package of its own (``fastcnf/flow_matching/``, ``fastcnf/endtime/``,
...) that owns its configuration section, its model side and its training hook, and exposes one
:class:`Method` object. :mod:`fastcnf.methods` is the one table that lists them; nothing below it
names a method. A method takes part in a run at these points:

* configuration: its section (``section``, a :class:`fastcnf.config.Section` dataclass stored under
  ``cfg.<name>``) and :meth:`Method.check` for rules that involve other sections;
* model: :meth:`Method.end_time_policy` (each CNF block's end time), :meth:`Method.prior` (the
  latent distribution) and :meth:`Method.attach` (after the model is built: gates, fixed sources);
* training: ``objectives`` (values of ``train.objective`` it provides) and :meth:`Method.hook`, a
  :class:`Hook` the trainer calls at fixed points of each step.

A hook that steps tensors with an optimiser of its own (TO-FLOW's T, the tolerance gates) declares
them as :class:`OwnOptimizer` objects (:meth:`Hook.own_optimizers`). The trainer is the one place
that excludes those tensors from the main optimiser, checkpoints their optimisers and, under
torchrun, averages their gradients over the processes before every step (:meth:`OwnOptimizer.step`),
so no method has to remember any of it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch
from torch import Tensor, nn

from fastcnf.config import Config
from fastcnf.data.base import DataBundle

__all__ = ["Hook", "StepContext", "TrainerView", "OwnOptimizer", "Method"]


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
    task: Any  # ``task.objective``: the step's objective (``computes_latent``: it maps data to a latent)

    def peek_batch(self, ahead: int = 1) -> tuple[Tensor, Tensor | None]:
        """The model input ``(x, y)`` of the step ``ahead`` steps from now, not consumed (see
        ``Trainer.peek_batch``)."""

    def reported_weights(self, state: dict[str, Any]) -> dict[str, Tensor]:
        """The weights a saved checkpoint's run reports and samples with: those of the best
        validation NLL, else the moving average, else the last (see ``Trainer.reported_weights``)."""


class StepContext(dict):
    """What one training step produced, shared by the objective and the hooks: ``x``, ``y``, ``z``,
    ``logdet``, ``log_prob``, ``nll``, ``loss`` (Tensors) and anything a hook adds. A hook may put a
    forward pass under ``"objective"`` (``(model, x) -> (z, logdet)``, training by parts); the
    likelihood objective uses it instead of the whole flow."""


def _local(params: list[Tensor]) -> None:
    """One process: gradients are already those of the whole batch."""


class OwnOptimizer:
    """An optimiser a method steps itself, on tensors the main optimiser must not touch.

    Args:
        params: the tensors it steps (they are excluded from the main optimiser).
        optimizer: a ``torch.optim.Optimizer`` over exactly ``params``.

    :meth:`step` first averages the gradients over the processes (the trainer sets
    :attr:`average_gradients`; in one process it does nothing), then steps and zeroes them, so every
    process takes the same step on the whole global batch's gradient.

    Example:
        >>> T = nn.Parameter(torch.tensor(0.5))
        >>> own = OwnOptimizer([T], torch.optim.SGD([T], lr=0.1))
        >>> T.grad = torch.tensor(1.0); own.step(); round(T.item(), 6)
        0.4
    """

    def __init__(self, params: Iterable[Tensor], optimizer: torch.optim.Optimizer) -> None:
        self.params = list(params)
        self.optimizer = optimizer
        self.average_gradients: Callable[[list[Tensor]], None] = _local

    def step(self) -> None:
        self.average_gradients(self.params)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


class Hook:
    """No-op base class; override what the method needs.

    Order in a step: ``before_step`` -> forward (objective) -> ``loss_terms`` -> backward ->
    ``after_backward`` -> main optimiser step -> ``after_step``.
    """

    name = "hook"

    def setup(self, trainer: TrainerView) -> None:
        """Called once after the model and data exist and before the optimiser is built."""

    def param_groups(self, trainer: TrainerView) -> list[dict]:
        """Optimiser parameter groups of model parameters this hook trains with the main optimiser
        under settings of its own (e.g. one group per part); they leave the main group."""
        return []

    def own_optimizers(self, trainer: TrainerView) -> list[OwnOptimizer]:
        """Optimisers this hook steps itself (see :class:`OwnOptimizer`); called after ``setup``."""
        return []

    def before_step(self, trainer: TrainerView, ctx: StepContext) -> None:
        """Before the forward pass (sample a tolerance, an end time, choose a part ...)."""

    def loss_terms(self, trainer: TrainerView, ctx: StepContext) -> dict[str, Tensor]:
        """Extra loss terms, added to the loss and logged under their names."""
        return {}

    def after_backward(self, trainer: TrainerView, ctx: StepContext) -> None:
        """After ``loss.backward()`` and the gradients' average over processes, before the step."""

    def after_step(self, trainer: TrainerView, ctx: StepContext) -> None:
        """After the main optimiser step (coordinate-descent steps, clipping ...)."""

    def log_columns(self, trainer: TrainerView) -> list[str]:
        """Names of the extra log.csv columns this hook fills in :meth:`log_values`."""
        return []

    def log_values(self, trainer: TrainerView, ctx: StepContext) -> dict[str, Any]:
        return {}

    def eval_metrics(self, trainer: TrainerView) -> dict[str, Any]:
        """Extra entries of metrics.json, after an evaluation on the test split."""
        return {}

    def start_note(self, trainer: TrainerView) -> str:
        """A part of ``fastcnf train``'s first line saying what the method adds to the run (e.g.
        worker threads); empty: nothing."""
        return ""

    def figures(self, trainer: TrainerView, fig_dir) -> None:
        """Write the method's figures."""

    def state_dict(self) -> dict:
        """The hook's own state (its :class:`OwnOptimizer` states are saved by the trainer)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


#: ``(cfg, bundle) -> objective``; an objective ``(model, ctx)`` fills ``ctx["loss"]`` and ``ctx["nll"]``
ObjectiveFactory = Callable[[Any, DataBundle], Callable[[nn.Module, StepContext], None]]


class Method:
    """One method of the papers as a composable option (see the module docstring).

    Attributes:
        name: the configuration section's key (``cfg.<name>``), e.g. ``endtime``.
        section: the section's dataclass (a :class:`fastcnf.config.Section`).
        docs: the method's page, e.g. ``docs/endtime.md``.
        objectives: ``train.objective`` values this method provides -> objective factory.
        deprecations: rewrites of this method's old spellings (``values -> message | None``,
            :class:`fastcnf.config.ConfigLoader`); ``deprecated_keys``: old keys ``--set`` accepts.
    """

    name: str = ""
    section: type | None = None
    docs: str = ""
    objectives: dict[str, ObjectiveFactory] = {}
    deprecations: tuple[Callable[[dict], str | None], ...] = ()
    deprecated_keys: frozenset[str] = frozenset()

    def check(self, cfg: Any) -> None:
        """Rules that involve other sections (raise :class:`fastcnf.config.ConfigError`)."""

    def end_time_policy(self, cfg: Any, block_name: str) -> nn.Module | None:
        """The end-time policy of the CNF block ``block_name``, or None to leave T fixed."""
        return None

    def prior(self, cfg: Any, flow: nn.Module, bundle: DataBundle) -> nn.Module | None:
        """The model's prior, or None for the standard normal."""
        return None

    def attach(self, cfg: Any, model: nn.Module) -> None:
        """Adjust the built model (e.g. give its blocks learned tolerance gates)."""

    def hook(self, cfg: Any) -> Hook | None:
        """This method's training hook, or None when the configuration leaves it off."""
        return None
