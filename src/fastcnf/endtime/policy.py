"""Learned and random end times: TO-FLOW and STEER (the model side of :mod:`fastcnf.endtime`).

* :class:`LearnedEndTime` — TO-FLOW (Du et al. 2022, §3): T trained by coordinate descent with its
  own optimiser, temporal regularisation ``alpha |T|`` (eq. 15-16) and clipping (eq. 17).
* :class:`RandomEndTime` — STEER (Ghosh et al. 2020): T ~ U[T0 - b, T0 + b] in training, T0 at
  evaluation.

:func:`toflow_time_gradient` computes dL/dT from the end state (TO-FLOW eq. 12-13).

References: Du, Luo, Chen, Xu & Zeng 2022, "TO-FLOW: Efficient Continuous Normalizing Flows with
Temporal Optimization adjoint with Moving Speed" §3 eq. 11-17, Algorithm 1; Ghosh et al. 2020,
"STEER: Simple Temporal Regularization For Neural ODEs". Full entries: docs/bibliography.md.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fastcnf.cnf.divergence import ExactTrace
from fastcnf.cnf.endtime import EndTimePolicy

__all__ = ["LearnedEndTime", "RandomEndTime", "toflow_time_gradient"]


class LearnedEndTime(EndTimePolicy):
    """TO-FLOW (Du et al. 2022, §3.1-3.2): T is learned by coordinate descent with its own optimiser,
    penalised by ``alpha * |T|`` (eq. 15-16) and clipped to ``[t0 + eps, 2 T0 - t0 - eps]`` (eq. 17,
    t0 the start of integration).

    The policy holds T and the constants; the alternating optimisation (a step on the network with
    T fixed, then a step on T with the network fixed; Algorithm 1) is run by
    :class:`fastcnf.endtime.hook.EndTimeHook`.

    Args:
        T0: the initial end time (TO-FLOW §4: 0.5 on toy data, 1 on images).
        alpha: weight of the temporal regulariser ``alpha * |T|`` (TO-FLOW: 0.1).
        clip_eps: the clipping parameter eps of eq. 17 (TO-FLOW: 0.1); must satisfy ``0 < eps < T0``.
        start_time: t0 of eq. 17, the start of integration (0 in FFJORD and fastcnf).

    Example:
        >>> policy = LearnedEndTime(0.5, alpha=0.1, clip_eps=0.1)
        >>> policy.clip_bounds()
        (0.1, 0.9)
    """

    def __init__(self, T0: float, alpha: float = 0.1, clip_eps: float = 0.1, start_time: float = 0.0) -> None:
        super().__init__(T0, learnable=True)
        alpha, clip_eps = float(alpha), float(clip_eps)
        if not alpha >= 0:
            raise ValueError(f"endtime.alpha (temporal regularisation, TO-FLOW eq. 15) must be >= 0, got {alpha!r}")
        if not 0 < clip_eps < self.T0 - start_time:
            raise ValueError(
                f"endtime.clip_eps={clip_eps!r} must satisfy 0 < eps < T0 - t0 = {self.T0 - start_time!r} "
                f"(T0 = model.end_time = {self.T0!r}): eq. 17 clips T to [t0 + eps, 2 T0 - t0 - eps], an "
                "empty interval when eps >= T0 - t0")
        self.alpha = alpha
        self.clip_eps = clip_eps
        self.start_time = float(start_time)

    def clip_bounds(self) -> tuple[float, float]:
        """``(t0 + eps, 2 T0 - t0 - eps)``, the interval of eq. 17, centred on T0."""
        return (self.start_time + self.clip_eps, 2 * self.T0 - self.start_time - self.clip_eps)

    @torch.no_grad()
    def clip_(self) -> None:
        """Apply eq. 17 in place."""
        lo, hi = self.clip_bounds()
        self.end_time.clamp_(lo, hi)

    def temporal_regularization(self) -> Tensor:
        """``alpha * |T|`` (eq. 15)."""
        return self.alpha * self.end_time.abs()

    def extra_repr(self) -> str:
        return f"T0={self.T0}, alpha={self.alpha}, clip_eps={self.clip_eps}"


class RandomEndTime(EndTimePolicy):
    """STEER (Ghosh et al. 2020): in training every solve integrates to ``T ~ U[T0 - b, T0 + b]``;
    evaluation and sampling integrate to the fixed ``T0``.

    Args:
        T0: the end time used at evaluation, centre of the training interval.
        half_width: b, with ``0 < b < T0`` so every sampled T is positive.

    The draw uses torch's global generator, so it is seeded by the run's seed and restored on resume.

    Example:
        >>> policy = RandomEndTime(1.0, half_width=0.5).train()
        >>> 0.5 <= float(policy()) <= 1.5
        True
    """

    def __init__(self, T0: float, half_width: float) -> None:
        super().__init__(T0, learnable=False)
        b = float(half_width)
        if not 0 < b < self.T0:
            raise ValueError(f"endtime.steer_b={b!r} must satisfy 0 < b < T0 = model.end_time = {self.T0!r} "
                             "(STEER samples T uniformly in [T0 - b, T0 + b], which must stay positive)")
        self.half_width = b
        self.last_sample: float = self.T0

    def value(self) -> Tensor:
        u = torch.rand((), dtype=self.end_time.dtype, device=self.end_time.device)
        sample = self.end_time + self.half_width * (2 * u - 1)
        self.last_sample = float(sample.detach())
        return sample

    def extra_repr(self) -> str:
        return f"T0={self.T0}, b={self.half_width}"


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
