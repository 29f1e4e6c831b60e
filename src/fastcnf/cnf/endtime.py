"""End-time policies: how long each CNF block integrates.

Every CNF block integrates its ODE from 0 to an end time T, a positive per-block parameter
that gradients reach (the block rescales time to s in [0, 1] and integrates ``T f(sT, z)``, so
dL/dT is exact for direct and adjoint back-propagation alike). A policy decides how T is used:

* :class:`FixedEndTime` — FFJORD: T stays at T0 unless ``learnable`` (then an ordinary parameter
  trained jointly with the network).

Further policies (TO-FLOW coordinate descent, STEER) subclass :class:`EndTimePolicy`.

References: TO-FLOW (004) §2 eq. 4-5.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["EndTimePolicy", "FixedEndTime"]


class EndTimePolicy(nn.Module):
    """Holds the per-block end time ``T`` (``self.end_time``, a 0-d parameter)."""

    def __init__(self, t0: float, learnable: bool = False) -> None:
        super().__init__()
        t0 = float(t0)
        if not t0 > 0:
            raise ValueError(f"end time T0 must be positive, got {t0!r}")
        self.t0 = t0
        self.end_time = nn.Parameter(torch.tensor(t0), requires_grad=learnable)

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
