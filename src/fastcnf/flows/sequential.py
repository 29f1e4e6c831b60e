"""A flow as a sequence of invertible steps and factor-outs; the latent is their concatenation.

A step maps ``x -> (y, logdet)`` and back. A :class:`FactorOut` step splits the channels of x
into a kept part, which flows on, and a factored-out part, which becomes a piece of the latent
(multiscale architecture, Dinh et al. 2017; FFJORD §4; Glow). The flow's latent ``z`` is the
flattened concatenation ``[factored_1, ..., factored_k, final_output]`` in that order, so a
prior sees the whole latent (CCNF) or a documented slice of it (InfoCNF: the final output).

``forward_range`` runs a contiguous range of steps, which is what training by parts needs
(Bhatt & Inouye 2021, "Learning Flows By Parts").
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["FlowStep", "FactorOut", "SequentialFlow"]


class FlowStep(nn.Module):
    """An invertible step. Subclasses implement ``forward(x) -> (y, logdet)``, ``inverse(y) -> x``
    and ``output_shape(shape) -> shape`` (per-example shapes)."""

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def inverse(self, y: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class FactorOut(nn.Module):
    """Factor out the last ``fraction`` of the channels (dim 1): ``x -> (kept, factored, logdet)``.

    The base class factors out as is (logdet 0; FFJORD's multiscale model). Glow's split
    overrides :meth:`transform_factored` to whiten the factored half with a learned prior
    conditioned on the kept half.
    """

    def __init__(self, fraction: float = 0.5) -> None:
        super().__init__()
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"factor-out fraction must be in (0, 1), got {fraction}")
        self.fraction = fraction

    def split_sizes(self, channels: int) -> tuple[int, int]:
        out = int(round(channels * self.fraction))
        if out <= 0 or out >= channels:
            raise ValueError(f"cannot factor out {self.fraction} of {channels} channels")
        return channels - out, out

    def shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        keep, out = self.split_sizes(shape[0])
        return (keep, *shape[1:]), (out, *shape[1:])

    def transform_factored(self, factored: Tensor, kept: Tensor) -> tuple[Tensor, Tensor]:
        return factored, torch.zeros(factored.shape[0], dtype=factored.dtype, device=factored.device)

    def untransform_factored(self, latent: Tensor, kept: Tensor) -> Tensor:
        return latent

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        keep, _ = self.split_sizes(x.shape[1])
        kept, factored = x[:, :keep], x[:, keep:]
        latent, logdet = self.transform_factored(factored, kept)
        return kept, latent, logdet

    def inverse(self, kept: Tensor, latent: Tensor) -> Tensor:
        return torch.cat([kept, self.untransform_factored(latent, kept)], dim=1)


class SequentialFlow(nn.Module):
    """Steps applied in order; see the module docstring for the latent layout.

    Args:
        steps: :class:`FlowStep` and :class:`FactorOut` modules.
        input_shape: per-example input shape, e.g. ``(2,)`` or ``(1, 28, 28)``.
    """

    def __init__(self, steps: Iterable[nn.Module], input_shape: Sequence[int]) -> None:
        super().__init__()
        self.steps = nn.ModuleList(steps)
        self.input_shape = tuple(int(s) for s in input_shape)
        shape = self.input_shape
        self.step_shapes: list[tuple[int, ...]] = []  # input shape of each step
        self.latent_shapes: list[tuple[int, ...]] = []  # factored pieces then final output
        for step in self.steps:
            self.step_shapes.append(shape)
            if isinstance(step, FactorOut):
                shape, out = step.shapes(shape)
                self.latent_shapes.append(out)
            else:
                shape = step.output_shape(shape)
        self.output_shape = shape
        self.latent_shapes.append(shape)
        self.latent_sizes = [math.prod(s) for s in self.latent_shapes]
        self.latent_dim = sum(self.latent_sizes)

    def forward_range(self, x: Tensor, start: int = 0, stop: int | None = None
                      ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Run steps ``start..stop-1``. Returns ``(x_out, logdet, factored pieces)``."""
        stop = len(self.steps) if stop is None else stop
        logdet = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        factored: list[Tensor] = []
        for step in self.steps[start:stop]:
            if isinstance(step, FactorOut):
                x, piece, ld = step(x)
                factored.append(piece)
            else:
                x, ld = step(x)
            logdet = logdet + ld
        return x, logdet, factored

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Data -> flat latent ``z`` (B, latent_dim) and ``logdet`` (B,)."""
        out, logdet, factored = self.forward_range(x)
        z = torch.cat([p.reshape(x.shape[0], -1) for p in factored] + [out.reshape(x.shape[0], -1)], dim=1)
        return z, logdet

    def split_latent(self, z: Tensor) -> list[Tensor]:
        """Flat latent -> its pieces with their shapes (factored pieces, then the final output)."""
        pieces = torch.split(z, self.latent_sizes, dim=1)
        return [p.reshape(z.shape[0], *s) for p, s in zip(pieces, self.latent_shapes)]

    def inverse(self, z: Tensor) -> Tensor:
        """Flat latent -> data."""
        pieces = self.split_latent(z)
        x = pieces[-1]
        k = len(pieces) - 2
        for step in reversed(self.steps):
            if isinstance(step, FactorOut):
                x = step.inverse(x, pieces[k])
                k -= 1
            else:
                x = step.inverse(x)
        return x

    def cnf_blocks(self) -> list[nn.Module]:
        from fastcnf.cnf.block import CNFBlock

        return [m for m in self.modules() if isinstance(m, CNFBlock)]
