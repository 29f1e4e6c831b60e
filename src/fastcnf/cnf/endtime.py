"""The end time of a CNF block: every block integrates its ODE from 0 to an end time T.

T is a positive per-block parameter that gradients reach (the block rescales time to s in [0, 1]
and integrates ``T f(sT, z)``, so dL/dT is exact for direct and adjoint back-propagation alike).
:class:`EndTimePolicy` holds T; :class:`FixedEndTime` is FFJORD's choice (T = T0, or an ordinary
parameter trained jointly when ``learnable``). Learned and random end times (TO-FLOW, STEER) are
the method package :mod:`fastcnf.endtime`.

References: Grathwohl et al. 2019, "FFJORD: Free-form Continuous Dynamics for Scalable Reversible
Generative Models"; Du et al. 2022, "TO-FLOW", §2 eq. 4-5. Full entries: docs/bibliography.md.
"""
from __future__ import annotations

import math
import torch
from torch import Tensor, nn

__all__ = ["EndTimePolicy", "FixedEndTime"]


class EndTimePolicy(nn.Module):
    """Holds the per-block end time ``T`` (``self.end_time``, a 0-d parameter) and its initial
    value ``T0`` (``model.end_time``)."""

    def __init__(self, T0: float, learnable: bool = False) -> None:
        super().__init__()
        T0 = float(T0)
        if not (T0 > 0 and math.isfinite(T0)):
            raise ValueError(f"end time T0 must be positive and finite, got {T0!r}")
        self.T0 = T0
        self.end_time = nn.Parameter(torch.tensor(T0), requires_grad=learnable)

    def _apply(self, fn, recurse=True):
        # T0 is a user-given constant, not a random initialisation: a model built in float32 and
        # then moved to float64 must integrate to exactly T0, not to float32(T0). While T still
        # holds its initial value, re-set it from T0 after a dtype change.
        at_T0 = bool(self.end_time.detach() == torch.tensor(self.T0, dtype=self.end_time.dtype))
        out = super()._apply(fn, recurse)
        if at_T0 and self.end_time.is_floating_point():
            with torch.no_grad():
                self.end_time.fill_(self.T0)
        return out

    def value(self) -> Tensor:
        """The T used by the next solve (may differ from ``end_time`` in training, e.g. STEER)."""
        return self.end_time

    def eval_value(self) -> Tensor:
        """The T used for evaluation and sampling."""
        return self.end_time

    def forward(self) -> Tensor:
        return self.value() if self.training else self.eval_value()


class FixedEndTime(EndTimePolicy):
    """T = T0 (FFJORD); with ``learnable=True`` T is trained jointly by gradient descent."""
