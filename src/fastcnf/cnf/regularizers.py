"""Regularisers integrated along the trajectory as extra ODE states (RNODE, Finlay et al. 2020).

Each regulariser contributes a rate ``r(t, z)`` per example; the CNF block integrates it with
the state, so the block returns ``int_0^T r dt`` for each example. The trainer adds
``weight * mean(integral)`` to the loss.

* :class:`KineticEnergy`: ``||f(t, z)||^2`` (RNODE eq. 3).
* :class:`JacobianFrobenius`: ``||e^T df/dz||^2`` with Hutchinson noise e (RNODE eq. 4), reusing
  the vector-Jacobian product of a Hutchinson divergence estimate when the block has one.
"""
from __future__ import annotations

import difflib

import torch
from torch import Tensor

from fastcnf.cnf.divergence import DivergenceResult

__all__ = ["Regularizer", "KineticEnergy", "JacobianFrobenius", "REGULARIZERS", "make_regularizer"]


class Regularizer:
    """Base class: ``rate(f, z, div, create_graph)`` returns a per-example rate (B,)."""

    name = "base"
    needs_noise = False

    def __init__(self, weight: float) -> None:
        weight = float(weight)
        if weight < 0:
            raise ValueError(f"regulariser weight must be >= 0, got {weight}")
        self.weight = weight

    def rate(self, f: Tensor, z: Tensor, div: DivergenceResult, noise: Tensor | None,
             create_graph: bool) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weight={self.weight})"


class KineticEnergy(Regularizer):
    """Kinetic energy rate ``||f||^2`` (RNODE)."""

    name = "kinetic"

    def rate(self, f, z, div, noise, create_graph):
        return f.reshape(f.shape[0], -1).pow(2).sum(1)


class JacobianFrobenius(Regularizer):
    """Jacobian Frobenius-norm rate ``||e^T df/dz||^2`` (Hutchinson estimate of ||df/dz||_F^2)."""

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
        return e_jac.reshape(f.shape[0], -1).pow(2).sum(1)


REGULARIZERS = {"kinetic": KineticEnergy, "jacobian_frobenius": JacobianFrobenius}


def make_regularizer(name: str, weight: float) -> Regularizer:
    if name not in REGULARIZERS:
        close = difflib.get_close_matches(name, REGULARIZERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown regulariser {name!r}{hint}; accepted: {', '.join(REGULARIZERS)}")
    return REGULARIZERS[name](weight)
