"""Priors over the flow's latent: the interface conditional priors plug into.

A prior maps the flat latent ``z`` (B, D) — the concatenation described in
:mod:`fastcnf.flows.sequential` — and an optional label ``y`` to ``log p(z | y)``, and samples.
Conditional priors (CCNF, InfoCNF) implement the same interface and add ``logits(z)``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["Prior", "StandardNormal", "standard_normal_logprob"]


def standard_normal_logprob(z: Tensor) -> Tensor:
    """Sum over all non-batch dimensions of log N(z; 0, I)."""
    return (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).reshape(z.shape[0], -1).sum(1)


class Prior(nn.Module):
    """Interface: ``log_prob(z, y=None) -> (B,)``, ``sample(n, y=None) -> (n, D)``.

    ``conditional`` is True for priors that use labels; they also provide ``logits(z)``
    (classifier) and ``marginal_log_prob(z)``.
    """

    conditional = False

    def __init__(self, dim: int, latent_sizes: list[int] | None = None) -> None:
        super().__init__()
        self.dim = int(dim)
        self.latent_sizes = list(latent_sizes) if latent_sizes is not None else [self.dim]

    def log_prob(self, z: Tensor, y: Tensor | None = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def sample(self, n: int, y: Tensor | None = None, generator: torch.Generator | None = None,
               device=None, dtype=None) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class StandardNormal(Prior):
    """p(z) = N(0, I); labels are ignored."""

    def log_prob(self, z, y=None):
        return standard_normal_logprob(z)

    def sample(self, n, y=None, generator=None, device=None, dtype=None):
        return torch.randn(n, self.dim, generator=generator, device=device, dtype=dtype or torch.get_default_dtype())
