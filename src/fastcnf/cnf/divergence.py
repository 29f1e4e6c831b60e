"""Divergence estimators: the trace of the Jacobian of the dynamics, exact or Hutchinson.

The instantaneous change of variables (FFJORD eq. 2; TO-FLOW 004 eq. 5) needs
``tr(df/dz)``. Estimators are swappable objects with one contract::

    noise = estimator.sample_noise(z)        # once per solve, as FFJORD does
    result = estimator(f, z, noise, net, t)  # f = net(t, z), computed with a graph to z
    f, result = estimator.evaluate(net, t, z, noise)  # f and its divergence together

``evaluate`` lets an estimator compute f itself (Hutchinson by forward mode forms f and the
Jacobian-vector product in one pass); for the others it is ``net(t, z)`` then ``__call__``.

References: Grathwohl et al. 2019 (FFJORD) §3 eq. 7 (Hutchinson's estimator);
Hutchinson 1989.
"""
from __future__ import annotations

from dataclasses import dataclass


import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

__all__ = [
    "DivergenceResult",
    "DivergenceEstimator",
    "ExactTrace",
    "Hutchinson",
    "jvp",
]


@dataclass
class DivergenceResult:
    """Divergence per example, and the vector-Jacobian product e^T df/dz when one was formed
    (the Jacobian-Frobenius regulariser reuses it, as RNODE does)."""

    div: Tensor
    noise: Tensor | None = None
    eps_jac: Tensor | None = None


def _grad(out: Tensor, z: Tensor, v: Tensor, create_graph: bool) -> Tensor:
    if not out.requires_grad:  # f has no graph at all (e.g. zero dynamics): d f / dz = 0
        return torch.zeros_like(z)
    # retain the graph: a regulariser may differentiate f again after the estimator
    g = torch.autograd.grad(out, z, v, create_graph=create_graph, retain_graph=True, allow_unused=True)[0]
    return torch.zeros_like(z) if g is None else g


class DivergenceEstimator:
    """Base class. Subclasses implement :meth:`__call__` and, if stochastic, :meth:`sample_noise`."""

    name = "base"

    def sample_noise(self, z: Tensor) -> Tensor | None:
        return None

    def __call__(self, f: Tensor, z: Tensor, noise: Tensor | None, net=None, t=None,
                 create_graph: bool = True) -> DivergenceResult:
        raise NotImplementedError

    def evaluate(self, net, t: Tensor, z: Tensor, noise: Tensor | None,
                 create_graph: bool = True) -> tuple[Tensor, DivergenceResult]:
        """``(f, divergence)`` with ``f = net(t, z)``; ``z`` must be part of a graph (a leaf that
        requires grad, or a live node). The default evaluates the network, then :meth:`__call__`."""
        f = net(t, z)
        return f, self(f, z, noise, net, t, create_graph=create_graph)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ExactTrace(DivergenceEstimator):
    """Exact trace of the Jacobian.

    ``mode``:
      * ``"auto"``: the network's own forward-mode trace when it has one (``net.trace_forward``,
        tangents pushed through the layers; one fused pass), else ``"vmap"`` for dimensions up to
        ``vmap_max_dim``, else ``"loop"``.
      * ``"loop"``: one autograd pass per dimension (FFJORD's ``divergence_bf``).
      * ``"vmap"``: all rows of the Jacobian in one batched vector-Jacobian product.
    The ``auto`` fast path is taken by the CNF block before calling this object (it needs the
    network, not just its output); see :meth:`uses_network_trace`.
    """

    name = "exact"
    MODES = ("auto", "loop", "vmap")

    def __init__(self, mode: str = "auto", vmap_max_dim: int = 64) -> None:
        if mode not in self.MODES:
            raise ValueError(f"unknown exact-trace mode {mode!r}; accepted: {', '.join(self.MODES)}")
        self.mode = mode
        self.vmap_max_dim = vmap_max_dim

    def uses_network_trace(self, net) -> bool:
        return self.mode == "auto" and hasattr(net, "trace_forward")

    def __call__(self, f, z, noise, net=None, t=None, create_graph=True):
        b = z.shape[0]
        f2 = f.reshape(b, -1)
        d = f2.shape[1]
        if not f.requires_grad:  # f has no graph at all (e.g. zero dynamics): the trace is 0
            return DivergenceResult(torch.zeros(b, dtype=f.dtype, device=f.device))
        mode = self.mode
        if mode == "auto":
            mode = "vmap" if d <= self.vmap_max_dim else "loop"
        if mode == "vmap":
            eye = torch.eye(d, dtype=f.dtype, device=f.device).unsqueeze(1).expand(d, b, d)
            rows = torch.autograd.grad(f2, z, eye, create_graph=create_graph, retain_graph=True,
                                       is_grads_batched=True, allow_unused=True)[0]
            if rows is None:  # f does not depend on z
                return DivergenceResult(torch.zeros(b, dtype=f.dtype, device=f.device))
            return DivergenceResult(torch.diagonal(rows.reshape(d, b, d), dim1=0, dim2=2).sum(-1))
        div = torch.zeros(b, dtype=f.dtype, device=f.device)
        for i in range(d):
            # retain_graph: the next row (or a regulariser) differentiates the same graph, also in
            # no-grad solves where create_graph is False
            gi = torch.autograd.grad(f2[:, i].sum(), z, create_graph=create_graph, retain_graph=True,
                                     allow_unused=True)[0]
            if gi is not None:
                div = div + gi.reshape(b, -1)[:, i]
        return DivergenceResult(div)

    def __repr__(self) -> str:
        return f"ExactTrace(mode={self.mode!r})"


class Hutchinson(DivergenceEstimator):
    """Hutchinson's stochastic trace estimator ``E_e[e^T (df/dz) e]`` (FFJORD eq. 7).

    ``noise``: ``"gaussian"`` (e ~ N(0, I)) or ``"rademacher"`` (e uniform on {-1, +1}). Unbiased
    for any noise with zero mean and identity covariance. The noise is drawn once per solve.

    ``mode`` says how ``e^T (df/dz) e`` is formed:
      * ``"vjp"``: reverse mode, ``(e^T df/dz) e`` by one vector-Jacobian product (FFJORD's
        ``divergence_approx``). Back-propagating through it (the adjoint's backward solve, direct
        back-propagation) differentiates the network twice.
      * ``"jvp"``: forward mode, ``e^T ((df/dz) e)``: :meth:`evaluate` forms f and the
        Jacobian-vector product in one pass (``net.forward_with_tangent`` when the network has
        it, else :mod:`torch.autograd.forward_ad`), and back-propagating through it needs first
        derivatives only. Same value as ``"vjp"`` to rounding (``tests/cnf/test_divergence_jvp.py``).
        Called with a precomputed ``f`` (``__call__``) it has to evaluate the network again.
    """

    name = "hutchinson"
    NOISES = ("gaussian", "rademacher")
    MODES = ("vjp", "jvp")

    def __init__(self, noise: str = "gaussian", generator: torch.Generator | None = None, mode: str = "vjp") -> None:
        if noise not in self.NOISES:
            raise ValueError(f"unknown Hutchinson noise {noise!r}; accepted: {', '.join(self.NOISES)}")
        if mode not in self.MODES:
            raise ValueError(f"unknown Hutchinson mode {mode!r}; accepted: {', '.join(self.MODES)}")
        self.noise = noise
        self.generator = generator
        self.mode = mode

    def sample_noise(self, z: Tensor) -> Tensor:
        if self.noise == "gaussian":
            return torch.randn(z.shape, dtype=z.dtype, device=z.device, generator=self.generator)
        return torch.randint(0, 2, z.shape, dtype=z.dtype, device=z.device, generator=self.generator) * 2 - 1

    def __call__(self, f, z, noise, net=None, t=None, create_graph=True):
        if noise is None:
            noise = self.sample_noise(z)
        if self.mode == "jvp" and net is not None:
            return self.evaluate(net, t, z, noise, create_graph)[1]
        e_jac = _grad(f, z, noise, create_graph)
        div = (e_jac * noise).reshape(z.shape[0], -1).sum(1)
        return DivergenceResult(div, noise=noise, eps_jac=e_jac)

    def evaluate(self, net, t, z, noise, create_graph=True):
        if self.mode != "jvp":
            return super().evaluate(net, t, z, noise, create_graph)
        if noise is None:
            noise = self.sample_noise(z)
        f, jac_e = jvp(net, t, z, noise)
        div = (jac_e * noise).reshape(z.shape[0], -1).sum(1)
        # eps_jac (e^T df/dz) is not formed here: a regulariser that needs it takes its own VJP
        return f, DivergenceResult(div, noise=noise)

    def __repr__(self) -> str:
        mode = "" if self.mode == "vjp" else f", mode={self.mode!r}"
        return f"Hutchinson(noise={self.noise!r}{mode})"


def jvp(net, t: Tensor, z: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``(net(t, z), (d net / dz) v)`` by forward mode; differentiable by autograd.

    Uses the network's own ``forward_with_tangent`` when it has one (one fused pass), else
    :mod:`torch.autograd.forward_ad` (dual tensors through the network's operations).
    """
    if hasattr(net, "forward_with_tangent"):
        return net.forward_with_tangent(t, z, v)
    with fwAD.dual_level():
        out = net(t, fwAD.make_dual(z, v.to(z.dtype)))
        f, tangent = fwAD.unpack_dual(out)
    if tangent is None:  # the output does not depend on z
        tangent = torch.zeros_like(f)
    return f, tangent
