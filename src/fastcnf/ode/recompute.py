"""Direct back-propagation through the lean solver with per-stage recomputation (``solver.gradient=recompute``).

Back-propagating through :func:`~fastcnf.ode.fast_solvers.solve_adaptive` while autograd records
every stage of every step gives the gradient of the discrete solution for the steps taken (Chen
et al. 2018, "Neural Ordinary Differential Equations", §2: "backpropagating through the operations
of the forward pass"), but keeps the graph of the whole solve: memory grows with the number of
evaluations. :func:`recomputed_solve` computes the same gradient holding the graph of one
evaluation at a time: the discrete adjoint of the explicit Runge-Kutta steps actually taken
(Hairer, Norsett & Wanner; Zhang & Sandu 2014, "FATODE"; Gholami et al. 2019, "ANODE"; Zhuang et
al. 2020, "Adaptive Checkpoint Adjoint"), evaluated stage by stage:

* the forward solve runs without recording (``torch.no_grad``); of every accepted step it keeps
  the times, the step size ``h``, the start state ``y0`` and the stage derivatives ``k_i``
  (detached states, no network activations; rejected attempts are dropped). Consecutive steps
  share ``y1 = y0'`` and, first same as last, ``k_s = k_0'``: each is kept once;
* for a step ``y1 = Y_s = y0 + h sum_j b_sj k_j`` with stages ``k_i = f(t_i, Y_i)``,
  ``Y_i = y0 + h sum_{j<i} b_ij k_j`` (``b_ij`` the tableau's ``beta``), the backward pass walks
  the accepted steps from the last to the first and, inside each, the stages from the last to the
  first. Every stage input ``Y_i`` is rebuilt from ``y0`` and the kept ``k_j`` by the forward
  solve's own operations (bit for bit the state it evaluated), ``f(t_i, Y_i)`` is evaluated again
  with ``Y_i`` a fresh leaf and autograd recording, and ``torch.autograd.grad`` with the stage's
  cotangent ``kbar_i`` gives ``Ybar_i = J_i^T kbar_i`` and the stage's share of the parameters'
  gradient; the evaluation's graph is then freed. The cotangents run

      Ybar_s = ybar1 + J_s^T kbar_s,   Ybar_i = J_i^T kbar_i (i < s),
      kbar_j += h b_ij Ybar_i (j < i),  ybar0 = sum_i Ybar_i (+ outputs' share),

  where ``kbar_i`` collects the later stages' contributions and, in a step an output time falls
  inside, those of the interpolated outputs: the forward solve's own interpolant
  (:meth:`~fastcnf.ode.fast_solvers._Step.interpolate`, differentiated by autograd on state-sized
  leaves) gives cotangents to ``y0``, ``y1`` and the ``k_i``. ``ybar0`` is the cotangent of the
  step before's end state.

First same as last: the first stage of a step, ``f(t0, y0)``, is the previous step's last stage
(the same time and state; in the recorded solve it is that evaluation). It is evaluated here as
the step's first stage; the last stage ``f(t1, y1)`` of a step is evaluated as well only when an
output is interpolated inside that step (its only use). The gradient w.r.t. ``y0`` is the same.

Mixed precision (``backward_dtype=torch.bfloat16``, ``solver.backward_precision``): the backward
pass re-evaluates each stage under ``torch.autocast`` (convolutions and matrix products in bfloat16),
while the forward solve, its step-size control and the kept states stay in the state's precision, and
the cotangents and gradients are accumulated there; the gradient then carries bfloat16 rounding
(Micikevicius et al. 2018, "Mixed Precision Training"). Only this backward pass can do so: it has no
error control, whereas a forward or adjoint solve in bfloat16 would take many more steps.

Step sizes and the times of the evaluations are constants, as in the recorded solve, so the
gradient equals direct back-propagation's up to float rounding; the price is one more evaluation
of every accepted step's ``s`` stages (one more in a step that holds an interpolated output),
counted as backward NFE. Memory: the kept states (``(s + 1)`` per accepted step) and the graph of
one evaluation. The dynamics must evaluate identically when called again (the CNF block holds its
Hutchinson noise fixed for the whole solve). Gradients reach the initial state and the given
parameters (and whatever those depend on), as with the adjoint method; a tensor the dynamics
capture from outside that is not among the parameters receives none.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Sequence

import torch
from torch import Tensor

from fastcnf.ode.fast_solvers import ButcherTableau, State, _combine, _Step, solve_adaptive

__all__ = ["recomputed_solve"]

Cotangent = list  # per state component: a Tensor, or None where nothing downstream depends on it


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


def _add_all(a: Cotangent, b: Sequence[Tensor | None]) -> Cotangent:
    return [_add(x, y) for x, y in zip(a, b)]


def _axpy(acc: Cotangent, coef: float, g: Cotangent) -> Cotangent:
    """``acc + coef * g`` per component (None: zero)."""
    out = []
    for a, x in zip(acc, g):
        if x is None:
            out.append(a)
        else:
            out.append(x * coef if a is None else a.add(x, alpha=coef))
    return out


def _live(cot: Cotangent) -> bool:
    return any(g is not None for g in cot)


def _leaves(state: Sequence[Tensor]) -> State:
    return tuple(y.detach().requires_grad_(True) for y in state)


class _Run:
    """One solve: the forward solve, its accepted steps and the per-stage backward pass."""

    def __init__(self, func: Callable, times: Sequence[float], tableau: ButcherTableau, rtol: float, atol: float,
                 before_eval: Callable[[float, float], None] | None, counter,
                 backward_dtype: torch.dtype | None = None) -> None:
        self.func, self.tableau, self.rtol, self.atol = func, tableau, rtol, atol
        self.backward_dtype = backward_dtype
        self.before_eval, self.counter = before_eval, counter
        self.times = [float(v) for v in times]
        self.direction = -1.0 if len(self.times) > 1 and self.times[1] < self.times[0] else 1.0
        self.taus = [self.direction * v for v in self.times]  # ascending, as the solver integrates
        # per accepted step: (tau0, tau1, h, y0, y1, ks), the states as indices into the kept tensors
        self.steps: list[tuple[float, float, float, tuple[int, ...], tuple[int, ...], list[tuple[int, ...]]]] = []

    def forward(self, y0: State) -> tuple[State, list[Tensor]]:
        """The solution (no graph) and the kept tensors: every accepted step's start state and
        stage derivatives, each tensor once."""
        record: list[_Step] = []
        solution, _ = solve_adaptive(self.func, y0, self.times, self.tableau, self.rtol, self.atol,
                                     self.before_eval, record=record)
        kept: list[Tensor] = []
        index: dict[int, int] = {}  # id -> position; every kept tensor stays alive until the end

        def put(state: State) -> tuple[int, ...]:
            out = []
            for x in state:
                if id(x) not in index:
                    index[id(x)] = len(kept)
                    kept.append(x)
                out.append(index[id(x)])
            return tuple(out)

        self.steps = [(s.tau0, s.tau1, s.dt, put(s.y0), put(s.y1), [put(k) for k in s.ks]) for s in record]
        self.real_dtype = y0[0].real.dtype if y0[0].is_complex() else y0[0].dtype
        self.device = y0[0].device
        return solution, kept

    def _stage_vjp(self, tau: float, y: State, kbar: Cotangent, params: Sequence[Tensor]):
        """``(J^T kbar, params' share)`` of one evaluation ``f(tau, y)``, recomputed; its graph is
        freed on return."""
        leaves = _leaves(y)
        self.counter.backward += 1
        time = torch.scalar_tensor(self.direction * tau, dtype=self.real_dtype, device=self.device)
        lower = (torch.autocast(self.device.type, dtype=self.backward_dtype) if self.backward_dtype is not None
                 else nullcontext())
        with torch.enable_grad():
            with lower:
                k = self.func(time, leaves)
            k = tuple(kc.to(yc.dtype) for kc, yc in zip(k, y))  # autocast's outputs back to the state's
        outs, cots = [], []
        for kc, g in zip(k, kbar):
            if g is not None and kc.requires_grad:
                outs.append(kc)
                cots.append(g)
        if not outs:
            return [None] * len(y), [None] * len(params)
        # retain_graph: what the parameters feed into the dynamics (e.g. packed parameters shared
        # by every evaluation) is part of every evaluation's graph and of the outer one
        grads = torch.autograd.grad(outs, (*leaves, *params), cots, allow_unused=True, retain_graph=True)
        return list(grads[:len(y)]), grads[len(y):]

    def _interpolation_vjp(self, step: tuple, y0: State, y1: State, ks: list[State],
                           inside: list[tuple[float, Cotangent]]):
        """Cotangents of ``(y0, y1, ks)`` from the outputs interpolated inside ``step``, through the
        forward solve's interpolant (state-sized operations only)."""
        tau0, tau1, h = step[:3]
        n = len(y0)
        l0, l1, lk = _leaves(y0), _leaves(y1), [_leaves(k) for k in ks]
        outs, cots = [], []
        with torch.enable_grad():
            interp = _Step(tau0, tau1, h, l0, l1, lk)
            for tau, cot in inside:
                value = interp.interpolate(tau, self.tableau)
                for c, g in enumerate(cot):
                    if g is not None:
                        outs.append(value[c])
                        cots.append(g)
        grads = torch.autograd.grad(outs, (*l0, *l1, *(x for k in lk for x in k)), cots, allow_unused=True)
        return list(grads[:n]), list(grads[n:2 * n]), [list(grads[2 * n + i * n:2 * n + (i + 1) * n])
                                                       for i in range(len(ks))]

    def _step_vjp(self, step: tuple, kept: Sequence[Tensor], lam: Cotangent,
                  inside: list[tuple[float, Cotangent]], params: Sequence[Tensor]):
        """Cotangents of the step's start state and of ``params``, given those of its end state
        (``lam``) and of the outputs interpolated inside it (``inside``: ``(tau, cotangents)``)."""
        tau0, tau1, h, i0, i1, iks = step
        dt = self.direction * h  # the step in ascending time, exactly as the solver held it
        tab = self.tableau
        stages = len(tab.alpha)
        y0 = tuple(kept[i] for i in i0)
        ks = [tuple(kept[i] for i in ik) for ik in iks]
        n_state = len(y0)
        kbar: list[Cotangent] = [[None] * n_state for _ in ks]
        ybar0: Cotangent = [None] * n_state
        grad_params: list[Tensor | None] = [None] * len(params)
        if inside:
            g0, g1, gk = self._interpolation_vjp(step, y0, tuple(kept[i] for i in i1), ks, inside)
            ybar0, lam = _add_all(ybar0, g0), _add_all(lam, g1)
            kbar = [_add_all(a, b) for a, b in zip(kbar, gk)]
        for i in range(stages, -1, -1):  # stage i evaluates f at Y_i; Y_0 = y0, Y_s = y1
            ybar = lam if i == stages else [None] * n_state
            if _live(kbar[i]):  # the last stage: only if an output is interpolated in the step
                if i == 0:
                    y_stage, tau = y0, tau0
                else:  # solve_adaptive's stage input and time, operation for operation
                    y_stage = _combine(y0, [(h * bij, k) for bij, k in zip(tab.beta[i - 1], ks)])
                    alpha = tab.alpha[i - 1]
                    tau = tau1 if alpha == 1.0 else tau0 + alpha * dt
                g_y, g_p = self._stage_vjp(tau, y_stage, kbar[i], params)
                ybar = _add_all(ybar, g_y)
                grad_params = _add_all(grad_params, g_p)
            kbar[i] = [None] * n_state  # this stage is done
            if i > 0 and _live(ybar):  # Y_i = y0 + h sum_j b_ij k_j
                for j, bij in enumerate(tab.beta[i - 1]):
                    if bij != 0.0:
                        kbar[j] = _axpy(kbar[j], h * bij, ybar)
            ybar0 = _add_all(ybar0, ybar)
        return ybar0, grad_params

    def backward(self, kept: Sequence[Tensor], grads: Sequence[Tensor | None], params: Sequence[Tensor]):
        """Cotangents of the initial state and of ``params`` given those of the solution."""
        n_state = len(grads)
        where: dict[int, list[int]] = {}  # step -> outputs taken from it: the first step reaching them
        n = 0
        for j in range(1, len(self.taus)):
            while self.steps[n][1] < self.taus[j]:
                n += 1
            where.setdefault(n, []).append(j)
        lam: Cotangent = [None] * n_state
        grad_params: list[Tensor | None] = [None] * len(params)
        for n in range(len(self.steps) - 1, -1, -1):
            inside = []
            for j in where.get(n, []):
                cot = [None if g is None else g[j] for g in grads]
                if self.taus[j] == self.steps[n][1]:  # the step's end state itself
                    lam = _add_all(lam, cot)
                elif _live(cot):
                    inside.append((self.taus[j], cot))
            if not _live(lam) and not inside:
                continue  # nothing downstream depends on this step
            lam, step_params = self._step_vjp(self.steps[n], kept, lam, inside, params)
            grad_params = _add_all(grad_params, step_params)
        lam = _add_all(lam, [None if g is None else g[0] for g in grads])  # output 0 is y0
        return lam, grad_params


class _RecomputedSolve(torch.autograd.Function):
    """``(initial state, parameters) -> solution``; the backward pass recomputes stage by stage."""

    @staticmethod
    def forward(ctx, run: _Run, n_state: int, *inputs):  # type: ignore[override]
        y0 = tuple(x.detach() for x in inputs[:n_state])
        solution, kept = run.forward(y0)
        ctx.run, ctx.n_state, ctx.n_kept = run, n_state, len(kept)
        # freed after the backward pass, as recorded graphs are; the parameters for the version
        # check (an in-place update before the backward pass would change the recomputed stages)
        ctx.save_for_backward(*kept, *inputs[n_state:])
        ctx.set_materialize_grads(False)
        return solution

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError("a differentiable backward pass (create_graph=True) through a solve with "
                               "solver.gradient=recompute is not supported; set solver.gradient=direct")
        n_state = ctx.n_state
        needs = ctx.needs_input_grad[2:]
        saved = ctx.saved_tensors
        kept, all_params = saved[:ctx.n_kept], saved[ctx.n_kept:]
        params = [p for p, need in zip(all_params, needs[n_state:]) if need]
        grad_state, grad_needed = ctx.run.backward(kept, grads, params)
        it = iter(grad_needed)
        grad_params = [next(it) if need else None for need in needs[n_state:]]
        grad_state = [g if need else None for g, need in zip(grad_state, needs[:n_state])]
        return (None, None, *grad_state, *grad_params)


def recomputed_solve(func: Callable[[Tensor, State], State], y0: State, t: Sequence[float], tableau: ButcherTableau,
                     rtol: float, atol: float, before_eval: Callable[[float, float], None] | None,
                     params: Sequence[Tensor], counter, backward_dtype: torch.dtype | None = None) -> State:
    """:func:`solve_adaptive`'s solution, differentiable by per-stage recomputation (module docstring).

    Args:
        func, y0, t, tableau, rtol, atol, before_eval: as for :func:`solve_adaptive`
            (``before_eval`` sees the forward solve's evaluations only).
        params: the tensors ``func`` depends on that receive a gradient (those not requiring
            grad are skipped).
        counter: its ``backward`` attribute grows by one per evaluation of the backward pass.
        backward_dtype: None (default): the backward pass re-evaluates in the state's precision;
            ``torch.bfloat16``: under autocast to it (module docstring).

    Returns:
        per component of ``y0``, the values at every time of ``t`` stacked along a new first dimension.
    """
    run = _Run(func, t, tableau, rtol, atol, before_eval, counter, backward_dtype)
    params = list({id(p): p for p in params if p.requires_grad}.values())  # each once
    return tuple(_RecomputedSolve.apply(run, len(y0), *y0, *params))
