"""Regularisers integrated along the trajectory as extra ODE states (RNODE, Finlay et al. 2020).

Each regulariser contributes a rate ``r(t, z)`` per example; the CNF block integrates it with
the state, so the block returns ``int_0^T r dt`` for each example. The trainer adds
``weight * mean(integral)`` to the loss.

``reduction`` sets the rate's unit: ``sum`` over the dimensions (RNODE eq. 3-4, the unit of a
per-example NLL in nats) or ``mean`` over them (RNODE's released code, the unit of a bits/dim
loss; without it a weight tuned on 2-D data is ~D times too strong on a D-pixel image).

* :class:`KineticEnergy`: ``||f(t, z)||^2`` (RNODE eq. 3).
* :class:`JacobianFrobenius`: ``||e^T df/dz||^2`` with Hutchinson noise e (RNODE eq. 4), reusing
  the vector-Jacobian product of a Hutchinson divergence estimate when the block has one.
"""
from __future__ import annotations


import torch
from torch import Tensor

from fastcnf.cnf.divergence import DivergenceResult

__all__ = ["Regularizer", "KineticEnergy", "JacobianFrobenius", "REDUCTIONS"]


class Regularizer:
    """Base class: ``rate(f, z, div, create_graph)`` returns a per-example rate (B,)."""

    name = "base"
    needs_noise = False

    def __init__(self, weight: float, reduction: str = "sum") -> None:
        weight = float(weight)
        if weight < 0:
            raise ValueError(f"regulariser weight must be >= 0, got {weight}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"regulariser reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
        self.weight = weight
        self.reduction = reduction

    def _reduce(self, sq: Tensor) -> Tensor:
        """Per-example sum (or mean) of squared entries ``sq`` over all but the batch dimension."""
        sq = sq.reshape(sq.shape[0], -1)
        return sq.sum(1) if self.reduction == "sum" else sq.mean(1)

    def rate(self, f: Tensor, z: Tensor, div: DivergenceResult, noise: Tensor | None,
             create_graph: bool) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weight={self.weight}, reduction={self.reduction!r})"


class KineticEnergy(Regularizer):
    """Kinetic energy rate ``||f||^2`` (RNODE eq. 3; divided by D with ``reduction="mean"``)."""

    name = "kinetic"

    def rate(self, f, z, div, noise, create_graph):
        return self._reduce(f.pow(2))


class JacobianFrobenius(Regularizer):
    """Jacobian Frobenius-norm rate ``||e^T df/dz||^2``, a Hutchinson estimate of ``||df/dz||_F^2``
    (RNODE eq. 4; divided by D with ``reduction="mean"``)."""

    name = "jacobian_frobenius"
    needs_noise = True

    def rate(self, f, z, div, noise, create_graph):
        e_jac = div.eps_jac
        if e_jac is None:
            if not f.requires_grad:  # f has no graph at all: its Jacobian is 0
                return torch.zeros(f.shape[0], dtype=f.dtype, device=f.device)
            e_jac = torch.autograd.grad(f, z, noise, create_graph=create_graph, allow_unused=True)[0]
            if e_jac is None:
                return torch.zeros(f.shape[0], dtype=f.dtype, device=f.device)
        return self._reduce(e_jac.pow(2))


REDUCTIONS = ("sum", "mean")
