"""End-time policies: how long each CNF block integrates.

Every CNF block integrates its ODE from 0 to an end time T, a positive per-block parameter
that gradients reach (the block rescales time to s in [0, 1] and integrates ``T f(sT, z)``, so
dL/dT is exact for direct and adjoint back-propagation alike). A policy decides how T is used:

* :class:`FixedEndTime` — FFJORD: T stays at T0 unless ``learnable`` (then an ordinary parameter
  trained jointly with the network).

* :class:`LearnedEndTime` — TO-FLOW (Du et al. 2022, §3): T trained by coordinate descent with its own
  optimiser, temporal regularisation ``alpha |T|`` (eq. 15-16) and clipping (eq. 17).
* :class:`RandomEndTime` — STEER (Ghosh et al. 2020): T ~ U[T0 - b, T0 + b] in training, T0 at
  evaluation.

:func:`toflow_time_gradient` computes dL/dT from the end state (TO-FLOW eq. 12-13).
Policies are found by name in :data:`END_TIME_POLICIES` (config key ``endtime.policy``).

References: Du, Luo, Chen, Xu & Zeng 2022, "TO-FLOW: Efficient Continuous Normalizing Flows with
Temporal Optimization adjoint with Moving Speed" (TO-FLOW) §2 eq. 4-5, §3 eq. 11-17, Algorithm 1;
Ghosh et al. 2020, "STEER: Simple Temporal Regularization For Neural ODEs"; Grathwohl et al. 2019,
"FFJORD". Full entries: docs/bibliography.md.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = ["EndTimePolicy", "FixedEndTime", "LearnedEndTime", "RandomEndTime", "toflow_time_gradient",
           "END_TIME_POLICIES"]


class EndTimePolicy(nn.Module):
    """Holds the per-block end time ``T`` (``self.end_time``, a 0-d parameter)."""

    def __init__(self, t0: float, learnable: bool = False) -> None:
        super().__init__()
        t0 = float(t0)
        if not (t0 > 0 and math.isfinite(t0)):
            raise ValueError(f"end time T0 must be positive and finite, got {t0!r}")
        self.t0 = t0
        self.end_time = nn.Parameter(torch.tensor(t0), requires_grad=learnable)

    def _apply(self, fn, recurse=True):
        # T0 is a user-given constant, not a random initialisation: a model built in float32 and
        # then moved to float64 must integrate to exactly T0, not to float32(T0). While T still
        # holds its initial value, re-set it from T0 after a dtype change.
        at_t0 = bool(self.end_time.detach() == torch.tensor(self.t0, dtype=self.end_time.dtype))
        out = super()._apply(fn, recurse)
        if at_t0 and self.end_time.is_floating_point():
            with torch.no_grad():
                self.end_time.fill_(self.t0)
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


class LearnedEndTime(EndTimePolicy):
    """TO-FLOW (Du et al. 2022, §3.1-3.2): T is learned by coordinate descent with its own optimiser,
    penalised by ``alpha * |T|`` (eq. 15-16) and clipped to ``[t0 + eps, 2 T0 - t0 - eps]`` (eq. 17).

    The policy holds T and the constants; the alternating optimisation (a step on the network with
    T fixed, then a step on T with the network fixed; Algorithm 1) is run by
    :class:`fastcnf.training.endtime.EndTimeHook`.

    Args:
        t0: the initial end time T0 (TO-FLOW §4: 0.5 on toy data, 1 on images).
        alpha: weight of the temporal regulariser ``alpha * |T|`` (TO-FLOW: 0.1).
        clip_eps: the clipping parameter eps of eq. 17 (TO-FLOW: 0.1); must satisfy ``0 < eps < T0``.
        start_time: t0 of eq. 17, the start of integration (0 in FFJORD and fastcnf).

    Example:
        >>> policy = LearnedEndTime(0.5, alpha=0.1, clip_eps=0.1)
        >>> policy.clip_bounds()
        (0.1, 0.9)
    """

    def __init__(self, t0: float, alpha: float = 0.1, clip_eps: float = 0.1, start_time: float = 0.0) -> None:
        super().__init__(t0, learnable=True)
        alpha, clip_eps = float(alpha), float(clip_eps)
        if not alpha >= 0:
            raise ValueError(f"endtime.alpha (temporal regularisation, TO-FLOW eq. 15) must be >= 0, got {alpha!r}")
        if not 0 < clip_eps < self.t0 - start_time:
            raise ValueError(
                f"endtime.clip_eps={clip_eps!r} must satisfy 0 < eps < T0 - t0 = {self.t0 - start_time!r} "
                f"(T0 = model.end_time = {self.t0!r}): eq. 17 clips T to [t0 + eps, 2 T0 - t0 - eps], an "
                "empty interval when eps >= T0 - t0")
        self.alpha = alpha
        self.clip_eps = clip_eps
        self.start_time = float(start_time)

    def clip_bounds(self) -> tuple[float, float]:
        """``(t0 + eps, 2 T0 - t0 - eps)``, the interval of eq. 17, centred on T0."""
        return (self.start_time + self.clip_eps, 2 * self.t0 - self.start_time - self.clip_eps)

    @torch.no_grad()
    def clip_(self) -> None:
        """Apply eq. 17 in place."""
        lo, hi = self.clip_bounds()
        self.end_time.clamp_(lo, hi)

    def temporal_regularization(self) -> Tensor:
        """``alpha * |T|`` (eq. 15)."""
        return self.alpha * self.end_time.abs()

    def extra_repr(self) -> str:
        return f"T0={self.t0}, alpha={self.alpha}, clip_eps={self.clip_eps}"


class RandomEndTime(EndTimePolicy):
    """STEER (Ghosh et al. 2020): in training every solve integrates to ``T ~ U[T0 - b, T0 + b]``;
    evaluation and sampling integrate to the fixed ``T0``.

    Args:
        t0: the end time T0 used at evaluation, centre of the training interval.
        half_width: b, with ``0 < b < T0`` so every sampled T is positive.

    The draw uses torch's global generator, so it is seeded by the run's seed and restored on resume.

    Example:
        >>> policy = RandomEndTime(1.0, half_width=0.5).train()
        >>> 0.5 <= float(policy()) <= 1.5
        True
    """

    def __init__(self, t0: float, half_width: float) -> None:
        super().__init__(t0, learnable=False)
        b = float(half_width)
        if not 0 < b < self.t0:
            raise ValueError(f"endtime.steer_b={b!r} must satisfy 0 < b < T0 = model.end_time = {self.t0!r} "
                             "(STEER samples T uniformly in [T0 - b, T0 + b], which must stay positive)")
        self.half_width = b
        self.last_sample: float = self.t0

    def value(self) -> Tensor:
        u = torch.rand((), dtype=self.end_time.dtype, device=self.end_time.device)
        sample = self.end_time + self.half_width * (2 * u - 1)
        self.last_sample = float(sample.detach())
        return sample

    def extra_repr(self) -> str:
        return f"T0={self.t0}, b={self.half_width}"


def toflow_time_gradient(block: nn.Module, z_end: Tensor, grad_z_end: Tensor, grad_logdet: Tensor,
                         noise: Tensor | None = None) -> Tensor:
    """dL/dT of one CNF block from its end state (TO-FLOW eq. 12-13).

    With ``(z(T), logdet) = block(x)`` and a loss ``L`` that depends on them, the end time enters
    only through the upper limit of integration, so (Leibniz rule and dz(T)/dT = f(z(T), T))::

        dL/dT = <dL/dz(T), f(z(T), T)> + <dL/dlogdet, Tr(df/dz)(z(T), T)>

    For the NLL ``L = -mean log p(x)`` of a single block under a standard normal prior,
    ``dL/dz(T) = z(T) / B`` and ``dL/dlogdet = -1 / B``: eq. 12-13 exactly.

    Args:
        block: a :class:`~fastcnf.cnf.block.CNFBlock` (its net, divergence and current T are used).
        z_end: z(T), the block's output, shape (B, ...).
        grad_z_end: dL/dz(T), same shape.
        grad_logdet: dL/dlogdet, shape (B,).
        noise: Hutchinson noise for the trace when the block's divergence is stochastic.

    Returns:
        A 0-d tensor (no graph).
    """
    from fastcnf.cnf.divergence import ExactTrace

    T = block.end_time_policy().detach()
    with torch.enable_grad():
        z = z_end.detach().requires_grad_(True)
        t = T.to(z.dtype)
        est = block.divergence
        if isinstance(est, ExactTrace) and est.uses_network_trace(block.net):
            f, div = block.net.trace_forward(t, z)
        else:
            if noise is None and not isinstance(est, ExactTrace):
                noise = est.sample_noise(z)
            f = block.net(t, z)
            div = est(f, z, noise, block.net, t, create_graph=False).div
    return ((grad_z_end * f).sum() + (grad_logdet * div).sum()).detach()


#: policy name -> ``(T0, endtime config) -> EndTimePolicy``; ``fixed`` also covers
#: ``model.train_end_time`` (see :func:`fastcnf.training.endtime.build_end_time_policy`)
END_TIME_POLICIES: dict[str, Callable[[float, Any], EndTimePolicy]] = {
    "fixed": lambda t0, c: FixedEndTime(t0),
    "joint": lambda t0, c: FixedEndTime(t0, learnable=True),
    "toflow": lambda t0, c: LearnedEndTime(t0, alpha=c.alpha, clip_eps=c.clip_eps),
    "steer": lambda t0, c: RandomEndTime(t0, half_width=c.steer_b),
}
