"""The configuration section of this method: :class:`ConditioningConfig`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fastcnf.config import ConfigError, Section

__all__ = ["ConditioningConfig"]


@dataclass
class ConditioningConfig(Section):
    """Class conditioning: CCNF and InfoCNF (Nguyen et al. 2019, "InfoCNF: Efficient Conditional
    Continuous Normalizing Flow Using Adaptive Solvers", §2).

    Attributes:
        kind: none, ccnf (class-conditional Gaussian on the whole latent z, eq. 3) or infocnf
            (on the supervised code z_y only, ``supervised_fraction`` of the latent placed by
            ``placement``; the rest of z is N(0, I); §2.2).
        beta: weight of the classifier's cross-entropy in the loss (eq. 4).
        supervised_fraction: infocnf: the size of z_y as a fraction of the whole latent z (§4.1:
            "half of the latent code", 0.5), or of the final piece with ``placement: final_piece``.
        placement: infocnf: where z_y lies in the flat latent (factored pieces first, final output
            last): ``first`` (``z = [z_y, z_u]``, §2.2), ``last`` (the end of z: the final output and
            the latest factored pieces) or ``final_piece`` (the start of the final output only;
            deprecated: fastcnf's layout before z_y spanned the whole latent, for old runs).
        dropout: dropout rate on the linear classifier's input during training (§4.1: 0.5).
        learn_scale: learn log sigma(y) as well as mu(y); false fixes sigma = 1.
        label_prior: p(y) of the marginal likelihood and of unlabelled sampling: uniform or
            empirical (the training split's label frequencies).
    """

    _key = "conditioning"
    kind: Literal["none", "ccnf", "infocnf"] = "none"
    beta: float = 1.0
    supervised_fraction: float = 0.5
    placement: Literal["first", "last", "final_piece"] = "first"
    dropout: float = 0.5
    learn_scale: bool = True
    label_prior: Literal["uniform", "empirical"] = "uniform"

    def check(self) -> None:
        if not 0.0 < self.supervised_fraction <= 1.0:
            raise ConfigError(f"conditioning.supervised_fraction must be in (0, 1], got {self.supervised_fraction}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"conditioning.dropout must be in [0, 1), got {self.dropout}")
        if self.beta < 0:
            raise ConfigError(f"conditioning.beta must be >= 0, got {self.beta}")
