"""Direct back-propagation through the lean solver with per-step recomputation (``solver.recompute``).

Back-propagating through :func:`~fastcnf.ode.fast_solvers.solve_adaptive` while autograd records
every stage of every step gives the gradient of the discrete solution for the steps taken (Chen
et al. 2018, "Neural Ordinary Differential Equations", §2: "backpropagating through the operations
of the forward pass"), but keeps the graph of the whole solve: memory grows with the number of
steps. :func:`recomputed_solve` computes the same gradient with the memory of one step's graph, a
checkpointed discrete adjoint (Gholami, Keutzer & Biros 2019, "ANODE: Unconditionally Accurate
Memory-Efficient Gradients for Neural ODEs", §3):

* the forward solve runs without recording (``torch.no_grad``); of every accepted step it keeps
  only the start time, the step size and the start state (the checkpoint, one state per step);
* the backward pass walks the accepted steps from the last to the first. For each one it
  re-evaluates the step from its checkpoint, a fresh leaf, with autograd recording: every stage,
  the first one ``f(t0, y0)`` included (in the recorded solve that evaluation is the previous
  step's last stage, at the same time and state, so the cotangent reaches ``y0`` through it as
  there), and, when an output time falls inside the step, the last stage and the same
  interpolant as the forward solve. ``torch.autograd.grad`` of the step's outputs (its end state,
  the outputs inside it) with their cotangents then gives the start state's cotangent, handed to
  the step before, and the step's share of the parameters' gradient.

Step sizes and the times of the evaluations are constants, as in the recorded solve, so the
gradient equals direct back-propagation's up to float rounding; the price is one more evaluation
of every accepted step (``stages`` per step, one more in a step that holds an interpolated
output), counted as backward NFE. The dynamics must evaluate identically when called again (the
CNF block holds its Hutchinson noise fixed for the whole solve). Gradients reach the initial state
and the given parameters (and whatever those depend on), as with the adjoint method; a tensor the
dynamics capture from outside that is not among the parameters receives none.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from fastcnf.ode.fast_solvers import ButcherTableau, State, _combine, _Step, solve_adaptive

__all__ = ["recomputed_solve"]


class _Checkpoints(list):
    """A ``record`` for :func:`solve_adaptive` keeping of each accepted step ``(tau0, tau1, h)``
    and its start state only (not its stages)."""

    def append(self, step: _Step) -> None:  # type: ignore[override]
        super().append(((step.tau0, step.tau1, step.dt), step.y0))


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


class _Run:
    """One solve: the forward solve, its accepted steps and the per-step backward pass."""

    def __init__(self, func: Callable, times: Sequence[float], tableau: ButcherTableau, rtol: float, atol: float,
                 before_eval: Callable[[float, float], None] | None, counter) -> None:
        self.func, self.tableau, self.rtol, self.atol = func, tableau, rtol, atol
        self.before_eval, self.counter = before_eval, counter
        self.times = [float(v) for v in times]
        self.direction = -1.0 if len(self.times) > 1 and self.times[1] < self.times[0] else 1.0
        self.taus = [self.direction * v for v in self.times]  # ascending, as the solver integrates
        self.steps: list[tuple[float, float, float]] = []

    def forward(self, y0: State) -> tuple[State, list[Tensor]]:
        """The solution (no graph) and the flat list of the accepted steps' start states."""
        record = _Checkpoints()
        solution, _ = solve_adaptive(self.func, y0, self.times, self.tableau, self.rtol, self.atol,
                                     self.before_eval, record=record)
        self.steps = [step for step, _ in record]
        self.real_dtype = y0[0].real.dtype if y0[0].is_complex() else y0[0].dtype
        self.device = y0[0].device
        return solution, [y for _, start in record for y in start]

    def _call(self, tau: float, y: State) -> State:
        self.counter.backward += 1
        time = torch.scalar_tensor(self.direction * tau, dtype=self.real_dtype, device=self.device)
        return tuple(self.func(time, y))

    def _step_vjp(self, n: int, start: Sequence[Tensor], lam: list[Tensor | None],
                  inside: list[tuple[float, list[Tensor | None]]], params: Sequence[Tensor]):
        """Cotangents of step ``n``'s start state and of ``params``, given those of its end state
        (``lam``) and of the outputs interpolated inside it (``inside``: ``(tau, cotangents)``)."""
        tau0, tau1, h = self.steps[n]
        dt = self.direction * h  # the step in ascending time, exactly as the solver held it
        tab = self.tableau
        stages = len(tab.alpha)
        y0 = tuple(y.detach().requires_grad_(True) for y in start)
        with torch.enable_grad():
            ks = [self._call(tau0, y0)]
            y_stage = y0
            for i in range(stages):  # solve_adaptive's stage loop
                y_stage = _combine(y0, [(h * bij, k) for bij, k in zip(tab.beta[i], ks)])
                if i < stages - 1 or inside:  # the last stage (at y1) only feeds the interpolant
                    alpha = tab.alpha[i]
                    ks.append(self._call(tau1 if alpha == 1.0 else tau0 + alpha * dt, y_stage))
            y1 = y_stage  # first same as last: the last stage's input is the solution
            outs, cots = [], []
            for c, g in enumerate(lam):
                if g is not None:
                    outs.append(y1[c])
                    cots.append(g)
            if inside:
                step = _Step(tau0, tau1, h, y0, y1, ks)
                for tau, cot in inside:
                    value = step.interpolate(tau, tab)
                    for c, g in enumerate(cot):
                        if g is not None:
                            outs.append(value[c])
                            cots.append(g)
        # retain_graph: what the parameters feed into the dynamics (e.g. packed parameters shared
        # by every evaluation) is part of every step's graph and of the outer one
        grads = torch.autograd.grad(outs, (*y0, *params), cots, allow_unused=True, retain_graph=True)
        return list(grads[:len(y0)]), grads[len(y0):]

    def backward(self, starts: Sequence[Tensor], grads: Sequence[Tensor | None], params: Sequence[Tensor]):
        """Cotangents of the initial state and of ``params`` given those of the solution."""
        n_state = len(grads)
        where: dict[int, list[int]] = {}  # step -> outputs taken from it: the first step reaching them
        n = 0
        for j in range(1, len(self.taus)):
            while self.steps[n][1] < self.taus[j]:
                n += 1
            where.setdefault(n, []).append(j)
        lam: list[Tensor | None] = [None] * n_state
        grad_params: list[Tensor | None] = [None] * len(params)
        for n in range(len(self.steps) - 1, -1, -1):
            inside = []
            for j in where.get(n, []):
                cot = [None if g is None else g[j] for g in grads]
                if self.taus[j] == self.steps[n][1]:  # the step's end state itself
                    lam = [_add(a, b) for a, b in zip(lam, cot)]
                elif any(g is not None for g in cot):
                    inside.append((self.taus[j], cot))
            if all(g is None for g in lam) and not inside:
                continue  # nothing downstream depends on this step
            lam, step_params = self._step_vjp(n, starts[n * n_state:(n + 1) * n_state], lam, inside, params)
            grad_params = [_add(a, b) for a, b in zip(grad_params, step_params)]
        lam = [_add(a, None if g is None else g[0]) for a, g in zip(lam, grads)]  # output 0 is y0
        return lam, grad_params


class _RecomputedSolve(torch.autograd.Function):
    """``(initial state, parameters) -> solution``; the backward pass recomputes step by step."""

    @staticmethod
    def forward(ctx, run: _Run, n_state: int, *inputs):  # type: ignore[override]
        y0 = tuple(x.detach() for x in inputs[:n_state])
        solution, starts = run.forward(y0)
        ctx.run, ctx.n_state, ctx.n_starts = run, n_state, len(starts)
        # freed after the backward pass, as recorded graphs are; the parameters for the version
        # check (an in-place update before the backward pass would change the recomputed steps)
        ctx.save_for_backward(*starts, *inputs[n_state:])
        ctx.set_materialize_grads(False)
        return solution

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError("a differentiable backward pass (create_graph=True) through a solve with "
                               "solver.recompute=true is not supported; set solver.recompute=false")
        n_state = ctx.n_state
        needs = ctx.needs_input_grad[2:]
        saved = ctx.saved_tensors
        starts, all_params = saved[:ctx.n_starts], saved[ctx.n_starts:]
        params = [p for p, need in zip(all_params, needs[n_state:]) if need]
        grad_state, grad_needed = ctx.run.backward(starts, grads, params)
        it = iter(grad_needed)
        grad_params = [next(it) if need else None for need in needs[n_state:]]
        grad_state = [g if need else None for g, need in zip(grad_state, needs[:n_state])]
        return (None, None, *grad_state, *grad_params)


def recomputed_solve(func: Callable[[Tensor, State], State], y0: State, t: Sequence[float], tableau: ButcherTableau,
                     rtol: float, atol: float, before_eval: Callable[[float, float], None] | None,
                     params: Sequence[Tensor], counter) -> State:
    """:func:`solve_adaptive`'s solution, differentiable by per-step recomputation (module docstring).

    Args:
        func, y0, t, tableau, rtol, atol, before_eval: as for :func:`solve_adaptive`
            (``before_eval`` sees the forward solve's evaluations only).
        params: the tensors ``func`` depends on that receive a gradient (those not requiring
            grad are skipped).
        counter: its ``backward`` attribute grows by one per evaluation of the backward pass.

    Returns:
        per component of ``y0``, the values at every time of ``t`` stacked along a new first dimension.
    """
    run = _Run(func, t, tableau, rtol, atol, before_eval, counter)
    params = list({id(p): p for p in params if p.requires_grad}.values())  # each once
    return tuple(_RecomputedSolve.apply(run, len(y0), *y0, *params))
