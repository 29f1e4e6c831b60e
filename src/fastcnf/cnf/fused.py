"""A CNF block's whole solve as one autograd node: lean dopri5 + fused exact trace + discrete adjoint.

For a block whose dynamics compute their own exact trace (:class:`~fastcnf.cnf.dynamics.ConcatSquashMLP`,
FFJORD's toy model) and carry no regulariser states, :func:`fused_solve` integrates the state
``(z, logdet)`` of FFJORD eq. 4 in the block's rescaled time (``d/ds (z, logdet) = T (f, tr df/dz)``
at ``t = s T``) with the lean solver of :mod:`fastcnf.ode.fast_solvers`, evaluating the network's
forward-mode trace kernel directly, without recording anything for autograd. Its backward pass is
the *discrete adjoint* of the Runge-Kutta steps actually taken -- the gradient direct
back-propagation computes, written out by hand:

for an accepted step ``y1 = y0 + h sum_i b_i k_i`` with stages ``k_i = F(Y_i)``,
``Y_i = y0 + h sum_{j<i} a_ij k_j``, the cotangents run

    kbar_i = h b_i ybar1 + (from later stages),   Ybar_i = J_i^T kbar_i,
    kbar_j += h a_ij Ybar_i (j < i),               ybar0 = ybar1 + sum_i Ybar_i,

from the last stage to the first, each ``J_i^T`` being one call of the kernel's hand-written
backward (which also accumulates the parameters' gradient). dopri5's last stage is evaluated at
``y1`` and starts the next step (FSAL), so its cotangent is carried to the next step back; an output
interpolated inside the last step is a fixed combination of that step's stages
(:meth:`~fastcnf.ode.fast_solvers._Step.output_weights`). The log-density state does not enter the
dynamics, so its cotangent is constant along the solve. ``dL/dT`` (TO-FLOW) follows from
``dF/dT = (f, tr) + s T d(f, tr)/dt``.

Step sizes are constants of the backward pass (as in direct back-propagation through the lean
solver). The solution, the NFE and the gradients equal the unfused path's (``tests/engine``).

Whether a block takes this path is decided by ``solver.gradient`` (:func:`fastcnf.ode.solve.gradient_path`:
``auto`` takes it where it applies and fits the memory budget): this solve keeps every evaluation's
activations for its backward pass, memory growing with the NFE, where per-stage recomputation
(:mod:`fastcnf.ode.recompute`) holds one evaluation's graph.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastcnf.cnf.divergence import ExactTrace
from fastcnf.cnf.dynamics import ConcatSquashMLP
from fastcnf.cnf.trace_kernel import _Accumulator, _get_packed, _trace_backward, _trace_forward_kernel, trace_rows_kernel
from fastcnf.ode.fast_solvers import LEAN_METHODS, solve_adaptive
from fastcnf.ode.row_solver import solve_rows
from fastcnf.ode.solve import NFECounter, SolverConfig, forward_counter

__all__ = ["fused_applicable", "fused_solve", "fused_solve_rows"]


def fused_applicable(block, solver: SolverConfig, state: tuple[Tensor, ...], with_logdet: bool) -> bool:
    """Whether ``block`` can solve ``state`` through :func:`fused_solve` under ``solver`` (its structure;
    whether it does is the gradient path's choice)."""
    net = block.net
    return (
        with_logdet
        and solver.backend == "fastcnf"
        and solver.method in LEAN_METHODS
        and len(state) == 2  # no regulariser states
        and type(net) is ConcatSquashMLP
        and len(net.layers) >= 2
        and isinstance(block.divergence, ExactTrace)
        and block.divergence.uses_network_trace(net)
        and state[0].dim() == 2
        and state[1].dim() == 1
    )


class _Run:
    """One fused solve: the evaluations it saved and the steps it accepted."""

    def __init__(self, pk, solver: SolverConfig, counter: NFECounter, name: str, s0: float, s1: float) -> None:
        self.pk, self.solver, self.counter, self.name = pk, solver, counter, name
        self.s0, self.s1 = s0, s1
        self.tableau = LEAN_METHODS[solver.method]
        self.target = (-1.0 if s1 < s0 else 1.0) * s1  # the output time in the solver's ascending time

    def forward(self, z0: Tensor, l0: Tensor, T: Tensor, save: bool) -> tuple[Tensor, Tensor]:
        pk, acts = self.pk, self.pk.acts
        T = T.detach().to(z0.dtype)
        evals: list = []

        def rhs(s: Tensor, y):
            f, trace, saved = _trace_forward_kernel(acts, pk, s * T, y[0], save=save)
            if save:
                evals.append((float(s), saved, f, trace))
            return f * T, trace * T

        steps: list | None = [] if save else None
        solution, graph_evals = solve_adaptive(
            rhs, (z0, l0), [self.s0, self.s1], self.tableau, float(self.solver.rtol), float(self.solver.atol),
            forward_counter(self.counter, self.solver.max_nfe, self.name), record=steps)
        self.T, self.evals, self.steps, self.graph_evals = T, evals, steps, graph_evals
        return solution[0][-1], solution[1][-1]

    def backward(self, gz: Tensor | None, gl: Tensor | None, need_z: bool, need_l: bool, need_T: bool,
                 need_params: bool):
        """Cotangents of ``(z0, l0, T, parameters)`` given those of the outputs (module docstring)."""
        self.counter.backward += self.graph_evals
        if not self.steps:  # no step taken (s0 == s1): the output is the input
            return gz if need_z else None, gl if need_l else None, None, None
        pk, T, evals, tab = self.pk, self.T, self.evals, self.tableau
        z_like = self.steps[0].y0[0]
        if gz is None:
            gz = torch.zeros_like(z_like)
        if gl is None:
            gl = torch.zeros(z_like.shape[0], dtype=z_like.dtype, device=z_like.device)
        acts = pk.acts
        acc = _Accumulator(pk) if need_params else None
        grad_T = torch.zeros((), dtype=T.dtype, device=T.device) if need_T else None
        b_sol = tab.c_sol

        def vjp(index: int, kz: Tensor | None, kl: float) -> Tensor:
            """``J^T`` of evaluation ``index`` for the cotangent ``(kz, kl * gl)`` of ``T (f, tr)``."""
            nonlocal grad_T
            s, saved, f, trace = evals[index]
            grad_f = kz * T if kz is not None else torch.zeros_like(f)
            grad_trace = gl * (kl * T)
            grad_z, grad_t = _trace_backward(acts, pk, saved, grad_f, grad_trace, acc, need_T)
            if need_T:
                dot = (kz * f).sum() if kz is not None else 0.0
                grad_T = grad_T + dot + kl * (gl * trace).sum() + s * grad_t.reshape(())
            return grad_z

        n_steps = len(self.steps)
        interpolated = self.target != self.steps[-1].tau1
        lam = gz  # cotangent of the current step's end state (z part); unused if interpolated
        carry_z: Tensor | None = None  # cotangent of the next step's first stage = this step's last
        carry_l = 0.0
        for n in range(n_steps - 1, -1, -1):
            step = self.steps[n]
            h = step.dt
            n_k = len(step.ks)
            kz: list[Tensor | None] = [None] * n_k
            kl = [0.0] * n_k
            # the output is y_{N-1} + h sum_i w_i k_i inside the last step, else y_N; earlier steps
            # end at y_n = y_{n-1} + h sum_i b_i k_i, both with cotangent ``lam`` (z) and gl (logdet)
            coefs = step.output_weights(self.target, tab) if n == n_steps - 1 and interpolated else b_sol
            for i in range(n_k):
                if coefs[i] != 0.0:
                    kz[i] = lam * (h * coefs[i])
                    kl[i] = h * coefs[i]
            if carry_z is not None:
                kz[-1] = carry_z if kz[-1] is None else kz[-1] + carry_z
            kl[-1] += carry_l
            lam_prev = lam
            for i in range(n_k - 1, 0, -1):
                if kz[i] is None and kl[i] == 0.0:
                    continue
                g = vjp(step.evals[i], kz[i], kl[i])
                lam_prev = lam_prev + g
                for j, a in enumerate(tab.beta[i - 1]):
                    if a != 0.0:
                        kz[j] = g * (h * a) if kz[j] is None else kz[j].add(g, alpha=h * a)
            carry_z, carry_l = kz[0], kl[0]
            lam = lam_prev
        # the first stage of the first step: the evaluation at y0
        if carry_z is not None or carry_l != 0.0:
            lam = lam + vjp(self.steps[0].evals[0], carry_z, carry_l)
        grad_z0 = lam if need_z else None
        grad_flat = acc.flat_gradient(pk) if acc is not None and acc.rows else None
        return grad_z0, gl if need_l else None, grad_T, grad_flat


class _FusedSolve(torch.autograd.Function):
    """``(z0, logdet0, T, flat parameters) -> (z, logdet)`` at the end of the solve (one node)."""

    @staticmethod
    def forward(ctx, run: _Run, z0, l0, T, token):  # type: ignore[override]
        ctx.run = run
        return run.forward(z0, l0, T, save=True)

    @staticmethod
    def backward(ctx, gz, gl):  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(
                "a differentiable backward pass (create_graph=True) through a fused CNF solve is not "
                "supported; set solver.gradient=direct for higher-order gradients")
        need_z, need_l, need_T, need_p = ctx.needs_input_grad[1:5]
        gz0, gl0, gT, gflat = ctx.run.backward(gz, gl, need_z, need_l, need_T, need_p)
        if gT is not None:
            gT = gT.reshape(ctx.run.T.shape)
        return None, gz0, gl0, gT, gflat


def fused_solve(block, state: tuple[Tensor, Tensor], s0: float, s1: float, solver: SolverConfig,
                T: Tensor) -> tuple[Tensor, Tensor]:
    """Solve ``block``'s ``(z, logdet)`` from rescaled time ``s0`` to ``s1`` (see the module
    docstring); ``block.nfe`` receives the forward and backward evaluation counts."""
    counter = block.nfe
    counter.begin()
    pk = _get_packed(block.net)
    run = _Run(pk, solver, counter, block.name, s0, s1)
    z0, l0 = state
    grad = torch.is_grad_enabled() and (z0.requires_grad or l0.requires_grad or T.requires_grad
                                        or pk.token is not None)
    if not grad:
        with torch.no_grad():
            return run.forward(z0, l0, T, save=False)
    token = pk.token if pk.token is not None else pk.flat
    return _FusedSolve.apply(run, z0, l0, T, token)


@torch.no_grad()
def fused_solve_rows(block, state: tuple[Tensor, Tensor], s0: float, s1: float, solver: SolverConfig,
                     T: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`fused_solve` without gradients and with per-row error control and step sizes
    (:func:`fastcnf.ode.row_solver.solve_rows`): every row meets ``solver``'s tolerances on its own.
    ``block.nfe.forward`` receives the mean evaluations per row (rounded up)."""
    pk = _get_packed(block.net)
    T = T.detach().to(state[0].dtype)

    def rhs(s: Tensor, y):
        f, trace = trace_rows_kernel(pk, s * T, y[0])
        return f * T, trace * T

    counter = block.nfe
    counter.begin()
    (z, logdet), row_evals = solve_rows(rhs, tuple(state), s0, s1, LEAN_METHODS[solver.method],
                                        float(solver.rtol), float(solver.atol))
    counter.forward += -(-row_evals // max(state[0].shape[0], 1))
    return z, logdet
