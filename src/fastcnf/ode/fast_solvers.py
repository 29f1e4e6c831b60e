"""Lean adaptive Runge-Kutta solvers: torchdiffeq's dopri5 and bosh3, step for step, in fewer operations.

:func:`solve_adaptive` takes the steps torchdiffeq 0.2.5 takes (same Butcher tableaux, same initial
step selection, same error norm, same step-size controller, same 4th-order interpolation of the
output from the step that passes it) and so returns the same solution with the same number of
function evaluations, up to float rounding. It is faster on small problems (a CNF on 2-D data
spends most of a step in per-operation overhead) because it

* keeps the tuple state as it is (no flattening into one vector and back at every evaluation),
* forms each stage input with a few fused ``add(..., alpha=)`` operations instead of a product
  with a coefficient tensor built per stage,
* computes the error estimate and the step-size decision without recording them for autograd,
  and the step sizes as Python floats (no autograd graph through the step-size selection:
  the gradient is that of the discrete solution for the steps taken),
* fits the interpolating polynomial only for the steps an output time falls in,
* counts function evaluations itself (no wrapper module, no ``float(t)`` per evaluation).

The controller, as in torchdiffeq: the error ratio of a step is
``max over state components of RMS(err / (atol + rtol * max(|y0|, |y1|))``; a step is accepted
when the ratio is at most 1; the next step is ``dt * min(10, max(0.9 * ratio^(-1/order), d))``
with ``d = 0.2`` after a rejection and 1 after an acceptance (10 when the ratio is 0).

References: Dormand & Prince 1980; Bogacki & Shampine 1989; Hairer, Norsett & Wanner,
*Solving ODEs I*, II.4 (initial step); Chen et al. 2018 (torchdiffeq).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["ButcherTableau", "DOPRI5", "BOSH3", "LEAN_METHODS", "solve_adaptive"]


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit embedded Runge-Kutta method with the first-same-as-last property.

    ``alpha[i]``/``beta[i]``: time fraction and coefficients of stage ``i + 2``; the last stage is
    evaluated at the new solution (``beta[-1] == c_sol[:-1]``, ``c_sol[-1] == 0``), so its value
    starts the next step. ``c_error``: weights of the error estimate; ``c_mid``: weights of the
    solution at the step's midpoint, used by the interpolant.
    """

    order: int
    alpha: tuple[float, ...]
    beta: tuple[tuple[float, ...], ...]
    c_sol: tuple[float, ...]
    c_error: tuple[float, ...]
    c_mid: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.c_sol[-1] != 0 or tuple(self.c_sol[:-1]) != tuple(self.beta[-1]):
            raise ValueError("lean solvers need a first-same-as-last tableau")


#: Dormand-Prince 5(4), torchdiffeq's ``dopri5`` (coefficients as in torchdiffeq/_impl/dopri5.py)
DOPRI5 = ButcherTableau(
    order=5,
    alpha=(1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    beta=(
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
    ),
    c_sol=(35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
    c_error=(35 / 384 - 1951 / 21600, 0.0, 500 / 1113 - 22642 / 50085, 125 / 192 - 451 / 720,
             -2187 / 6784 - -12231 / 42400, 11 / 84 - 649 / 6300, -1.0 / 60.0),
    c_mid=(6025192743 / 30085553152 / 2, 0.0, 51252292925 / 65400821598 / 2, -2691868925 / 45128329728 / 2,
           187940372067 / 1594534317056 / 2, -1776094331 / 19743644256 / 2, 11237099 / 235043384 / 2),
)

#: Bogacki-Shampine 3(2), torchdiffeq's ``bosh3``
BOSH3 = ButcherTableau(
    order=3,
    alpha=(1 / 2, 3 / 4, 1.0),
    beta=((1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
    c_sol=(2 / 9, 1 / 3, 4 / 9, 0.0),
    c_error=(2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8),
    c_mid=(0.0, 0.5, 0.0, 0.0),
)

#: method name -> tableau of the methods the lean backend runs
LEAN_METHODS: dict[str, ButcherTableau] = {"dopri5": DOPRI5, "bosh3": BOSH3}

# torchdiffeq's controller constants (RKAdaptiveStepsizeODESolver defaults)
_SAFETY, _IFACTOR, _DFACTOR = 0.9, 10.0, 0.2

State = tuple[Tensor, ...]


def _combine(base: State, terms: Sequence[tuple[float, State]]) -> State:
    """``base + sum_j c_j k_j`` per component (zero coefficients skipped)."""
    out = []
    for c in range(len(base)):
        acc = base[c]
        for coef, k in terms:
            if coef != 0.0:
                acc = acc.add(k[c], alpha=coef)
        out.append(acc)
    return tuple(out)


def _mixed_rms(parts: Sequence[Tensor]) -> Tensor:
    """torchdiffeq's norm of a tuple state: the largest root-mean-square over the components."""
    if len(parts) == 1:
        return parts[0].pow(2).mean().sqrt()
    return torch.stack([p.pow(2).mean() for p in parts]).max().sqrt()


def _select_initial_step(call, tau0: float, y0: State, f0: State, order: int, rtol: float, atol: float,
                         direction: float) -> float:
    """torchdiffeq's ``_select_initial_step`` (Hairer, Norsett & Wanner II.4), in y's dtype."""
    with torch.no_grad():
        scale = [atol + y.abs() * rtol for y in y0]
        d0 = _mixed_rms([y / s for y, s in zip(y0, scale)])
        d1 = _mixed_rms([f / s for f, s in zip(f0, scale)])
        if d0 < 1e-5 or d1 < 1e-5:
            h0 = torch.tensor(1e-6, dtype=d0.dtype, device=d0.device)
        else:
            h0 = 0.01 * d0 / d1
        h0_value = float(h0)
        y1 = _combine(y0, [(direction * h0_value, f0)])
    # evaluated in the caller's grad mode, as every other evaluation (some divergence
    # estimators behave differently without gradients); its output does not enter the solution
    f1 = call(tau0 + h0_value, y1, h0_value)
    with torch.no_grad():
        d2 = (_mixed_rms([(a - b) / s for a, b, s in zip(f1, f0, scale)]) / h0).abs()
        if d1 <= 1e-15 and d2 <= 1e-15:
            h1 = torch.max(torch.tensor(1e-6, dtype=h0.dtype, device=h0.device), h0 * 1e-3)
        else:
            h1 = (0.01 / torch.max(d1, d2)) ** (1.0 / float(order + 1))
        return float(torch.min(100 * h0, h1))


def _optimal_step(dt: float, ratio: float, order: int) -> float:
    """torchdiffeq's ``_optimal_step_size`` in float64."""
    if ratio == 0:
        return dt * _IFACTOR
    dfactor = 1.0 if ratio < 1 else _DFACTOR
    return dt * min(_IFACTOR, max(_SAFETY / ratio ** (1.0 / order), dfactor))


class _Step:
    """An accepted step: enough to interpolate inside it."""

    __slots__ = ("tau0", "tau1", "dt", "y0", "y1", "ks", "coeffs", "evals")

    def __init__(self, tau0: float, tau1: float, dt: float, y0: State, y1: State, ks: list[State],
                 evals: list[int] | None = None) -> None:
        self.tau0, self.tau1, self.dt, self.y0, self.y1, self.ks = tau0, tau1, dt, y0, y1, ks
        self.coeffs: list[list[Tensor]] | None = None
        self.evals = evals

    def output_weights(self, tau: float, tableau: ButcherTableau) -> list[float]:
        """``w`` such that the interpolant at ``tau`` is ``y0 + dt * sum_i w[i] * ks[i]``.

        :meth:`interpolate` written out: with ``y1 = y0 + dt S1`` and ``y_mid = y0 + dt Sm``
        (``S1``, ``Sm`` the ``c_sol`` / ``c_mid`` combinations of the stages) the polynomial's
        ``y0`` terms cancel to ``y0``, leaving a fixed combination of the stages.
        """
        x = (tau - self.tau0) / (self.tau1 - self.tau0)
        last = len(self.ks) - 1
        w = []
        for i in range(len(self.ks)):
            first, end = float(i == 0), float(i == last)
            cs, cm = tableau.c_sol[i], tableau.c_mid[i]
            w.append(x * first + x ** 2 * (end - 4 * first - 5 * cs + 16 * cm)
                     + x ** 3 * (5 * first - 3 * end + 14 * cs - 32 * cm)
                     + x ** 4 * (2 * end - 2 * first - 8 * cs + 16 * cm))
        return w

    def interpolate(self, tau: float, tableau: ButcherTableau) -> State:
        """torchdiffeq's 4th-order interpolant (``_interp_fit`` / ``_interp_evaluate``)."""
        if tau == self.tau1:
            return self.y1  # the interpolant passes through y1
        if self.coeffs is None:
            dt = self.dt
            y_mid = _combine(self.y0, [(dt * m, k) for m, k in zip(tableau.c_mid, self.ks)])
            f0, f1 = self.ks[0], self.ks[-1]
            self.coeffs = []
            for y0, y1, ym, a0, a1 in zip(self.y0, self.y1, y_mid, f0, f1):
                a = 2 * dt * (a1 - a0) - 8 * (y1 + y0) + 16 * ym
                b = dt * (5 * a0 - 3 * a1) + 18 * y0 + 14 * y1 - 32 * ym
                c = dt * (a1 - 4 * a0) - 11 * y0 - 5 * y1 + 16 * ym
                self.coeffs.append([y0, dt * a0, c, b, a])
        x = (tau - self.tau0) / (self.tau1 - self.tau0)
        out = []
        for e, d, c, b, a in self.coeffs:
            x_t = torch.scalar_tensor(x, dtype=e.dtype, device=e.device)
            total = e + x_t * d
            power = x_t
            for coef in (c, b, a):
                power = power * x_t
                total = total + power * coef
            out.append(total)
        return tuple(out)


def solve_adaptive(
    func: Callable[[Tensor, State], State],
    y0: State,
    t: Sequence[float],
    tableau: ButcherTableau,
    rtol: float,
    atol: float,
    before_eval: Callable[[float, float], None] | None = None,
    record: list | None = None,
) -> tuple[State, int]:
    """Integrate ``dy/dt = func(t, y)`` from ``t[0]`` through the times ``t`` (monotone).

    Args:
        func: maps a 0-d time tensor (y's dtype) and the tuple state to its tuple derivative.
        y0: the initial state, a tuple of tensors.
        t: output times, strictly increasing or strictly decreasing (Python floats).
        tableau: the method (:data:`DOPRI5`, :data:`BOSH3`).
        rtol, atol: tolerances of the error test.
        before_eval: called as ``before_eval(time, step)`` before every evaluation (NFE
            accounting; it may raise to stop the solve).
        record: if a list, every accepted step is appended to it (a :class:`_Step` whose
            ``evals`` holds the call index of each stage, ``ks[i]`` being the ``evals[i]``-th
            call to ``func`` counting from 0), for a hand-written backward pass
            (:mod:`fastcnf.cnf.fused`).

    Returns:
        ``(solution, graph_evals)``: per component, the values at every time of ``t`` stacked
        along a new first dimension; and the number of evaluations the solution depends on
        (those a direct backward pass goes through).

    Raises:
        FloatingPointError: the state or the error estimate became NaN or infinite.
    """
    ts = [float(v) for v in t]
    direction = -1.0 if len(ts) > 1 and ts[1] < ts[0] else 1.0
    taus = [direction * v for v in ts]  # ascending, as torchdiffeq integrates reversed time
    real_dtype = y0[0].real.dtype if y0[0].is_complex() else y0[0].dtype
    device = y0[0].device
    current_dt = [math.nan]
    calls = [0]

    def call(tau: float, y: State, dt: float) -> State:
        time = direction * tau
        if before_eval is not None:
            before_eval(time, direction * dt)
        calls[0] += 1
        return tuple(func(torch.scalar_tensor(time, dtype=real_dtype, device=device), y))

    solution: list[list[Tensor]] = [[y] for y in y0]
    if len(taus) == 1:
        return tuple(torch.stack(s) for s in solution), 0
    for a, b in zip(taus[:-1], taus[1:]):
        if not b > a:
            raise ValueError("t must be strictly increasing or strictly decreasing")
    tau = taus[0]
    f_index = calls[0]
    f0 = call(tau, y0, math.nan)
    dt = _select_initial_step(call, tau, y0, f0, tableau.order - 1, rtol, atol, direction)
    y, f = y0, f0
    last: _Step | None = None
    accepted = 0
    interpolated_last = False
    stages = len(tableau.alpha)
    for target in taus[1:]:
        while target > tau:
            if not math.isfinite(dt) or not tau + dt > tau:
                raise FloatingPointError(f"step size underflow or non-finite step ({dt!r}) at t={direction * tau:.6g}")
            current_dt[0] = dt
            tau1 = tau + dt
            h = direction * dt
            ks = [f]
            evals = [f_index]
            y_stage = y
            for i in range(stages):
                y_stage = _combine(y, [(h * bij, k) for bij, k in zip(tableau.beta[i], ks)])
                alpha = tableau.alpha[i]
                evals.append(calls[0])
                ks.append(call(tau1 if alpha == 1.0 else tau + alpha * dt, y_stage, dt))
            y1 = y_stage  # first same as last: the last stage input is the solution
            with torch.no_grad():
                ratios = []
                for c in range(len(y)):
                    err = ks[0][c] * (h * tableau.c_error[0])
                    for coef, k in zip(tableau.c_error[1:], ks[1:]):
                        if coef != 0.0:
                            err = err.add(k[c], alpha=h * coef)
                    tol = torch.maximum(y[c].abs(), y1[c].abs()).mul_(rtol).add_(atol)
                    ratios.append(err.div_(tol))
                ratio = float(_mixed_rms(ratios))
            if not math.isfinite(ratio):
                raise FloatingPointError(
                    f"non-finite values in the ODE state or its derivative at t={direction * tau:.6g} "
                    f"(step {h:.3g})")
            if ratio <= 1:
                last = _Step(tau, tau1, h, y, y1, ks, evals)
                if record is not None:
                    record.append(last)
                interpolated_last = False
                accepted += 1
                tau, y, f, f_index = tau1, y1, ks[-1], evals[-1]
            dt = _optimal_step(dt, ratio, tableau.order)
        assert last is not None
        value = last.interpolate(target, tableau)
        if target != last.tau1:
            interpolated_last = True
        for c, v in enumerate(value):
            solution[c].append(v)
    # f0, then every accepted step's new stages; the last step's final stage only feeds the
    # interpolant (the next step would have started from it)
    graph_evals = 1 + stages * accepted - (0 if interpolated_last or accepted == 0 else 1)
    if accepted == 0:
        graph_evals = 0
    return tuple(torch.stack(s) for s in solution), graph_evals
