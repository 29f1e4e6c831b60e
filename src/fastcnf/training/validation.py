"""Validation and early stopping: keep the weights with the best validation NLL.

Every ``train.val_every`` iterations (and after the last one) the trainer computes the NLL of the
validation split with the task's own evaluation (the loop that computes the test NLL, on the
validation split instead, at the evaluation tolerance and noise seed); the weights with the lowest
validation NLL are kept in the checkpoint, and the run ends with them. With ``train.patience = P``
training stops after ``P`` validations in a row without a lower NLL, as Papamakarios et al. 2017
("Masked Autoregressive Flow for Density Estimation", §4) and Grathwohl et al. 2019 ("FFJORD",
§5.2) train their tabular models.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

from torch import Tensor, nn

from fastcnf.config import Config, ConfigError
from fastcnf.training.ema import averaged_weights
from fastcnf.training.tasks import Task

__all__ = ["EarlyStopping", "validation_task", "final_weights"]


def validation_task(task: Task, cfg: Config) -> Task:
    """A copy of ``task`` whose evaluation runs on the validation split (``bundle.val`` as its test
    split), without the sampled-class accuracy, which needs sampling and is not a likelihood.

    Raises:
        ConfigError: ``train.val_every > 0`` and the data have no validation split.
    """
    if task.bundle.val is None:
        raise ConfigError(f"train.val_every={cfg.train.val_every} needs a validation split: set data.val_fraction "
                          "(a share of the training split) or data.val_path (a file)")
    view = copy.copy(task)
    view.bundle = dataclasses.replace(task.bundle, test=task.bundle.val)
    view.cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, sample_accuracy_per_class=0))
    return view


def final_weights(state: dict[str, Any]) -> dict[str, Tensor]:
    """The weights a checkpoint's run reports: those of the best validation NLL when the run
    validated, else the moving average when it kept one (``train.ema_decay``), else the last ones
    (``fastcnf eval`` / ``sample`` / :func:`fastcnf.load_run` load these)."""
    best = (state.get("validation") or {}).get("best_model")
    return best if best else (averaged_weights(state) or state["model"])


class EarlyStopping:
    """The state of validation: the best NLL, its iteration and weights, and the patience count.

    Args:
        val_every: validate every this many iterations (0: never).
        patience: validations in a row without improvement before stopping (0: never stop).

    Example:
        >>> from torch import nn
        >>> stop, net = EarlyStopping(val_every=10, patience=2), nn.Linear(1, 1)
        >>> [stop.update(nll, it, net) for it, nll in ((10, 3.0), (20, 2.0), (30, 2.5), (40, 2.1))]
        [True, True, False, False]
        >>> stop.best_iteration, stop.stopped
        (20, True)
    """

    def __init__(self, val_every: int, patience: int) -> None:
        self.val_every, self.patience = int(val_every), int(patience)
        self.best_nll = math.inf
        self.best_iteration: int | None = None
        self.best_model: dict[str, Tensor] = {}
        self.since_best = 0
        self.stopped = False

    @property
    def enabled(self) -> bool:
        return self.val_every > 0

    def due(self, iteration: int, iterations: int) -> bool:
        """Validate after this iteration: every ``val_every`` and after the last one."""
        return self.enabled and (iteration % self.val_every == 0 or iteration == iterations)

    def update(self, nll: float | None, iteration: int, model: nn.Module) -> bool:
        """Record a validation NLL (None or NaN: not an improvement); True if it is the best so far.
        Copies the model's weights when it is; sets :attr:`stopped` when patience runs out."""
        improved = nll is not None and nll < self.best_nll
        if improved:
            self.best_nll, self.best_iteration, self.since_best = float(nll), iteration, 0
            self.best_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.since_best += 1
            self.stopped = 0 < self.patience <= self.since_best
        return improved

    def restore_best(self, model: nn.Module) -> None:
        """Load the best weights into ``model`` (nothing happens before the first validation)."""
        if self.best_model:
            model.load_state_dict(self.best_model)

    def summary(self) -> dict[str, Any]:
        """metrics.json's ``best_val_nll_nats``, ``best_iteration`` and ``stopped_early``."""
        return {"best_val_nll_nats": self.best_nll if self.best_iteration is not None else None,
                "best_iteration": self.best_iteration, "stopped_early": self.stopped}

    def state_dict(self) -> dict[str, Any]:
        return {"best_nll": self.best_nll, "best_iteration": self.best_iteration, "best_model": self.best_model,
                "since_best": self.since_best, "stopped": self.stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.best_nll, self.best_iteration = float(state["best_nll"]), state["best_iteration"]
        self.best_model, self.since_best = dict(state["best_model"]), int(state["since_best"])
        self.stopped = bool(state["stopped"])
