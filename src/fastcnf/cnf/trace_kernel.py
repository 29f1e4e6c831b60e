"""The exact trace of a concat-squash MLP's Jacobian by forward-mode tangent propagation, with a
hand-written backward pass (Grathwohl et al. 2019, "FFJORD", appendix B, for the layers).

The identity's D columns are pushed through the layers together with the activations, in one
fused pass (D extra rows per example): for the small dimensions of tabular/toy data this is much
cheaper than D autograd passes. The backward pass is written out (the derivatives autograd would
form, checked against it in ``tests/cnf/test_dynamics.py``) and the parameters' gradient of all
evaluations of a solve is gathered once (:class:`_Accumulator`): on FFJORD's toy problem the
operation count, not the arithmetic, sets the time. :mod:`fastcnf.cnf.fused` calls the kernel
directly for a whole solve.
"""
from __future__ import annotations

import math
import weakref
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcnf.cnf.activations import activation_derivative

def _layer_params(layer: nn.Module) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return (layer.layer.weight, layer.layer.bias, layer.hyper_gate.weight, layer.hyper_gate.bias,
            layer.hyper_bias.weight)


def _trace_reference(acts, t: Tensor, z: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``(f, trace)`` by tangent propagation in differentiable torch operations (any depth);
    ``params`` holds (weight, bias, gate weight, gate bias, time-bias weight) per layer."""
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
            tan = tan * activation_derivative(acts[i], pre, h).unsqueeze(1)
    trace = torch.diagonal(tan, dim1=1, dim2=2).sum(-1)
    return h, trace


def _act_into(act: nn.Module, pre: Tensor, out: Tensor) -> Tensor:
    """``out[...] = act(pre)``; returns ``out``."""
    if isinstance(act, nn.Tanh):
        return torch.tanh(pre, out=out)
    return out.copy_(act(pre))


def _act_slope(act: nn.Module, pre: Tensor, post: Tensor, one: Tensor) -> Tensor:
    """``act'(pre)`` elementwise (``post = act(pre)``); torch's own conventions at the kinks."""
    if isinstance(act, nn.Tanh):
        return torch.addcmul(one, post, post, value=-1)
    if isinstance(act, nn.Softplus):  # linear above its threshold: slope 1 there
        bp = pre * act.beta
        return torch.where(bp > act.threshold, torch.ones_like(bp), torch.sigmoid(bp))
    return activation_derivative(act, pre, post)


def _act_grad_pre(act: nn.Module, grad_post: Tensor, slope: Tensor, pre: Tensor, post: Tensor,
                  grad_slope: Tensor, out: Tensor | None = None) -> Tensor:
    """Gradient w.r.t. ``pre`` of ``<grad_post, act(pre)> + <grad_slope, act'(pre)>`` (into ``out``)."""
    if isinstance(act, nn.Tanh):  # act'' = -2 act act'
        return torch.mul(slope, torch.addcmul(grad_post, post, grad_slope, value=-2), out=out)
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
    grad = grad_post * slope + grad_slope * curv
    return grad if out is None else out.copy_(grad)


class _Packed:
    """The parameters of a :class:`ConcatSquashMLP` as one flat tensor, for one parameter version.

    Layout: all weights (flattened), all biases, all gate weights, all gate biases, all
    time-bias weights, layer by layer; so the time gates of every layer come from three
    contiguous segments. Evaluations take the flat tensor through :attr:`token` (one autograd
    input instead of five per layer) and add their share of its gradient to one accumulator.
    """

    def __init__(self, net: nn.Module, grad: bool, slots: list) -> None:
        layers = list(net.layers)
        self.grad, self.slots = grad, slots
        self.params = [m._parameters[n] for m, n in slots]
        self.versions = [p._version for p in self.params]
        self.requires_grad = [p.requires_grad for p in self.params]
        self.first_ptr = self.params[0].data_ptr()
        self.acts = tuple(net.acts)
        self.sizes = [layer.layer.out_features for layer in layers]
        order = ([layer.layer.weight for layer in layers] + [layer.layer.bias for layer in layers]
                 + [layer.hyper_gate.weight for layer in layers] + [layer.hyper_gate.bias for layer in layers]
                 + [layer.hyper_bias.weight for layer in layers])
        self.shapes = [p.shape for p in order]
        flat = torch.cat([p.reshape(-1) for p in order])
        self.n_weights = sum(p.numel() for p in order[:len(layers)])
        self.token = _ParameterToken.apply(flat, self) if flat.requires_grad else None
        self.one = torch.ones((), dtype=flat.dtype, device=flat.device)
        self.flat = flat.detach()
        self.views(self.flat)
        self.acc: _Accumulator | None = None
        self.last_index: int | None = None
        self.count = 0

    def split(self, flat: Tensor) -> list[Tensor]:
        """The parameters (in layout order, original shapes) as views of ``flat``."""
        return [v.view(shape) for v, shape in zip(flat.split([math.prod(s) for s in self.shapes]), self.shapes)]

    def views(self, flat: Tensor) -> None:
        n = len(self.sizes)
        parts = self.split(flat)
        self.weights = parts[:n]
        self.weights_t = [w.t().contiguous() for w in self.weights]  # contiguous: faster products
        total = sum(self.sizes)
        start = self.n_weights
        self.bias_all = flat[start:start + total]
        self.wg_all = flat[start + total:start + 2 * total]
        self.bg_all = flat[start + 2 * total:start + 3 * total]
        self.wc_all = flat[start + 3 * total:start + 4 * total]

    def layer_params(self, flat: Tensor) -> list[Tensor]:
        """Differentiable per-layer ``(weight, bias, gate weight, gate bias, time-bias weight)``."""
        n = len(self.sizes)
        parts = self.split(flat)
        return [parts[k * n + i] for i in range(n) for k in range(5)]

    def accumulator(self, index: int) -> "_Accumulator":
        # evaluations run backward in decreasing creation order within one backward pass; a larger
        # index than the last one means a new pass, after one that did not reach the parameters
        if self.acc is None or (self.last_index is not None and index > self.last_index):
            self.acc = _Accumulator(self)
        self.last_index = index
        return self.acc

    def take_gradient(self) -> Tensor | None:
        acc, self.acc, self.last_index = self.acc, None, None
        return None if acc is None or not acc.rows else acc.flat_gradient(self)


def _get_packed(net: nn.Module) -> _Packed:
    """The packed parameters of ``net`` for their current values and the current grad mode
    (rebuilt after an optimiser step, a load, a change of dtype or device, a new parameter)."""
    grad = torch.is_grad_enabled()
    packed = _PACKED.get(net)
    if packed is not None and packed.grad == grad and packed.first_ptr == packed.params[0].data_ptr():
        for (m, n), p, version, requires_grad in zip(packed.slots, packed.params, packed.versions,
                                                     packed.requires_grad):
            if m._parameters[n] is not p or p._version != version or p.requires_grad != requires_grad:
                break
        else:
            return packed
    slots = _SLOTS.get(net)
    if slots is None:  # (module, name) of every parameter: ``net.parameters()`` walks the module tree
        slots = [(m, n) for m in net.modules() for n, p in m._parameters.items() if p is not None]
        _SLOTS[net] = slots
    packed = _Packed(net, grad, slots)
    _PACKED[net] = packed
    return packed


_SLOTS: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()
_PACKED: "weakref.WeakKeyDictionary[nn.Module, _Packed]" = weakref.WeakKeyDictionary()


def _trace_forward_kernel(acts, pk: _Packed, t: Tensor, z: Tensor, save: bool):
    """``(f, trace, saved)`` without autograd; ``saved`` holds what the backward pass needs (None
    without ``save``: then the leaner :func:`trace_rows_kernel` computes ``f`` and the trace)."""
    if not save:
        f, trace = trace_rows_kernel(pk, t, z)
        return f, trace, None
    n_layers = len(pk.sizes)
    b, d = z.shape
    gate_all = torch.sigmoid(torch.addcmul(pk.bg_all, pk.wg_all, t))
    fold_all = torch.addcmul(pk.wc_all * t, pk.bias_all, gate_all)  # b * g + c
    gates = torch.split_with_sizes(gate_all, pk.sizes)
    folds = torch.split_with_sizes(fold_all, pk.sizes)
    # layer 1: the tangents W^T * g do not depend on the example
    g = gates[0]
    a = torch.mm(z, pk.weights_t[0])
    pre = torch.addcmul(folds[0], a, g)
    tan1 = pk.weights_t[0] * g  # (D, n)
    s = torch.empty((1 + d, b, pre.shape[1]), dtype=z.dtype, device=z.device)
    h = _act_into(acts[0], pre, s[0])
    slope = _act_slope(acts[0], pre, h, pk.one)
    torch.mul(tan1.unsqueeze(1), slope, out=s[1:])
    saved = [(z, a, tan1, pre, h, slope)] if save else None
    # hidden layers 2 .. L-1: s = [h; tangents] goes through W as one matrix product
    for i in range(1, n_layers - 1):
        g = gates[i]
        m = torch.mm(s.view(-1, s.shape[-1]), pk.weights_t[i]).view(1 + d, b, -1)
        p = m * g
        p0 = p[0]
        p0.add_(folds[i])
        s_next = torch.empty_like(p)
        h = _act_into(acts[i], p0, s_next[0])
        slope = _act_slope(acts[i], p0, h, pk.one)
        torch.mul(p[1:], slope, out=s_next[1:])
        if save:
            saved.append((s, m, p, h, slope))
        s = s_next
    # last layer: f from the activations, the trace from the diagonal of the tangent block
    g = gates[-1]
    m = torch.mm(s.view(-1, s.shape[-1]), pk.weights_t[-1]).view(1 + d, b, d)
    m0 = m[0]
    f = torch.addcmul(folds[-1], m0, g)
    diag = torch.diagonal(m[1:], dim1=0, dim2=2)  # (B, D): d f_k / d z_k before the gate
    trace = torch.mv(diag, g)
    if save:
        saved.append((s, m0, diag))
        saved.append((t, gate_all, gates))
    return f, trace, saved


def _folded_products(pk: _Packed) -> tuple[Tensor, Tensor | None]:
    """The constant products :func:`trace_rows_kernel` multiplies by, cached on ``pk`` (one
    parameter version): ``first[k] = W1[:, k, None] * W2^T`` (layer 2 applied to the first layer's
    k-th Jacobian column, ``(D, n1, n2)``; with only two hidden layers also scaled by the output
    row ``W3[k]``), ``last[k] = W_{L-1}^T * W_L[k]`` (the last hidden layer followed by output k's
    row, ``(D, n_{L-2}, n_{L-1})``; None below four layers). With one hidden layer ``first`` is
    ``W2 * W1^T`` (``(D, n1)``: output k's weight on unit j times unit j's weight on input k)."""
    cached = getattr(pk, "_folded", None)
    if cached is not None:
        return cached
    w = pk.weights
    n = len(w)
    if n == 2:
        folded = (w[1] * w[0].t(), None)
    else:
        first = w[0].t().unsqueeze(2) * pk.weights_t[1].unsqueeze(0)  # (D, n1, n2)
        if n == 3:
            folded = ((first * w[2].unsqueeze(1)).contiguous(), None)
        else:
            folded = (first.contiguous(), (pk.weights_t[-2].unsqueeze(0) * w[-1].unsqueeze(1)).contiguous())
    pk._folded = folded
    return folded


def trace_rows_kernel(pk: _Packed, t: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """``(f, tr df/dz)`` of the packed network with one time per row (``t`` of shape ``(B,)``, or a
    scalar for all rows), no autograd.

    The concat-squash gates ``g_l = sigmoid(G_l t + g0_l)`` and shifts become ``(B, width)``. With
    ``s_l = act'(pre_l) * g_l`` the Jacobian is ``diag(g_L) W_L diag(s_{L-1}) W_{L-1} ... diag(s_1) W_1``;
    its ``D`` columns are carried as tangents ``(D, B, width)``, in fewer passes over them than one
    product and one elementwise scaling per layer: the first layer's columns ``s_1 * W1[:, k]`` are
    never formed (``W2 diag(s_1) W1[:, k] = s_1 @ (W1[:, k, None] * W2^T)``, one product with a
    constant ``(n1, n2)`` matrix per k), the last hidden layer's product carries output k's row of
    ``W_L`` (``W_L[k] diag(s) W_{L-1} u = s . (u @ (W_{L-1}^T * W_L[k]))``), so the trace is one
    contraction ``sum_k g_L[k] sum_j s_{L-1}[j] m_k[j]`` of the last product with ``s_{L-1}``; the
    layers between scale the tangents in place. :func:`_folded_products` holds the constant
    products."""
    acts = pk.acts
    n_layers = len(pk.sizes)
    wt = pk.weights_t
    t = t.reshape(-1, 1).to(z.dtype)
    # each layer's gate and time shift contiguous, (B or 1, width): strided views of one
    # (B, sum widths) block slow every elementwise operation that reads them
    gates, shifts = [], []
    for wg, bg, wc in zip(*(v.split(pk.sizes) for v in (pk.wg_all, pk.bg_all, pk.wc_all))):
        gates.append(torch.sigmoid(torch.addcmul(bg, wg, t)))
        shifts.append(wc * t)
    biases = pk.bias_all.split(pk.sizes)
    first, last = _folded_products(pk)

    def affine(i: int, x: Tensor) -> Tensor:
        """Layer ``i``'s output ``(x W^T + b) * g + c t``."""
        return torch.addcmul(shifts[i], torch.addmm(biases[i], x, wt[i]), gates[i])

    def layer(i: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """Hidden layer ``i`` (0-based): its activations and ``act'(pre) * gate``."""
        pre = affine(i, x)
        h = _act_into(acts[i], pre, torch.empty_like(pre))
        return h, _act_slope(acts[i], pre, h, pk.one).mul_(gates[i])

    h, s = layer(0, z)
    if n_layers == 2:
        trace = (torch.mm(gates[1].expand(z.shape[0], -1), first) * s).sum(1)
        return affine(1, h), trace
    tan = torch.matmul(s, first)  # (D, B, n2): layer 2 applied to the first layer's Jacobian columns
    for i in range(1, n_layers - 1):
        h_next, s_next = layer(i, h)
        if i < n_layers - 2:
            tan = tan.mul_(s_next)  # the columns after layer i + 1's activation
            shape = tan.shape
            if i + 1 == n_layers - 2:
                tan = torch.bmm(tan, last)  # with output k's row of W_L folded in
            else:
                tan = torch.mm(tan.view(-1, shape[-1]), wt[i + 1]).view(shape[0], shape[1], -1)
        h, s = h_next, s_next
    f = affine(n_layers - 1, h)
    # trace = sum_k g_L[k] sum_j s[j] m_k[j] (m_k: the last product's k-th tangent, W_L[k] folded in)
    q = torch.bmm(tan.transpose(0, 1), s.unsqueeze(2)).squeeze(2)  # (B, D)
    trace = (q * gates[-1]).sum(1)
    return f, trace


def _trace_backward(acts, pk: _Packed, saved: list, grad_f: Tensor, grad_trace: Tensor, acc: "_Accumulator | None",
                    need_t: bool) -> tuple[Tensor, Tensor | None]:
    """The gradients w.r.t. z (and t) of ``<grad_f, f> + <grad_trace, trace>``; the parameters'
    share is added to ``acc`` (weights in place, the time-gate terms as one row per evaluation)."""
    t, gate_all, gates = saved[-1]
    n_layers = len(pk.sizes)
    row_gate = row_fold = None
    if acc is not None or need_t:
        row_gate = torch.empty_like(gate_all)  # d/d gate of every layer
        row_fold = torch.empty_like(gate_all)  # d/d (b g + c) of every layer
        rg, rf = torch.split_with_sizes(row_gate, pk.sizes), torch.split_with_sizes(row_fold, pk.sizes)
    # last layer: f = m0 * g + v, trace = diag(m[1:]) @ g
    s, m0, diag = saved[-2]
    g = gates[-1]
    grad_m = torch.zeros_like(s[:, :, :m0.shape[1]])
    torch.mul(grad_f, g, out=grad_m[0])
    torch.diagonal(grad_m[1:], dim1=0, dim2=2).copy_(torch.outer(grad_trace, g))
    grad_m2 = grad_m.view(-1, grad_m.shape[-1])
    if row_gate is not None:
        torch.addmv(torch.sum(grad_f * m0, 0), diag.t(), grad_trace, out=rg[-1])
        torch.sum(grad_f, 0, out=rf[-1])
    if acc is not None:
        acc.weights_t[-1].addmm_(s.view(-1, s.shape[-1]).t(), grad_m2)
    grad_s = torch.mm(grad_m2, pk.weights[-1]).view(s.shape)
    # hidden layers, last to first: s_next = [act(p[0]); p[1:] * act'(p[0])],  p = m * g + [v; 0]
    for i in range(n_layers - 2, 0, -1):
        s, m, p, h, slope = saved[i]
        grad_tan = grad_s[1:]
        grad_p = torch.empty_like(p)
        torch.mul(grad_tan, slope, out=grad_p[1:])
        grad_p0 = _act_grad_pre(acts[i], grad_s[0], slope, p[0], h, (grad_tan * p[1:]).sum(0), out=grad_p[0])
        if row_gate is not None:
            torch.sum(grad_p * m, (0, 1), out=rg[i])
            torch.sum(grad_p0, 0, out=rf[i])
        grad_m2 = grad_p.mul_(gates[i]).view(-1, grad_p.shape[-1])
        if acc is not None:
            acc.weights_t[i].addmm_(s.view(-1, s.shape[-1]).t(), grad_m2)
        grad_s = torch.mm(grad_m2, pk.weights[i]).view(s.shape)
    # first layer: pre = a * g + v with a = z W^T; tangents tan1 = W^T * g
    z, a, tan1, pre, h, slope = saved[0]
    g = gates[0]
    grad_tan = grad_s[1:]
    grad_pre = _act_grad_pre(acts[0], grad_s[0], slope, pre, h, (grad_tan * tan1.unsqueeze(1)).sum(0))
    grad_a = grad_pre * g
    if row_gate is not None:
        grad_tan1 = (grad_tan * slope).sum(1)  # (D, n): d/d tan1
        torch.add(torch.sum(grad_pre * a, 0), (grad_tan1 * pk.weights_t[0]).sum(0), out=rg[0])
        torch.sum(grad_pre, 0, out=rf[0])
        if acc is not None:
            acc.weights_t[0].addmm_(z.t(), grad_a).add_(grad_tan1 * g)
            acc.add_row(row_gate, row_fold, t, gate_all)
    grad_z = torch.mm(grad_a, pk.weights[0])
    grad_t = None
    if need_t:  # through every layer's gate sigmoid(G t + g0) and time bias H t
        grad_gate_pre = torch.addcmul(row_gate, row_fold, pk.bias_all) * torch.addcmul(gate_all, gate_all, gate_all,
                                                                                       value=-1)
        grad_t = grad_gate_pre @ pk.wg_all + row_fold @ pk.wc_all
    return grad_z, grad_t


class _Accumulator:
    """The parameter gradient of the evaluations of one backward pass, before it is flattened."""

    def __init__(self, pk: _Packed) -> None:
        self.weights_t = [torch.zeros_like(w) for w in pk.weights_t]  # transposed weight gradients
        self.rows: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []

    def add_row(self, row_gate: Tensor, row_fold: Tensor, t: Tensor, gate_all: Tensor) -> None:
        self.rows.append((row_gate, row_fold, t, gate_all))

    def flat_gradient(self, pk: _Packed) -> Tensor:
        """In the packed layout: weights, biases (v = b g + c: d/db = g dL/dv), gate weights and
        biases (through sigmoid(G t + g0)), time-bias weights (c = H t)."""
        row_gate, row_fold, times, gate_all = (torch.stack(x) for x in zip(*self.rows))
        times = times.reshape(-1).to(gate_all.dtype)
        grad_gate_pre = torch.addcmul(row_gate, row_fold, pk.bias_all) * torch.addcmul(gate_all, gate_all, gate_all,
                                                                                       value=-1)
        return torch.cat([*(w.t().reshape(-1) for w in self.weights_t), (row_fold * gate_all).sum(0),
                          times @ grad_gate_pre, grad_gate_pre.sum(0), times @ row_fold])


class _ParameterToken(torch.autograd.Function):
    """Identity on the flat parameters; its backward, which runs after every evaluation's,
    adds the parameter gradient of all of them, formed at once."""

    @staticmethod
    def forward(ctx, flat, packed):  # type: ignore[override]
        ctx.packed = packed
        return flat.view_as(flat)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        with torch.no_grad():
            extra = ctx.packed.take_gradient()
        if extra is not None:
            grad = extra if grad is None else grad + extra
        return grad, None


class _ConcatSquashTrace(torch.autograd.Function):
    """``(f, trace)`` of a concat-squash MLP with the backward pass written out.

    Inputs: the activation modules, the packed parameters, ``t``, ``z`` and the packed
    parameters' token. A backward pass that must itself be differentiable (``create_graph=True``,
    e.g. the Jacobian-Frobenius regulariser's vector-Jacobian product) recomputes through
    :func:`_trace_reference` instead.
    """

    @staticmethod
    def forward(ctx, acts, packed, t, z, token):  # type: ignore[override]
        f, trace, saved = _trace_forward_kernel(acts, packed, t, z, save=True)
        ctx.acts, ctx.packed, ctx.saved = acts, packed, saved
        ctx.index = packed.count
        packed.count += 1
        # inputs only (no reference cycle); needed by the differentiable (create_graph) backward
        ctx.inputs = (t, z, token)
        return f, trace

    @staticmethod
    def backward(ctx, grad_f, grad_trace):  # type: ignore[override]
        t, z, token = ctx.inputs
        need_t, need_z, need_p = ctx.needs_input_grad[2:5]
        pk = ctx.packed
        if grad_f is None:
            grad_f = torch.zeros_like(z)
        if grad_trace is None:
            grad_trace = torch.zeros(grad_f.shape[0], dtype=grad_f.dtype, device=grad_f.device)
        create_graph = torch.is_grad_enabled()
        if create_graph or ctx.saved is None:
            # differentiate a differentiable recomputation (create_graph, or a second backward
            # pass through a retained graph), from fresh aliases of the inputs so that the inner
            # pass stops at this evaluation (w.r.t. the solver state itself it would walk back
            # through the whole solve)
            with torch.enable_grad():
                t_a, z_a = t.view_as(t), z.view_as(z)
                flat = token.view_as(token) if token is not None else pk.flat
                inputs = [x for x, need in zip((t_a, z_a, flat), (need_t, need_z, need_p)) if need]
                f, trace = _trace_reference(ctx.acts, t_a, z_a, pk.layer_params(flat))
                grads = iter(torch.autograd.grad((f, trace), inputs, (grad_f, grad_trace),
                                                 create_graph=create_graph, allow_unused=True))
            return (None, None, *(next(grads) if need else None for need in (need_t, need_z, need_p)))
        acc = pk.accumulator(ctx.index) if need_p else None
        grad_z, grad_t = _trace_backward(ctx.acts, pk, ctx.saved, grad_f, grad_trace, acc, need_t)
        ctx.saved = None  # freed as autograd frees saved tensors; a retained graph recomputes
        return None, None, None if grad_t is None else grad_t.reshape(t.shape), grad_z if need_z else None, None
