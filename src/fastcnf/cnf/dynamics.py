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
import torch.nn.functional as F
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

        The tangent of layer output j w.r.t. input coordinate k is carried as ``tan[k, b, j]``,
        stacked under the activations ``h[b, j]`` so that each layer is one matrix product; a
        layer maps it by ``W`` scaled by the time gate, an activation by its derivative. The
        backward pass is written out by hand (:class:`_ConcatSquashTrace`): the same derivatives
        autograd would form, without recording some forty operations per evaluation.
        """
        if z.dim() != 2 or len(self.layers) < 2:
            return self._trace_forward_autograd(t, z)
        params = [p for layer in self.layers for p in _layer_params(layer)]
        needs_graph = torch.is_grad_enabled() and (
            z.requires_grad or t.requires_grad or any(p.requires_grad for p in params))
        if not needs_graph:
            with torch.no_grad():
                f, trace, _ = _trace_forward_kernel(self.acts, t, z, params, save=False)
            return f, trace
        return _ConcatSquashTrace.apply(self.acts, t, z, *params)

    def _trace_forward_autograd(self, t: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """Reference implementation of :meth:`trace_forward` through autograd (any depth)."""
        params = [p for layer in self.layers for p in _layer_params(layer)]
        return _trace_reference(self.acts, t, z, params)


# ---- the fused forward-mode trace and its hand-written backward ----------------------------------
#
# Notation (one concat-squash layer l, inputs of width m, outputs of width n, D = data dimension):
#   g = sigmoid(G t + g0), c = H t                    (time gate and time bias, (n,))
#   P = (S W^T) * g + [b * g + c; 0; ...; 0]           (S stacks the activations over the D tangents)
#   h = act(P[0]),  U_k = P[1 + k] * act'(P[0])       (hidden layers)
# The first layer's tangents are W^T * g, the same for every example; the last layer only needs
# the diagonal of its tangent block: trace = sum_k P[1 + k][:, k].


def _layer_params(layer: "ConcatSquashLinear") -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return (layer.layer.weight, layer.layer.bias, layer.hyper_gate.weight, layer.hyper_gate.bias,
            layer.hyper_bias.weight)


def _trace_reference(acts, t: Tensor, z: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``(f, trace)`` by tangent propagation in differentiable torch operations (any depth)."""
    b, d = z.shape
    tt = t.reshape(1, 1).to(params[0].dtype)
    h = z
    tan = None  # (B, D, width); the first layer's tangent is W^T scaled by the gate
    n_layers = len(params) // 5
    for i in range(n_layers):
        w, bias, wg, bg, wc = params[5 * i:5 * i + 5]
        gate = torch.sigmoid(F.linear(tt, wg, bg))
        h = F.linear(h, w, bias) * gate + F.linear(tt, wc)
        if tan is None:
            tan = (w.t() * gate).unsqueeze(0).expand(b, d, -1)
        else:
            tan = torch.matmul(tan, w.t()) * gate
        if i < len(acts):
            pre = h
            h = acts[i](pre)
            tan = tan * _activation_derivative(acts[i], pre, h).unsqueeze(1)
    trace = torch.diagonal(tan, dim1=1, dim2=2).sum(-1)
    return h, trace


def _act_into(act: nn.Module, pre: Tensor, out: Tensor) -> Tensor:
    """``out[...] = act(pre)``; returns ``out``."""
    if isinstance(act, nn.Tanh):
        return torch.tanh(pre, out=out)
    return out.copy_(act(pre))


def _act_slope(act: nn.Module, pre: Tensor, post: Tensor) -> Tensor:
    """``act'(pre)`` elementwise (``post = act(pre)``); torch's own conventions at the kinks."""
    if isinstance(act, nn.Tanh):
        return torch.mul(post, post).neg_().add_(1.0)
    if isinstance(act, nn.Softplus):
        # torch's softplus is linear above its threshold: slope 1 there
        bp = pre * act.beta
        return torch.where(bp > act.threshold, torch.ones_like(bp), torch.sigmoid(bp))
    return _activation_derivative(act, pre, post)


def _act_grad_pre(act: nn.Module, grad_post: Tensor, slope: Tensor, pre: Tensor, post: Tensor,
                  grad_slope: Tensor) -> Tensor:
    """Gradient w.r.t. ``pre`` of ``<grad_post, act(pre)> + <grad_slope, act'(pre)>``."""
    if isinstance(act, nn.Tanh):  # act'' = -2 act act'
        return slope * torch.addcmul(grad_post, post, grad_slope, value=-2)
    if isinstance(act, nn.Softplus):
        bp = pre * act.beta
        curv = torch.where(bp > act.threshold, torch.zeros_like(bp), act.beta * slope * (1 - slope))
    elif isinstance(act, nn.ReLU):
        curv = torch.zeros_like(pre)
    elif isinstance(act, nn.ELU):
        curv = torch.where(pre > 0, torch.zeros_like(pre), post + act.alpha)
    elif isinstance(act, nn.SiLU):
        sg = torch.sigmoid(pre)
        curv = sg * (1 - sg) * (2 + pre * (1 - 2 * sg))
    else:
        raise TypeError(f"no derivative for activation {type(act).__name__}")
    return grad_post * slope + grad_slope * curv


def _trace_forward_kernel(acts, t: Tensor, z: Tensor, params: Sequence[Tensor], save: bool):
    """``(f, trace, saved)`` without autograd; ``saved`` holds what the backward pass needs."""
    n_layers = len(params) // 5
    b, d = z.shape
    # the time gates and time biases of all layers in three operations
    sizes = [params[5 * i + 1].shape[0] for i in range(n_layers)]
    wg = torch.cat([params[5 * i + 2] for i in range(n_layers)]).view(-1)
    wc = torch.cat([params[5 * i + 4] for i in range(n_layers)]).view(-1)
    bg = torch.cat([params[5 * i + 3] for i in range(n_layers)])
    gate_all = torch.sigmoid(torch.addcmul(bg, wg, t))
    bias_all = wc * t
    gates = gate_all.split(sizes)
    biases = bias_all.split(sizes)
    # layer 1: the tangents W^T * g do not depend on the example
    w, bias = params[0], params[1]
    wt = w.t()
    g = gates[0]
    a = torch.addmm(bias, z, wt)
    pre = torch.addcmul(biases[0], a, g)
    tan1 = wt * g  # (D, n)
    s = torch.empty((1 + d, b, pre.shape[1]), dtype=z.dtype, device=z.device)
    h = _act_into(acts[0], pre, s[0])
    slope = _act_slope(acts[0], pre, h)
    torch.mul(tan1.unsqueeze(1), slope, out=s[1:])
    hidden = []
    # hidden layers 2 .. L-1: s = [h; tangents] goes through W as one matrix product
    for i in range(1, n_layers - 1):
        w, bias = params[5 * i], params[5 * i + 1]
        g = gates[i]
        m = torch.mm(s.view(-1, s.shape[-1]), w.t()).view(1 + d, b, -1)
        p = m * g
        p0 = p[0]
        p0.add_(torch.addcmul(biases[i], bias, g))
        s_next = torch.empty_like(p)
        h_i = _act_into(acts[i], p0, s_next[0])
        slope_i = _act_slope(acts[i], p0, h_i)
        torch.mul(p[1:], slope_i, out=s_next[1:])
        if save:
            hidden.append((s, m, p, h_i, slope_i))
        s = s_next
    # last layer: f from the activations, the trace from the diagonal of the tangent block
    i = n_layers - 1
    w, bias = params[5 * i], params[5 * i + 1]
    g = gates[i]
    m = torch.mm(s.view(-1, s.shape[-1]), w.t()).view(1 + d, b, d)
    f = torch.addcmul(torch.addcmul(biases[i], bias, g), m[0], g)
    diag = torch.diagonal(m[1:], dim1=0, dim2=2)  # (B, D): d f_k / d z_k before the gate
    trace = torch.mv(diag, g)
    saved = None
    if save:
        saved = {"gates": (gate_all, gates, wg, wc, sizes), "first": (z, a, tan1, pre, h, slope),
                 "hidden": hidden, "last": (s, m, diag)}
    return f, trace, saved


def _trace_backward_kernel(acts, t: Tensor, params: Sequence[Tensor], saved: dict, grad_f: Tensor,
                           grad_trace: Tensor, need_z: bool, need_t: bool):
    """Gradients of ``<grad_f, f> + <grad_trace, trace>`` w.r.t. z, t and the parameters."""
    n_layers = len(params) // 5
    gate_all, gates, wg_all, wc_all, sizes = saved["gates"]
    grads: list[Tensor | None] = [None] * len(params)
    # d/d gate and d/d time-bias of every layer, filled layer by layer
    grad_gate_all = torch.empty_like(gate_all)
    grad_bias_all = torch.empty_like(gate_all)
    grad_gate = grad_gate_all.split(sizes)
    grad_bias = grad_bias_all.split(sizes)

    # last layer: f = m[0] * g + (b g + c),  trace = diag(m[1:]) @ g
    i = n_layers - 1
    w, bias = params[5 * i], params[5 * i + 1]
    g = gates[i]
    s, m, diag = saved["last"]
    d = m.shape[-1]
    grad_m = torch.zeros_like(m)
    torch.mul(grad_f, g, out=grad_m[0])
    torch.diagonal(grad_m[1:], dim1=0, dim2=2).copy_(torch.outer(grad_trace, g))
    grad_f_sum = torch.sum(grad_f, 0, out=grad_bias[i])
    torch.addmv(torch.addcmul((grad_f * m[0]).sum(0), bias, grad_f_sum), diag.t(), grad_trace, out=grad_gate[i])
    grads[5 * i] = torch.mm(grad_m.view(-1, d).t(), s.view(-1, s.shape[-1]))
    grads[5 * i + 1] = g * grad_f_sum
    grad_s = torch.mm(grad_m.view(-1, d), w).view(s.shape)
    # hidden layers, last to first: s_next = [act(p[0]); p[1:] * act'(p[0])],  p = m * g + [b g + c; 0]
    for i in range(n_layers - 2, 0, -1):
        s, m, p, h, slope = saved["hidden"][i - 1]
        w, bias = params[5 * i], params[5 * i + 1]
        g = gates[i]
        grad_tan = grad_s[1:]
        grad_p = torch.empty_like(p)
        torch.mul(grad_tan, slope, out=grad_p[1:])
        grad_p[0] = _act_grad_pre(acts[i], grad_s[0], slope, p[0], h, (grad_tan * p[1:]).sum(0))
        grad_p0_sum = torch.sum(grad_p[0], 0, out=grad_bias[i])
        torch.addcmul((grad_p * m).sum((0, 1)), bias, grad_p0_sum, out=grad_gate[i])
        grad_m = grad_p.mul_(g)
        width = grad_m.shape[-1]
        grads[5 * i] = torch.mm(grad_m.view(-1, width).t(), s.view(-1, s.shape[-1]))
        grads[5 * i + 1] = g * grad_p0_sum
        grad_s = torch.mm(grad_m.view(-1, width), w).view(s.shape)
    # first layer: pre = a * g + c with a = z W^T + b; tangents tan1 = W^T * g
    z, a, tan1, pre, h, slope = saved["first"]
    w = params[0]
    g = gates[0]
    grad_tan = grad_s[1:]
    grad_tan1 = (grad_tan * slope).sum(1)  # (D, n)
    grad_pre = _act_grad_pre(acts[0], grad_s[0], slope, pre, h, (grad_tan * tan1.unsqueeze(1)).sum(0))
    grad_a = grad_pre * g
    torch.sum(grad_pre, 0, out=grad_bias[0])
    torch.add((grad_pre * a).sum(0), (grad_tan1 * w.t()).sum(0), out=grad_gate[0])
    grads[0] = torch.addmm((grad_tan1 * g).t(), grad_a.t(), z)
    grads[1] = grad_a.sum(0)
    grad_z = torch.mm(grad_a, w) if need_z else None
    # the time gate sigmoid(G t + g0) and time bias H t of every layer at once
    grad_gate_pre = grad_gate_all * torch.addcmul(gate_all, gate_all, gate_all, value=-1)
    grad_g_w = (grad_gate_pre * t).unsqueeze(1).split(sizes)
    grad_g_b = grad_gate_pre.split(sizes)
    grad_c_w = (grad_bias_all * t).unsqueeze(1).split(sizes)
    for i in range(n_layers):
        grads[5 * i + 2], grads[5 * i + 3], grads[5 * i + 4] = grad_g_w[i], grad_g_b[i], grad_c_w[i]
    grad_t = (torch.dot(grad_gate_pre, wg_all) + torch.dot(grad_bias_all, wc_all)) if need_t else None
    return grad_z, grad_t, grads


class _ConcatSquashTrace(torch.autograd.Function):
    """``(f, trace)`` of a concat-squash MLP with the backward pass written out.

    Inputs: the activation modules, ``t``, ``z`` and the five parameters of every layer
    (weight, bias, gate weight, gate bias, time-bias weight). A backward pass that must itself
    be differentiable (``create_graph=True``, e.g. the Jacobian-Frobenius regulariser's
    vector-Jacobian product) recomputes through :func:`_trace_reference` instead.
    """

    @staticmethod
    def forward(ctx, acts, t, z, *params):  # type: ignore[override]
        # autograd is off inside forward: the kernel records nothing
        f, trace, saved = _trace_forward_kernel(acts, t, z, params, save=True)
        ctx.acts = acts
        ctx.saved = saved
        ctx.save_for_backward(t, z, *params)
        return f, trace

    @staticmethod
    def backward(ctx, grad_f, grad_trace):  # type: ignore[override]
        t, z, *params = ctx.saved_tensors
        need_t, need_z = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        need_params = ctx.needs_input_grad[3:]
        if grad_f is None:
            grad_f = torch.zeros_like(ctx.saved["last"][1][0])
        if grad_trace is None:
            grad_trace = torch.zeros(grad_f.shape[0], dtype=grad_f.dtype, device=grad_f.device)
        if torch.is_grad_enabled():  # create_graph: differentiate a differentiable recomputation
            inputs = [x for x, need in zip([t, z, *params], [need_t, need_z, *need_params]) if need]
            with torch.enable_grad():
                f, trace = _trace_reference(ctx.acts, t, z, params)
                grads_iter = iter(torch.autograd.grad((f, trace), inputs, (grad_f, grad_trace),
                                                      create_graph=True, allow_unused=True))
            out = [next(grads_iter) if need else None for need in [need_t, need_z, *need_params]]
            return (None, *out)
        grad_z, grad_t, grads = _trace_backward_kernel(ctx.acts, t, params, ctx.saved, grad_f, grad_trace,
                                                       need_z=need_z, need_t=need_t)
        grads = [gr if need else None for gr, need in zip(grads, need_params)]
        return (None, grad_t.reshape(t.shape) if grad_t is not None else None, grad_z, *grads)


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
