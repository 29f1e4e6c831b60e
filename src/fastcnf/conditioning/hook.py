"""The CCNF / InfoCNF training hook: the classifier's cross-entropy in the loss (Nguyen et al. 2019, "InfoCNF: Efficient Conditional
Continuous Normalizing Flow Using Adaptive Solvers", §2.2 eq. 4).

The density task already trains ``-log p(x | y)`` through the conditional prior
(:class:`fastcnf.priors.ClassConditionalGaussian`); this hook adds ``beta * CE(q_theta(z_c), y)``
(eq. 4). An objective that maps no data to a latent (``computes_latent = False``: flow matching
regresses a velocity) leaves the classifier nothing to read: the hook then adds no term and no
log column. The conditional and marginal test NLL, the test error, the sample accuracy and the
class-conditional sample figure come from :mod:`fastcnf.evaluation` for every conditional model.
"""
from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from fastcnf.config import ConfigError
from fastcnf.method import Hook, StepContext, TrainerView
from fastcnf.priors import ClassConditionalGaussian

__all__ = ["ConditioningHook"]


class ConditioningHook(Hook):
    """Adds ``beta * cross-entropy`` to the loss (see the module docstring)."""

    name = "conditioning"

    def __init__(self, beta: float, kind: str) -> None:
        self.beta = float(beta)
        self.kind = kind
        self.active = True

    def setup(self, trainer: TrainerView) -> None:
        if not isinstance(trainer.model.prior, ClassConditionalGaussian):
            raise ConfigError(f"conditioning.kind={self.kind} needs the class-conditional prior, but the "
                              f"model's prior is {type(trainer.model.prior).__name__}")
        self.active = bool(getattr(trainer.task.objective, "computes_latent", True))

    def loss_terms(self, trainer: TrainerView, ctx: StepContext) -> dict[str, Tensor]:
        if not self.active:  # the objective computes no latent (see the module docstring)
            return {}
        labels = ctx.get("labels")
        if labels is None:
            raise ConfigError("conditioning: the training batch has no labels (data set without labels?)")
        logits = trainer.model.prior.logits(ctx["z"])
        ce = F.cross_entropy(logits, labels)
        ctx["train_error"] = (logits.detach().argmax(1) != labels).double().mean()
        return {"cross_entropy": self.beta * ce}

    def log_columns(self, trainer: TrainerView) -> list[str]:
        return ["cross_entropy", "train_error"] if self.active else []

    def log_values(self, trainer: TrainerView, ctx: StepContext) -> dict[str, Any]:
        return {"train_error": float(ctx["train_error"])} if "train_error" in ctx else {}

    def eval_metrics(self, trainer: TrainerView) -> dict[str, Any]:
        return {"conditioning": self.kind}
