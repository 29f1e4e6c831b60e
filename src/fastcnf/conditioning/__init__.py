"""Class conditioning as a method: CCNF and InfoCNF.

``conditioning.kind`` chooses it (:class:`~fastcnf.conditioning.config.ConditioningConfig`). The
model side is the class-conditional Gaussian prior (:class:`fastcnf.priors.ClassConditionalGaussian`,
placed on the latent by :mod:`fastcnf.conditioning.prior`), the training side the classifier's
cross-entropy (:mod:`fastcnf.conditioning.hook`). Conditional metrics (conditional and marginal NLL,
test error, sample accuracy) are computed for every conditional model by :mod:`fastcnf.evaluation`.
Docs: docs/conditioning.md.

References: Nguyen et al. 2019, "InfoCNF: Efficient Conditional Continuous Normalizing Flow Using
Adaptive Solvers", §2; Nguyen et al., "On Mixed Conditional FFJORD with Large-Batch Training", §2.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from fastcnf.conditioning.config import ConditioningConfig
from fastcnf.conditioning.hook import ConditioningHook
from fastcnf.conditioning.prior import class_conditional_prior
from fastcnf.data.base import DataBundle
from fastcnf.method import Hook, Method

__all__ = ["CONDITIONING", "ConditioningMethod"]


def _final_piece(values: dict) -> str | None:
    if (values.get("conditioning") or {}).get("placement") == "final_piece":
        return ("conditioning.placement=final_piece is deprecated (it conditions the final latent piece only, "
                "not InfoCNF's z_y of the whole latent): use conditioning.placement=first")
    return None


class ConditioningMethod(Method):
    """The conditioning method (see the module docstring)."""

    name = "conditioning"
    section = ConditioningConfig
    docs = "docs/conditioning.md"
    deprecations = (_final_piece,)

    def prior(self, cfg: Any, flow: nn.Module, bundle: DataBundle) -> nn.Module | None:
        return class_conditional_prior(cfg, flow, bundle) if cfg.conditioning.kind != "none" else None

    def hook(self, cfg: Any) -> Hook | None:
        c = cfg.conditioning
        return ConditioningHook(c.beta, c.kind) if c.kind != "none" else None


CONDITIONING = ConditioningMethod()
