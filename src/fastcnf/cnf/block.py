"""One CNF block: integrates (z, log-determinant, regulariser states) from 0 to an end time T.

Instantaneous change of variables (Grathwohl et al. 2019, "FFJORD", eq. 2-4;
Du et al. 2022, "TO-FLOW", eq. 4-5)::

    dz/dt = f(t, z),   d log p(z(t))/dt = -tr(df/dz)
    log p(x) = log p(z(T)) + int_0^T tr(df/dz(t)) dt

The block integrates in rescaled time s = t / T on [0, 1] (dz/ds = T f(sT, z)), so that T is an
ordinary parameter of the right-hand side: its gradient is exact for direct and adjoint
back-propagation, and T can be learned (TO-FLOW) or randomised (STEER) without touching the
solver. ``forward`` maps data to latent and returns the log-determinant; ``inverse`` maps back.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from fastcnf.cnf.divergence import DivergenceEstimator, DivergenceResult, ExactTrace
from fastcnf.cnf.endtime import EndTimePolicy, FixedEndTime
from fastcnf.cnf.fused import fused_applicable, fused_solve, fused_solve_rows
from fastcnf.cnf.gradient import plan_and_run
from fastcnf.cnf.regularizers import Regularizer
from fastcnf.config import check_tolerance
from fastcnf.ode.solve import GradientPath, NFECounter, SolverConfig, solve

__all__ = ["CNFBlock", "ToleranceChoice", "pinned_tolerance"]

#: a per-solve solver choice: ``(block, block input) -> SolverConfig`` or None (the default solver)
ToleranceChoice = Callable[["CNFBlock", Tensor], "SolverConfig | None"]


class _SolveODE(nn.Module):
    """Right-hand side of one solve in rescaled time: (z, logdet, *regs) -> T * (f, div, *rates).

    Built afresh for every solve with that solve's end time, noise and regularisers, so that two
    solves of one block (e.g. a second forward before the first one's adjoint ``backward()``)
    never share state.
    """

    def __init__(self, net: nn.Module, divergence: DivergenceEstimator, end_time: Tensor,
                 noise: Tensor | None, with_logdet: bool, regularizers: Sequence[Regularizer]) -> None:
        super().__init__()
        self.net = net
        self.divergence = divergence
        self.__dict__["end_time"] = end_time  # may be a learned parameter: not registered here
        self.noise = noise
        self.with_logdet = with_logdet
        self.regularizers = list(regularizers)
        # a regulariser that takes a VJP of f (Jacobian-Frobenius) needs f differentiable once more
        self.regs_differentiate_f = any(r.needs_noise for r in self.regularizers)

    def forward(self, s: Tensor, state: tuple[Tensor, ...]):
        z = state[0]
        T = self.end_time
        t = s * T
        if not self.with_logdet:
            return (self.net(t, z) * T,)
        # a graph through the divergence is needed only when this evaluation is differentiated
        # (direct back-propagation, or the adjoint's backward solve), not in no-grad solves
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            # Differentiate w.r.t. a fresh leaf unless z is a live node of the graph being built.
            # In a no-grad solve (the adjoint's forward pass, evaluation) z can still report
            # requires_grad=True -- a view, taken under no_grad, of an input that requires grad --
            # while having no grad_fn: autograd.grad would then find no path to it and every
            # divergence would silently come out as 0.
            if not (create_graph and z.requires_grad):
                z = z.detach().requires_grad_(True)
            est = self.divergence
            if isinstance(est, ExactTrace) and est.uses_network_trace(self.net):
                if not (create_graph or self.regs_differentiate_f):  # values only (evaluation, scoring)
                    with torch.no_grad():
                        f, div = self.net.trace_forward(t, z.detach())
                elif create_graph and self.regs_differentiate_f:
                    # the Jacobian-Frobenius rate differentiates f once more (create_graph): the
                    # same tangents in plain differentiable operations
                    f, div = self.net._trace_forward_autograd(t, z)
                else:
                    f, div = self.net.trace_forward(t, z)
                result = DivergenceResult(div)
            else:
                f, result = est.evaluate(self.net, t, z, self.noise, create_graph=create_graph)
            rates = [r.rate(f, z, result, self.noise, create_graph) for r in self.regularizers]
        return (f * T, result.div * T, *(r * T for r in rates))


def _drop_odefunc_copy(state_dict, prefix, *args) -> None:
    """Checkpoints written before per-solve right-hand sides stored the network twice (also under
    ``odefunc.net``); the copy is dropped on load."""
    for key in [k for k in state_dict if k.startswith(prefix + "odefunc.")]:
        del state_dict[key]


class CNFBlock(nn.Module):
    """A continuous normalizing flow block.

    Args:
        net: dynamics ``f(t, z)`` (e.g. :class:`~fastcnf.cnf.dynamics.ConcatSquashMLP`).
        divergence: a divergence estimator (exact trace or Hutchinson).
        solver: solver configuration used in training mode.
        end_time: an :class:`EndTimePolicy` or a positive float T0 (fixed T).
        regularizers: integrated as extra states in training mode (evaluation skips them: they
            only enter the training loss); values of the last forward are in
            :attr:`reg_states` (name -> per-example integral).
        eval_solver: solver configuration in eval mode (default: ``solver``).
        name: names the block in NFE records and errors.
        tolerance: a per-solve tolerance choice (``(block, x) -> SolverConfig | None``, e.g. a
            learned gate of :mod:`fastcnf.tolerances`), consulted by :meth:`forward`.

    Example:
        >>> from fastcnf.cnf import CNFBlock, ConcatSquashMLP, ExactTrace
        >>> block = CNFBlock(ConcatSquashMLP(2), ExactTrace(), end_time=0.5)
        >>> z, logdet = block(torch.randn(8, 2))
    """

    def __init__(
        self,
        net: nn.Module,
        divergence: DivergenceEstimator | None = None,
        solver: SolverConfig | None = None,
        end_time: EndTimePolicy | float = 0.5,
        regularizers: Sequence[Regularizer] = (),
        eval_solver: SolverConfig | None = None,
        name: str = "cnf",
    ) -> None:
        super().__init__()
        self.net = net
        self.divergence = divergence if divergence is not None else ExactTrace()
        self.solver = solver if solver is not None else SolverConfig()
        self.eval_solver = eval_solver
        self.end_time_policy = end_time if isinstance(end_time, EndTimePolicy) else FixedEndTime(end_time)
        self.regularizers = list(regularizers)
        self.name = name
        self.nfe = NFECounter(name)
        #: without gradients, solve with per-row error control and step sizes where the fused path applies
        self.row_steps = False
        self.tolerance: ToleranceChoice | None = None
        #: set by :func:`pinned_tolerance`: overrides every other solver
        self.pinned_solver: SolverConfig | None = None
        #: regulariser integrals of the last forward (name -> per-example value); outputs, not inputs
        self.reg_states: dict[str, Tensor] = {}
        #: the gradient path of the last training solve (``solver.gradient``; fastcnf.cnf.gradient)
        self.gradient_record: GradientPath | None = None
        self._register_load_state_dict_pre_hook(_drop_odefunc_copy)

    @property
    def active_regularizers(self) -> list[Regularizer]:
        """The regularisers integrated now: all of them in training mode, none in evaluation."""
        return self.regularizers if self.training else []

    @property
    def end_time(self) -> Tensor:
        return self.end_time_policy.end_time

    def current_solver(self, x: Tensor | None = None) -> SolverConfig:
        """Pinned solver > the tolerance choice for input ``x`` (forward solves) > the evaluation
        solver in eval mode > the training solver."""
        if self.pinned_solver is not None:
            return self.pinned_solver
        if x is not None and self.tolerance is not None:
            chosen = self.tolerance(self, x)
            if chosen is not None:
                return chosen
        if not self.training and self.eval_solver is not None:
            return self.eval_solver
        return self.solver

    def _integrate(self, state: tuple[Tensor, ...], s0: float, s1: float, with_logdet: bool,
                   solver: SolverConfig):
        end_time = self.end_time_policy()
        regs = self.active_regularizers if with_logdet else []
        differentiate_f = any(r.needs_noise for r in regs)
        noise = None
        if with_logdet and (not isinstance(self.divergence, ExactTrace) or differentiate_f):
            est = self.divergence if not isinstance(self.divergence, ExactTrace) else None
            noise = est.sample_noise(state[0]) if est is not None else torch.randn_like(state[0])
        func = _SolveODE(self.net, self.divergence, end_time, noise, with_logdet, regs)
        t = torch.tensor([s0, s1], dtype=state[0].dtype, device=state[0].device)
        params = tuple(self.net.parameters()) + tuple(p for p in self.end_time_policy.parameters() if p.requires_grad)

        def run(path: GradientPath) -> tuple[Tensor, ...]:
            if path.path == "fused":
                return fused_solve(self, state, s0, s1, solver, end_time)
            out = solve(func, state, t, solver, self.nfe, name=self.name, adjoint_params=params, path=path)
            return tuple(o[-1] for o in out)

        fused_ok = fused_applicable(self, solver, state, with_logdet)
        if fused_ok and self.row_steps and not torch.is_grad_enabled():
            return fused_solve_rows(self, state, s0, s1, solver, end_time)
        return plan_and_run(self, solver, state, fused_ok, func, t, params, run)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Data -> latent. Returns ``(z, logdet)`` with ``log p(x) = log p(z) + logdet``."""
        b = x.shape[0]
        zeros = torch.zeros(b, dtype=x.dtype, device=x.device)
        state = (x, zeros, *(zeros for _ in self.active_regularizers))
        out = self._integrate(state, 0.0, 1.0, True, self.current_solver(x))
        self.reg_states = {r.name: v for r, v in zip(self.active_regularizers, out[2:])}
        return out[0], out[1]

    def inverse(self, z: Tensor, with_logdet: bool = False):
        """Latent -> data. With ``with_logdet`` also returns ``int_0^T tr(df/dz) dt`` along the
        trajectory (the same quantity :meth:`forward` returns for the recovered x)."""
        if not with_logdet:
            return self._integrate((z,), 1.0, 0.0, False, self.current_solver())[0]
        b = z.shape[0]
        zeros = torch.zeros(b, dtype=z.dtype, device=z.device)
        state = (z, zeros, *(zeros for _ in self.active_regularizers))
        out = self._integrate(state, 1.0, 0.0, True, self.current_solver())
        return out[0], -out[1]

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def extra_repr(self) -> str:
        return f"name={self.name!r}, divergence={self.divergence!r}, T0={self.end_time_policy.T0}"


@contextlib.contextmanager
def pinned_tolerance(blocks: Sequence[nn.Module], atol: float, rtol: float | None = None) -> Iterator[None]:
    """Solve every block at ``atol``/``rtol`` (train and eval mode) while the context is open;
    tolerance choices (learned gates) are not consulted. Restores the blocks afterwards."""
    atol = check_tolerance(atol, "atol")
    rtol = check_tolerance(atol if rtol is None else rtol, "rtol")
    saved = [b.pinned_solver for b in blocks]
    try:
        for b in blocks:
            base = b.eval_solver if b.eval_solver is not None else b.solver
            b.pinned_solver = base.with_tolerance(atol, rtol)
        yield
    finally:
        for b, s in zip(blocks, saved):
            b.pinned_solver = s
