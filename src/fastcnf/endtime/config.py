"""The configuration section of this method: :class:`EndTimeConfig`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fastcnf.config import ConfigError, Section

__all__ = ["EndTimeConfig"]


@dataclass
class EndTimeConfig(Section):
    """End-time policy: TO-FLOW (Du et al. 2022, "TO-FLOW: Efficient Continuous Normalizing Flows
    with Temporal Optimization adjoint with Moving Speed") and STEER (Ghosh et al. 2020).

    T0, the initial (toflow), fixed (fixed) or central (steer) end time of every block, is
    ``model.end_time`` (TO-FLOW §4: 0.5 on toy data, 1 on images).

    Attributes:
        policy: fixed (T = T0), joint (T an ordinary parameter of the main optimiser), toflow
            (TO-FLOW Algorithm 1: coordinate descent on T with its own Adam, temporal
            regularisation, clipping) or steer (T ~ U[T0 - b, T0 + b] in training, T0 at evaluation).
        lr: toflow: learning rate of T's own Adam (TO-FLOW §4: 1e-2); not scaled by the schedule.
        alpha: toflow: weight of the temporal regulariser alpha * |T| (eq. 15-16: 0.1).
        clip_eps: toflow: eps of the clipping T in [eps, 2 T0 - eps] (eq. 17: 0.1); 0 < eps < T0.
        steer_b: steer: half-width b of the uniform end-time interval; 0 < b < T0.
        order: toflow: ``algorithm1`` (TO-FLOW Algorithm 1: T steps after the weights' update, on
            eq. 12-13's gradient at this iteration's end states evaluated with the updated
            weights; one network evaluation per block, no extra solve) or ``simultaneous`` (T and
            the weights step on the gradients of one backward pass; deprecated: fastcnf's order before Algorithm 1's was adopted).
    """

    _key = "endtime"
    policy: Literal["fixed", "joint", "toflow", "steer"] = "fixed"
    lr: float = 1e-2
    alpha: float = 0.1
    clip_eps: float = 0.1
    steer_b: float = 0.25
    order: Literal["algorithm1", "simultaneous"] = "algorithm1"

    def check(self) -> None:
        self._positive("lr", "clip_eps", "steer_b")
        if not self.alpha >= 0:
            raise ConfigError(f"endtime.alpha must be >= 0, got {self.alpha!r}")
