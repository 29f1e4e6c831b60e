"""An embedded Runge-Kutta solve with one time and one step size per row (no gradients).

torchdiffeq-style error control takes one step size for a whole batch and tests a norm over the
whole batch, so one hard row is diluted among easy ones (its error may far exceed the tolerance)
while easy rows take the hard rows' steps. Here every row ``b`` advances with its own ``t_b`` and
``h_b``: the error test is the same mixed root-mean-square norm (torchdiffeq's, the largest RMS over
the state's components) taken over that row alone, a rejected row retries with a smaller step while
the others move on, and a row that reaches the end leaves the batch -- the scheme of Lienen &
Guennemann, "torchode: A Parallel ODE Solver for PyTorch" (2022), with torchdiffeq's controller
(safety 0.9, growth at most 10, shrink at most 0.2) and initial step (Hairer, Norsett & Wanner,
"Solving Ordinary Differential Equations I", 1993, §II.4). The last step of each row is shortened
to land on the end time (no interpolation), so every row meets the tolerance on its own and its
result does not depend on the other rows of the batch.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from fastcnf.ode.fast_solvers import _DFACTOR, _IFACTOR, _SAFETY, ButcherTableau

__all__ = ["solve_rows"]

State = tuple[Tensor, ...]


def _row_rms(parts: Sequence[Tensor]) -> Tensor:
    """Per row: the largest root-mean-square over the components (each ``(B, ...)``)."""
    out = None
    for p in parts:
        r = p.reshape(p.shape[0], -1).pow(2).mean(1)
        out = r if out is None else torch.maximum(out, r)
    return out.sqrt()


def _rows(v: Tensor, like: Tensor) -> Tensor:
    """``v`` (B,) shaped to broadcast against ``like`` (B, ...)."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _col(v: Tensor, like: Tensor) -> Tensor:
    """``v`` (B,) shaped to broadcast against ``like`` (B, ...), in ``like``'s dtype."""
    return _rows(v, like).to(like.dtype)


@torch.no_grad()
def solve_rows(func: Callable[[Tensor, State], State], y0: State, t0: float, t1: float, tableau: ButcherTableau,
               rtol: float, atol: float, max_steps: int = 100_000) -> tuple[State, int]:
    """Integrate ``dy/dt = func(t, y)`` from ``t0`` to ``t1`` row by row (module docstring).

    Args:
        func: maps the rows' times ``(B,)`` (y's dtype) and the state (each component ``(B, ...)``)
            to the derivative; it is called on the rows still moving only.
        y0: the initial state, a tuple of tensors with the rows along the first dimension.
        tableau: a first-same-as-last method (:data:`~fastcnf.ode.fast_solvers.DOPRI5`, ``BOSH3``).
        rtol, atol: tolerances of each row's error test.

    Returns:
        ``(y(t1), row_evaluations)``: the state at ``t1`` and the number of rows times evaluations
        computed (the cost; divided by ``B`` it is the mean evaluations per row).

    Raises:
        FloatingPointError: a non-finite state or error, a step size underflow, or ``max_steps``
            attempts without finishing.
    """
    direction = 1.0 if t1 >= t0 else -1.0
    span = abs(t1 - t0)
    n = y0[0].shape[0]
    out = [y.clone() for y in y0]
    if n == 0 or span == 0.0:
        return tuple(out), 0
    dtype, device = y0[0].dtype, y0[0].device
    evals = [0]

    def call(tau: Tensor, y: State) -> State:
        evals[0] += y[0].shape[0]
        return tuple(func((t0 + direction * tau).to(dtype), y))

    idx = torch.arange(n, device=device)
    tau = torch.zeros(n, dtype=torch.float64, device=device)  # elapsed time, ascending
    y = tuple(y0)
    f = call(tau, y)
    # initial step per row (torchdiffeq's _select_initial_step, each row's own norms)
    scale = [atol + v.abs() * rtol for v in y]
    d0 = _row_rms([v / s for v, s in zip(y, scale)]).double()
    d1 = _row_rms([v / s for v, s in zip(f, scale)]).double()
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(1e-300))
    y1 = tuple(v + direction * _col(h0, v) * k for v, k in zip(y, f))
    f1 = call(h0, y1)
    d2 = _row_rms([(a - b) / s for a, b, s in zip(f1, f, scale)]).double() / h0
    big = torch.maximum(d1, d2)
    h1 = torch.where(big <= 1e-15, torch.maximum(torch.full_like(h0, 1e-6), h0 * 1e-3),
                     (0.01 / big.clamp_min(1e-300)) ** (1.0 / tableau.order))
    dt = torch.minimum(100 * h0, h1)
    stages = len(tableau.alpha)
    for _ in range(max_steps):
        remaining = span - tau
        last = dt >= remaining
        dt = torch.where(last, remaining, dt)
        if not bool(torch.all(dt > 0)) or not bool(torch.all(torch.isfinite(dt))):
            raise FloatingPointError("step size underflow or non-finite step in a per-row solve")
        h = direction * dt
        ks = [f]
        y_stage = y
        for i in range(stages):
            y_stage = tuple(v + _col(h, v) * sum(b * k[c] for b, k in zip(tableau.beta[i], ks) if b != 0.0)
                            for c, v in enumerate(y))
            ks.append(call(tau + tableau.alpha[i] * dt, y_stage))
        y_new = y_stage
        ratios = []
        for c, v in enumerate(y):
            err = sum(coef * k[c] for coef, k in zip(tableau.c_error, ks) if coef != 0.0) * _col(h, v)
            tol = torch.maximum(v.abs(), y_new[c].abs()).mul_(rtol).add_(atol)
            ratios.append(err / tol)
        ratio = _row_rms(ratios).double()
        if not bool(torch.all(torch.isfinite(ratio))):
            raise FloatingPointError("non-finite values in the ODE state or its derivative in a per-row solve")
        accept = ratio <= 1
        tau = torch.where(accept, tau + dt, tau)
        y = tuple(torch.where(_rows(accept, v), a, v) for v, a in zip(y, y_new))
        f = tuple(torch.where(_rows(accept, v), a, v) for v, a in zip(f, ks[-1]))
        factor = torch.clamp(_SAFETY / ratio.clamp_min(1e-300) ** (1.0 / tableau.order),
                             max=_IFACTOR)
        factor = torch.where(ratio < 1, factor.clamp_min(1.0), factor.clamp_min(_DFACTOR))
        dt = torch.where(ratio == 0, dt * _IFACTOR, dt * factor)
        done = accept & last
        if bool(done.any()):
            rows = idx[done]
            for o, v in zip(out, y):
                o[rows] = v[done]
            keep = ~done
            if not bool(keep.any()):
                return tuple(out), evals[0]
            idx, tau, dt = idx[keep], tau[keep], dt[keep]
            y = tuple(v[keep] for v in y)
            f = tuple(v[keep] for v in f)
    raise FloatingPointError(f"per-row solve did not finish within {max_steps} steps")
