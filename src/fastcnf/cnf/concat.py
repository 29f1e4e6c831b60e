"""Concat dynamics f(t, z): the time enters as one extra input feature / channel of every layer.

FFJORD's ``ConcatLinear`` / ``ConcatConv2d`` (``--layer_type concat``; the layer its multiscale image
model ``odenvp.py`` always uses, and TO-FLOW §3.1's "stopping time encoded onto the channels of the
feature map"): a layer computes ``W [t, x] + b``, i.e. the input is the state with a constant
channel of value t prepended. A ``C -> hidden -> C`` network of such layers has ``(C_in + 1) *
C_out * k^2 + C_out`` parameters per layer, where a concat-squash layer
(:mod:`fastcnf.cnf.dynamics`) has ``C_in * C_out * k^2 + 3 C_out``.

These networks have no forward-mode trace kernel: exact traces go through autograd, Hutchinson's
estimator through a vector-Jacobian product.

References: Grathwohl et al. 2019, "FFJORD", appendix B and ``lib/layers/diffeq_layers/basic.py``;
Du et al. 2022, "TO-FLOW", §3.1. Full entries: docs/bibliography.md.

Example:
    >>> net = ConcatConvNet(1, (8, 8))
    >>> net(torch.tensor(0.5), torch.randn(2, 1, 4, 4)).shape
    torch.Size([2, 1, 4, 4])
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from fastcnf.cnf.activations import make_activation

__all__ = ["ConcatLinear", "ConcatConv2d", "ConcatMLP", "ConcatConvNet"]


def _time_channel(t: Tensor, x: Tensor) -> Tensor:
    """A constant feature (B, 1, ...) of value t, shaped like one channel of ``x``."""
    return torch.ones_like(x[:, :1]) * t.to(x.dtype)


class ConcatLinear(nn.Module):
    """``W [t, x] + b`` (FFJORD ``ConcatLinear``): time is the first input feature."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.layer = nn.Linear(dim_in + 1, dim_out)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.layer(torch.cat([_time_channel(t, x), x], 1))


class ConcatConv2d(nn.Module):
    """``conv([t, x])`` (FFJORD ``ConcatConv2d``): time is the first input channel (3x3, padding 1)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, padding: int = 1) -> None:
        super().__init__()
        self.layer = nn.Conv2d(c_in + 1, c_out, kernel_size, stride=stride, padding=padding)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.layer(torch.cat([_time_channel(t, x), x], 1))


class _ConcatStack(nn.Module):
    """Concat layers ``state -> hidden... -> state`` with an activation between layers."""

    def __init__(self, layers: list[nn.Module], activation: str, n_hidden: int, state_size: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.acts = nn.ModuleList(make_activation(activation) for _ in range(n_hidden))
        #: size of the state (features or channels), without the time input; read by the tolerance gates
        self.state_size = int(state_size)

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(t, h)
            if i < len(self.acts):
                h = self.acts[i](h)
        return h


class ConcatMLP(_ConcatStack):
    """Concat MLP ``dim -> hidden... -> dim`` (FFJORD ``ODEnet`` with ``conv=False, layer_type=concat``)."""

    def __init__(self, dim: int, hidden_dims: Sequence[int] = (64, 64, 64), activation: str = "tanh") -> None:
        dims = [dim, *hidden_dims, dim]
        super().__init__([ConcatLinear(a, b) for a, b in zip(dims[:-1], dims[1:])], activation, len(hidden_dims), dim)
        self.dim = dim


class ConcatConvNet(_ConcatStack):
    """Concat 3x3 convolutions ``C -> hidden... -> C`` (FFJORD's multiscale ``ODEnet``: ``--dims 64,64,64
    --strides 1,1,1,1 --layer_type concat``, softplus)."""

    def __init__(self, channels: int, hidden_dims: Sequence[int] = (64, 64, 64), activation: str = "softplus") -> None:
        dims = [channels, *hidden_dims, channels]
        super().__init__([ConcatConv2d(a, b) for a, b in zip(dims[:-1], dims[1:])], activation, len(hidden_dims),
                         channels)
        self.channels = channels
