"""Dynamics networks f(t, z): FFJORD's time-conditioned concat-squash MLP and conv network.

A concat-squash layer computes ``(W x + b) * sigmoid(G t + g) + H t`` (FFJORD
``ConcatSquashLinear``): the time enters as a gate and a bias of every layer.

:class:`ConcatSquashMLP` also offers :meth:`ConcatSquashMLP.trace_forward`, the exact trace of
its Jacobian by forward-mode tangent propagation: the identity's D columns are pushed through
the layers together with the activations, in one fused pass (D extra rows per example). For the
small dimensions of tabular/toy data this is much cheaper than D autograd passes and it stays
differentiable for the parameter gradients.

References: Grathwohl et al. 2019 (FFJORD) appendix B; Chen et al. 2018.
"""
from __future__ import annotations

import difflib
from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "ACTIVATIONS",
    "ConcatSquashLinear",
    "ConcatSquashConv2d",
    "ConcatSquashMLP",
    "ConcatSquashConvNet",
]

ACTIVATIONS = {
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "swish": nn.SiLU,
}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        close = difflib.get_close_matches(name, ACTIVATIONS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown activation {name!r}{hint}; accepted: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _activation_derivative(act: nn.Module, pre: Tensor, post: Tensor) -> Tensor:
    """d act(pre) / d pre, elementwise, reusing the output where cheaper."""
    if isinstance(act, nn.Tanh):
        return 1 - post * post
    if isinstance(act, nn.Softplus):
        return torch.sigmoid(pre * act.beta)
    if isinstance(act, nn.ReLU):
        return (pre > 0).to(pre.dtype)
    if isinstance(act, nn.ELU):
        return torch.where(pre > 0, torch.ones_like(pre), post + act.alpha)
    if isinstance(act, nn.SiLU):
        s = torch.sigmoid(pre)
        return s * (1 + pre * (1 - s))
    raise TypeError(f"no derivative for activation {type(act).__name__}")


class ConcatSquashLinear(nn.Module):
    """``(W x + b) * sigmoid(G t + g) + H t`` (FFJORD ConcatSquashLinear)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.layer = nn.Linear(dim_in, dim_out)
        self.hyper_gate = nn.Linear(1, dim_out)
        self.hyper_bias = nn.Linear(1, dim_out, bias=False)

    def gate_and_bias(self, t: Tensor) -> tuple[Tensor, Tensor]:
        tt = t.reshape(1, 1).to(self.layer.weight.dtype)
        return torch.sigmoid(self.hyper_gate(tt)), self.hyper_bias(tt)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        gate, bias = self.gate_and_bias(t)
        return self.layer(x) * gate + bias


class ConcatSquashConv2d(nn.Module):
    """Convolutional concat-squash layer: ``conv(x) * sigmoid(G t + g) + H t`` per channel."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, padding: int = 1) -> None:
        super().__init__()
        self.layer = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding)
        self.hyper_gate = nn.Linear(1, c_out)
        self.hyper_bias = nn.Linear(1, c_out, bias=False)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        tt = t.reshape(1, 1).to(self.layer.weight.dtype)
        gate = torch.sigmoid(self.hyper_gate(tt)).view(1, -1, 1, 1)
        bias = self.hyper_bias(tt).view(1, -1, 1, 1)
        return self.layer(x) * gate + bias


class ConcatSquashMLP(nn.Module):
    """FFJORD's toy dynamics: concat-squash layers ``dim -> hidden... -> dim`` with an activation
    between layers (toy default 64-64-64, tanh)."""

    def __init__(self, dim: int, hidden_dims: Sequence[int] = (64, 64, 64), activation: str = "tanh") -> None:
        super().__init__()
        dims = [dim, *hidden_dims, dim]
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.acts = nn.ModuleList(_activation(activation) for _ in hidden_dims)
        self.dim = dim

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(t, h)
            if i < len(self.acts):
                h = self.acts[i](h)
        return h

    def trace_forward(self, t: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(f(t, z), tr(df/dz))`` in one pass, pushing the D identity columns forward.

        The tangent of layer output j w.r.t. input coordinate k is carried as ``tan[b, k, j]``;
        a layer maps it by ``W`` scaled by the time gate, an activation by its derivative.
        """
        b, d = z.shape
        h = z
        tan = None  # (B, D, width); first layer's tangent is W^T columns directly
        for i, layer in enumerate(self.layers):
            gate, bias = layer.gate_and_bias(t)
            h = layer.layer(h) * gate + bias
            w = layer.layer.weight  # (out, in)
            if tan is None:
                tan = (w.t() * gate).unsqueeze(0).expand(b, d, -1)
            else:
                tan = torch.matmul(tan, w.t()) * gate
            if i < len(self.acts):
                pre = h
                h = self.acts[i](pre)
                tan = tan * _activation_derivative(self.acts[i], pre, h).unsqueeze(1)
        trace = torch.diagonal(tan, dim1=1, dim2=2).sum(-1)
        return h, trace


class ConcatSquashConvNet(nn.Module):
    """Convolutional dynamics for images: 3x3 concat-squash convolutions ``C -> hidden... -> C``
    (FFJORD / InfoCNF 002 appendix B: 3 layers of 64 filters, softplus)."""

    def __init__(self, channels: int, hidden_dims: Sequence[int] = (64, 64, 64), activation: str = "softplus") -> None:
        super().__init__()
        dims = [channels, *hidden_dims, channels]
        self.layers = nn.ModuleList(ConcatSquashConv2d(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.acts = nn.ModuleList(_activation(activation) for _ in hidden_dims)

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(t, h)
            if i < len(self.acts):
                h = self.acts[i](h)
        return h
