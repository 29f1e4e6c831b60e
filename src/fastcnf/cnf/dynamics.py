"""Dynamics networks f(t, z): FFJORD's time-conditioned concat-squash MLP and conv network.

A concat-squash layer computes ``(W x + b) * sigmoid(G t + g) + H t`` (FFJORD
``ConcatSquashLinear``): the time enters as a gate and a bias of every layer.

:class:`ConcatSquashMLP` also offers :meth:`ConcatSquashMLP.trace_forward`, the exact trace of
its Jacobian by forward-mode tangent propagation (:mod:`fastcnf.cnf.trace_kernel`).

References: Grathwohl et al. 2019 (FFJORD) appendix B; Chen et al. 2018.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcnf.cnf.activations import ACTIVATIONS, make_activation
from fastcnf.cnf.trace_kernel import (
    _act_slope,
    _ConcatSquashTrace,
    _get_packed,
    _layer_params,
    _trace_forward_kernel,
    _trace_reference,
)

__all__ = [
    "ACTIVATIONS",
    "ConcatSquashLinear",
    "ConcatSquashConv2d",
    "ConcatSquashMLP",
    "ConcatSquashConvNet",
]

def _stack_forward(layers: nn.ModuleList, acts: nn.ModuleList, t: Tensor, z: Tensor) -> Tensor:
    """Concat-squash layers with an activation after every layer but the last."""
    h = z
    for i, layer in enumerate(layers):
        h = layer(t, h)
        if i < len(acts):
            h = acts[i](h)
    return h


class ConcatSquashLinear(nn.Module):
    """``(W x + b) * sigmoid(G t + g) + H t`` (FFJORD ConcatSquashLinear)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.layer = nn.Linear(dim_in, dim_out)
        self.hyper_gate = nn.Linear(1, dim_out)
        self.hyper_bias = nn.Linear(1, dim_out, bias=False)

    def gate_and_bias(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Gate and bias for a scalar time (1, out) or one time per example (B, out)."""
        tt = t.reshape(-1, 1).to(self.layer.weight.dtype)
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
        tt = t.reshape(-1, 1).to(self.layer.weight.dtype)  # a scalar time, or one per example
        gate = torch.sigmoid(self.hyper_gate(tt)).view(tt.shape[0], -1, 1, 1)
        bias = self.hyper_bias(tt).view(tt.shape[0], -1, 1, 1)
        return self.layer(x) * gate + bias


class ConcatSquashMLP(nn.Module):
    """FFJORD's toy dynamics: concat-squash layers ``dim -> hidden... -> dim`` with an activation
    between layers (toy default 64-64-64, tanh). ``t`` is a scalar or one time per example (B,)
    (flow-matching batches)."""

    per_example_time = True

    def __init__(self, dim: int, hidden_dims: Sequence[int] = (64, 64, 64), activation: str = "tanh") -> None:
        super().__init__()
        dims = [dim, *hidden_dims, dim]
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.acts = nn.ModuleList(make_activation(activation) for _ in hidden_dims)
        self.dim = dim

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return _stack_forward(self.layers, self.acts, t, z)

    def trace_forward(self, t: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(f(t, z), tr(df/dz))`` in one pass, pushing the D identity columns forward.

        The tangent of layer output j w.r.t. input coordinate k is carried as ``tan[k, b, j]``,
        stacked under the activations ``h[b, j]`` so that each layer is one matrix product; a
        layer maps it by ``W`` scaled by the time gate, an activation by its derivative. The
        backward pass is written out by hand (:class:`_ConcatSquashTrace`): the same derivatives
        autograd forms (:meth:`_trace_forward_autograd`), in far fewer operations.
        """
        if z.dim() != 2 or len(self.layers) < 2:
            return self._trace_forward_autograd(t, z)
        packed = _get_packed(self)
        if not (torch.is_grad_enabled() and (z.requires_grad or t.requires_grad or packed.token is not None)):
            with torch.no_grad():
                f, trace, _ = _trace_forward_kernel(packed.acts, packed, t, z, save=False)
            return f, trace
        return _ConcatSquashTrace.apply(packed.acts, packed, t, z, packed.token)

    def _trace_forward_autograd(self, t: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """Reference implementation of :meth:`trace_forward` through autograd (any depth)."""
        params = [p for layer in self.layers for p in _layer_params(layer)]
        return _trace_reference(self.acts, t, z, params)


# ---- the fused forward-mode trace and its hand-written backward ----------------------------------
#
# One concat-squash layer l (inputs of width m, outputs of width n, D = data dimension):
#   g = sigmoid(G t + g0),  c = H t,  v = b * g + c       (time gate, time bias, folded bias; (n,))
#   P = (S W^T) * g + [v; 0; ...; 0]                      S = [h; U_1..U_D] stacks the activations
#   h' = act(P[0]),  U'_k = P[1 + k] * act'(P[0])         over the D tangents: one product per layer
# The first layer's tangents are W^T * g for every example; the last layer only needs the diagonal
# of its tangent block: trace = sum_k P[1 + k][:, k].
#
# The parameters enter every evaluation as one flat tensor (:class:`_Packed`); the evaluations of
# a backward pass add their share of its gradient to one accumulator (weights in place, the
# time-gate terms as one row each), flattened once when the pass reaches the parameters
# (:class:`_ParameterToken`): autograd then sums one gradient instead of five per layer and
# evaluation.


class ConcatSquashConvNet(nn.Module):
    """Convolutional dynamics for images: 3x3 concat-squash convolutions ``C -> hidden... -> C``
    (FFJORD / InfoCNF 002 appendix B: 3 layers of 64 filters, softplus).

    ``channels_last``: run the convolutions on channels-last (NHWC) activations. oneDNN's kernel
    for one 64-channel 3x3 convolution at 32x64x28x28 is ~1.5x faster in that layout on CPU, but a
    whole training iteration of FFJORD's MNIST model was not faster (the layout copies and the
    double-backward convolutions eat the gain; ``benchmarks/results/speed_images.json``), so it is
    off by default. The output is contiguous (NCHW) either way; the values agree to rounding
    (``tests/cnf/test_conv_dynamics.py``).

    :meth:`forward_with_tangent` gives ``(f, (df/dz) v)`` in one pass, for Hutchinson's
    estimator by forward mode (:class:`~fastcnf.cnf.divergence.Hutchinson` ``mode="jvp"``).
    """

    per_example_time = True

    def __init__(self, channels: int, hidden_dims: Sequence[int] = (64, 64, 64), activation: str = "softplus",
                 channels_last: bool = False) -> None:
        super().__init__()
        dims = [channels, *hidden_dims, channels]
        self.layers = nn.ModuleList(ConcatSquashConv2d(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.acts = nn.ModuleList(make_activation(activation) for _ in hidden_dims)
        self.channels_last = channels_last

    def _layout(self, h: Tensor) -> Tensor:
        # a no-op for a tensor already in the layout; a 1-channel map is stored alike in both
        return h.contiguous(memory_format=torch.channels_last) if self.channels_last and h.dim() == 4 else h

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        if not self.channels_last:
            return _stack_forward(self.layers, self.acts, t, z)
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(t, self._layout(h))
            if i < len(self.acts):
                h = self.acts[i](h)
        return h.contiguous()

    def forward_with_tangent(self, t: Tensor, z: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """``(f(t, z), (df/dz) v)``: the Jacobian-vector product by forward mode, in one pass.

        The tangent ``u`` goes through the layers with the activations ``h``, stacked on the batch
        dimension so that each layer is one convolution of ``[h; u]`` (twice the batch): a layer
        maps ``u`` to ``conv(u) * gate`` (no bias: the bias and the time terms do not depend on
        z), an activation to ``u * act'(pre)``. Differentiable by autograd with first derivatives
        only, where the reverse-mode estimator ``e^T df/dz`` needs second derivatives of the
        convolutions and activations in the adjoint's backward pass.
        """
        b = z.shape[0]
        s = torch.cat([z, v.to(z.dtype)])
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            conv = layer.layer
            tt = t.reshape(1, 1).to(conv.weight.dtype)
            gate = torch.sigmoid(layer.hyper_gate(tt)).view(1, -1, 1, 1)
            fold = torch.addcmul(layer.hyper_bias(tt).view(1, -1, 1, 1), conv.bias.view(1, -1, 1, 1), gate)
            m = F.conv2d(self._layout(s), conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
            pre = torch.addcmul(fold, m[:b], gate)
            tangent = m[b:] * gate
            if i == n - 1:
                return pre.contiguous(), tangent.contiguous()
            act = self.acts[i]
            h = act(pre)
            s = torch.cat([h, tangent * _act_slope(act, pre, h, pre.new_ones(()))])
        raise AssertionError("unreachable")  # pragma: no cover
