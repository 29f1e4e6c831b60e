"""Solving layer: one entry point with per-solve NFE accounting and a step cap.

Every CNF block (and the LatentODE) solves through :func:`solve`. It counts the number of
function evaluations (NFE) of the forward solve and of the backward pass separately, in a
:class:`NFECounter` owned by the caller, and stops a runaway solve with a
:class:`SolverBudgetExceeded` error naming the block, the time reached and the last step.

Two backends integrate: torchdiffeq (the reference; every method, the adjoint) and fastcnf's
lean dopri5/bosh3 (:mod:`fastcnf.ode.fast_solvers`: the same steps and solutions as torchdiffeq
in fewer operations), used by default wherever it applies: an adaptive method it implements,
with direct back-propagation or without gradients. See ``benchmarks/README.md`` (speed). With
``solver.gradient=recompute`` its direct back-propagation recomputes one stage evaluation at a time instead
of keeping the graph of the whole solve (:mod:`fastcnf.ode.recompute`).

References: Chen et al. 2018 (neural ODEs, adjoint method); Grathwohl et al. 2019 (FFJORD).
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint

from fastcnf.config.schema import SolverConfig
from fastcnf.ode.budget import check_budget
from fastcnf.ode.fast_solvers import LEAN_METHODS, solve_adaptive
from fastcnf.ode.fixed_step import TORCHDIFFEQ_NAMES, fixed_grid_options
from fastcnf.ode.recompute import recomputed_solve

__all__ = [
    "SolverConfig",
    "SolverBudgetExceeded",
    "NFECounter",
    "solve",
    "forward_counter",
    "GRADIENT_PATHS",
    "GradientPath",
    "MemoryEstimate",
    "gradient_path",
    "bfloat16_native",
    "free_memory_bytes",
    "memory_budget_bytes",
    "saved_bytes",
]

class SolverBudgetExceeded(RuntimeError):
    """A solve used more function evaluations than its cap allows."""


class NFECounter:
    """Counts function evaluations of one block: the current solve and running means.

    ``forward`` / ``backward`` hold the counts of the last solve (the backward count grows while
    its backward pass runs). ``mean_forward`` / ``mean_backward`` average over all solves recorded
    since the last :meth:`reset`. A new solve commits the previous one to the means.
    """

    def __init__(self, name: str = "block") -> None:
        self.name = name
        self.reset()

    def reset(self) -> None:
        self.forward = 0
        self.backward = 0
        self._active = False
        self._sum_forward = 0
        self._sum_backward = 0
        self._n = 0
        self.last_t = float("nan")
        self.last_dt = float("nan")

    def begin(self) -> None:
        if self._active:
            self._sum_forward += self.forward
            self._sum_backward += self.backward
            self._n += 1
        self.forward = 0
        self.backward = 0
        self._active = True
        self.last_t = float("nan")
        self.last_dt = float("nan")

    @property
    def mean_forward(self) -> float:
        n = self._n + (1 if self._active else 0)
        return (self._sum_forward + (self.forward if self._active else 0)) / max(n, 1)

    @property
    def mean_backward(self) -> float:
        n = self._n + (1 if self._active else 0)
        return (self._sum_backward + (self.backward if self._active else 0)) / max(n, 1)

    def record(self) -> dict[str, int]:
        return {"forward": self.forward, "backward": self.backward}

    @property
    def total(self) -> int:
        """Forward + backward evaluations of every solve since the last :meth:`reset`."""
        current = (self.forward + self.backward) if self._active else 0
        return self._sum_forward + self._sum_backward + current


def _budget_error(name: str, phase: str, max_nfe: int, t: float, dt: float) -> SolverBudgetExceeded:
    return SolverBudgetExceeded(
        f"{name}: {phase} solve exceeded max_nfe={max_nfe} "
        f"at time t={t:.6g} (rescaled to [0,1]) with last step size {dt:.3g}; "
        "the dynamics are too stiff for the tolerances: raise the tolerances, "
        "regularise the dynamics, or raise solver.max_nfe"
    )


class _CountGraphBackward(torch.autograd.Function):
    """Identity on the solution's components; its backward adds the number of evaluations the
    solution depends on to the backward count (once per backward pass)."""

    @staticmethod
    def forward(ctx, counter, n, *xs):  # type: ignore[override]
        ctx.counter, ctx.n = counter, n
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        ctx.counter.backward += ctx.n
        return (None, None, *grads)


class _CountBackward(torch.autograd.Function):
    """Identity whose backward counts one backward evaluation (direct back-propagation)."""

    @staticmethod
    def forward(ctx, counter_box, x):  # type: ignore[override]
        ctx.counter = counter_box
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        ctx.counter.backward += 1
        return None, grad


class _CountedFunc(nn.Module):
    """Wraps ``func(t, state)`` to count evaluations and enforce the NFE cap.

    Evaluations made while :func:`solve` runs count as forward; any later evaluation (the adjoint
    solve inside ``backward()``) counts as backward. With direct back-propagation each evaluation's
    output carries a hook that counts its backward pass.
    """

    def __init__(self, func: nn.Module | Callable, counter: NFECounter, max_nfe: int, name: str, direct: bool):
        super().__init__()
        self.func = func
        self.counter = counter
        self.max_nfe = int(max_nfe)
        self.name = name
        self.direct = direct
        self.in_forward = False

    def callback_step(self, t0: Tensor, y0, dt: Tensor) -> None:
        """torchdiffeq calls this at the start of every step: remember where the solver is, so
        the NFE-cap error can name the time reached and the step size."""
        self.counter.last_t = float(t0.detach())
        self.counter.last_dt = float(dt.detach())

    callback_step_adjoint = callback_step

    def forward(self, t: Tensor, state):
        c = self.counter
        if self.in_forward:
            c.forward += 1
            n, phase = c.forward, "forward"
        else:
            c.backward += 1
            n, phase = c.backward, "backward"
        if self.max_nfe and n > self.max_nfe:
            raise _budget_error(self.name, phase, self.max_nfe, c.last_t, c.last_dt)
        if over := check_budget(self.name, phase, n):  # the wall-time cap of an evaluation (fastcnf.ode.budget)
            raise SolverBudgetExceeded(over)
        out = self.func(t, state)
        if self.direct and self.in_forward and torch.is_grad_enabled():
            first = out[0] if isinstance(out, tuple) else out
            if first.requires_grad:
                first = _CountBackward.apply(c, first)
                out = (first,) + tuple(out[1:]) if isinstance(out, tuple) else first
        return out


def solve(
    func: nn.Module,
    state: Tensor | tuple[Tensor, ...],
    t: Tensor,
    config: SolverConfig,
    counter: NFECounter,
    name: str = "block",
    adjoint_params: Sequence[Tensor] | None = None,
    path: GradientPath | None = None,
):
    """Integrate ``d state / dt = func(t, state)`` over the time points ``t`` (first to last).

    Args:
        func: module mapping ``(t, state)`` to the time derivative of ``state`` (same structure).
        state: initial state, a tensor or tuple of tensors.
        t: 1-D tensor of time points, monotone.
        config: method, tolerances, adjoint choice and NFE cap.
        counter: receives the NFE of this solve (``counter.begin()`` is called here).
        name: names the block in errors.
        adjoint_params: parameters the adjoint solve (and recomputation's backward pass)
            differentiates (default: ``func``'s).
        path: how the gradient is computed (default: :func:`gradient_path` of ``config``).

    Returns:
        the solution at every time point (leading dimension ``len(t)``), structured as ``state``.

    Raises:
        SolverBudgetExceeded: a forward or backward solve needed more than ``config.max_nfe``
            evaluations.
    """
    counter.begin()
    path = gradient_path(config) if path is None else path
    use_adjoint = path.path == "adjoint" and torch.is_grad_enabled()
    if config.backend == "fastcnf" and config.method in LEAN_METHODS and not use_adjoint:
        return _solve_lean(func, state, t, config, counter, name, adjoint_params, path)
    wrapped = _CountedFunc(func, counter, config.max_nfe, name, direct=not use_adjoint)
    kwargs: dict = {"method": TORCHDIFFEQ_NAMES.get(config.method, config.method)}
    if config.adaptive:
        kwargs.update(atol=config.atol, rtol=config.rtol)
    else:
        kwargs["options"] = fixed_grid_options(config.step_size, float(abs(t[-1] - t[0])))
    wrapped.in_forward = True
    try:
        if use_adjoint:
            if config.adaptive:
                kwargs["adjoint_atol"] = config.adjoint_atol if config.adjoint_atol is not None else config.atol
                kwargs["adjoint_rtol"] = config.adjoint_rtol if config.adjoint_rtol is not None else config.rtol
            out = odeint_adjoint(wrapped, state, t, adjoint_params=differentiated_params(func, adjoint_params),
                                 **kwargs)
        else:
            out = odeint(wrapped, state, t, **kwargs)
    finally:
        wrapped.in_forward = False
    return out


def forward_counter(counter: NFECounter, max_nfe: int, name: str) -> Callable[[float, float], None]:
    """A ``before_eval`` callback for the lean solvers: counts forward evaluations in ``counter``
    and raises :class:`SolverBudgetExceeded` past ``max_nfe`` (0: no cap)."""
    max_nfe = int(max_nfe)

    def before_eval(time: float, step: float) -> None:
        n = counter.forward + 1
        if max_nfe and n > max_nfe:
            raise _budget_error(name, "forward", max_nfe, time, step if math.isfinite(step) else counter.last_dt)
        if over := check_budget(name, "forward", n):  # the wall-time cap of an evaluation (fastcnf.ode.budget)
            raise SolverBudgetExceeded(over)
        counter.forward = n
        counter.last_t = time
        if math.isfinite(step):
            counter.last_dt = step

    return before_eval


def differentiated_params(func, adjoint_params: Sequence[Tensor] | None) -> tuple[Tensor, ...]:
    """The tensors a solve's backward pass differentiates besides the state (adjoint and
    recomputation alike): ``adjoint_params`` if given, else ``func``'s parameters."""
    if adjoint_params is not None:
        return tuple(adjoint_params)
    return tuple(func.parameters()) if isinstance(func, nn.Module) else ()


#: ``solver.backward_precision`` -> the autocast dtype of the recomputed backward pass (float32: none)
LOWER_PRECISION = {"bfloat16": torch.bfloat16}


def _solve_lean(func, state, t: Tensor, config: SolverConfig, counter: NFECounter, name: str,
                adjoint_params: Sequence[Tensor] | None = None, path: GradientPath | None = None):
    """:func:`solve` through :func:`fastcnf.ode.fast_solvers.solve_adaptive` (direct or no grad);
    on the ``recompute`` path with gradients, through :func:`fastcnf.ode.recompute.recomputed_solve`
    (backward NFE: the evaluations it makes again)."""
    is_tuple = isinstance(state, tuple)
    y0 = state if is_tuple else (state,)
    rhs = func if is_tuple else (lambda tt, y: (func(tt, y[0]),))
    before_eval = forward_counter(counter, config.max_nfe, name)
    times = t.detach().cpu().tolist()
    tableau = LEAN_METHODS[config.method]
    if path is not None and path.path == "recompute" and torch.is_grad_enabled():
        params = differentiated_params(func, adjoint_params)
        if any(p.requires_grad for p in params) or any(s.requires_grad for s in y0):
            if t.requires_grad:
                raise ValueError(f"{name}: solver.gradient=recompute does not differentiate through the time "
                                 "points t (they require grad); pass them detached or set solver.gradient=direct")
            solution = recomputed_solve(rhs, y0, times, tableau, float(config.rtol), float(config.atol),
                                        before_eval, params, counter,
                                        backward_dtype=LOWER_PRECISION.get(path.backward_precision))
            return tuple(solution) if is_tuple else solution[0]
    solution, graph_evals = solve_adaptive(rhs, y0, times, tableau, float(config.rtol),
                                           float(config.atol), before_eval)
    if torch.is_grad_enabled() and any(s.requires_grad for s in solution):
        solution = _CountGraphBackward.apply(counter, graph_evals, *solution)
    return tuple(solution) if is_tuple else solution[0]


# ---- the gradient path of a solve (``solver.gradient``) ----------------------------------------

#: the paths a training solve's gradient can take, fastest first (what ``solver.gradient=auto`` tries)
GRADIENT_PATHS = ("fused", "direct", "recompute", "adjoint")

#: the share of the free memory (RAM on a CPU, device memory on a GPU) ``solver.memory_budget=0`` grants
BUDGET_SHARE = 0.5

_GIB = float(1 << 30)


@dataclass
class GradientPath:
    """How one solve's gradient is computed: ``path`` (one of :data:`GRADIENT_PATHS`), ``why`` (one
    line), and the precision of recomputation's backward re-evaluations actually used."""

    path: str
    why: str
    backward_precision: str = "float32"

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "why": self.why, "backward_precision": self.backward_precision}


@dataclass
class MemoryEstimate:
    """What ``solver.gradient=auto`` weighs (bytes). ``per_eval``: the tensors one evaluation of the
    dynamics saves for its backward pass (measured: :func:`saved_bytes`); ``state``: one copy of
    the solve's state; ``evals``: the evaluations a solve is expected to make (measured by one
    no-grad solve of the block, raised to the NFE of later solves as training changes it);
    ``budget``: what a block may hold."""

    per_eval: float
    state: float
    evals: int
    budget: float

    def direct(self) -> float:
        """Direct back-propagation (and the fused solve) keeps every evaluation's saved tensors."""
        return self.per_eval * self.evals

    def recompute(self) -> float:
        """Recomputation keeps each evaluation's state derivative and one evaluation's graph."""
        return self.per_eval + self.state * self.evals

    def need(self, path: str) -> float:
        """The bytes ``path`` holds (the adjoint: one evaluation's graph)."""
        return {"fused": self.direct, "direct": self.direct, "recompute": self.recompute}.get(
            path, lambda: self.per_eval)()


def _size(n: float) -> str:
    return f"{n / _GIB:.2f} GiB" if n >= _GIB / 10 else f"{n / (1 << 20):.1f} MiB"


def free_memory_bytes(device: torch.device | str = "cpu") -> float | None:
    """Memory free now: ``torch.cuda.mem_get_info`` on a GPU; on a CPU psutil's available RAM when
    psutil is installed, else ``MemAvailable`` of /proc/meminfo; None where neither can be read."""
    device = torch.device(device)
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil  # optional
        return float(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024.0
    except OSError:
        pass
    return None


def memory_budget_bytes(config: SolverConfig, device: torch.device | str = "cpu") -> float:
    """``solver.memory_budget`` GiB, or (0) :data:`BUDGET_SHARE` of :func:`free_memory_bytes`
    (infinite when the free memory cannot be read)."""
    if config.memory_budget > 0:
        return float(config.memory_budget) * _GIB
    free = free_memory_bytes(device)
    return math.inf if free is None else BUDGET_SHARE * free


def saved_bytes(fn: Callable[[], object], exclude: Sequence[Tensor] = ()) -> tuple[object, float]:
    """Run ``fn`` and count the bytes of the distinct storages autograd saves for its backward pass
    (``torch.autograd.graph.saved_tensors_hooks``), leaving out ``exclude``'s (the parameters)."""
    skip = {p.untyped_storage().data_ptr() for p in exclude}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, float(sum(seen.values()))


# Note on the estimate: tensors a custom autograd Function keeps outside ``save_for_backward`` (the
# fused exact trace's packed activations) escape :func:`saved_bytes`; for the toy MLPs where that
# path applies they are a few hidden widths per example, far below any budget.


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def bfloat16_native(device: torch.device | str = "cpu") -> tuple[bool, str]:
    """Whether ``device`` computes bfloat16 natively, and a few words on why (not): a CUDA GPU whose
    torch reports bfloat16 support; a CPU whose torch reports an AVX512-BF16/AMX capability or
    whose /proc/cpuinfo flags include ``avx512_bf16`` or ``amx_bf16``. Elsewhere bfloat16 is emulated
    (several times slower than float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        ok = bool(torch.cuda.is_bf16_supported())
        return ok, f"CUDA {'with' if ok else 'without'} bfloat16 support"
    capability = str(torch.backends.cpu.get_cpu_capability())
    cap = _onednn_isa_cap()
    if cap is not None:
        return False, f"CPU whose oneDNN is capped at {cap[1]} by {cap[0]}"
    flags = sorted(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
    if flags or "BF16" in capability.upper() or "AMX" in capability.upper():
        return True, f"CPU with {', '.join(flags) or capability}"
    return False, f"CPU without avx512_bf16/amx_bf16 (torch capability {capability})"


#: oneDNN's instruction-set cap (``ONEDNN_MAX_CPU_ISA``, formerly ``DNNL_MAX_CPU_ISA``) and the caps
#: below which it has no bfloat16 arithmetic (oneDNN's documentation, "CPU dispatcher control").
_ONEDNN_ISA_VARS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
_ONEDNN_NO_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"})


def _onednn_isa_cap() -> tuple[str, str] | None:
    """The variable and oneDNN cap set in the environment when the cap excludes bfloat16 arithmetic,
    else ``None``:
    the convolutions and matrix products then emulate bfloat16 whatever the CPU has (measured here:
    ``ONEDNN_MAX_CPU_ISA=AVX2`` makes a bfloat16 convolution 10x slower than float32 on an AMX CPU)."""
    for var in _ONEDNN_ISA_VARS:
        value = os.environ.get(var, "").strip().upper()
        if value:
            return (var, value) if value in _ONEDNN_NO_BF16 else None
    return None


def gradient_path(config: SolverConfig, *, device: torch.device | str = "cpu", fused_ok: bool = False,
                  estimate: MemoryEstimate | None = None) -> GradientPath:
    """The one place that maps ``solver.gradient`` (and ``backward_precision``) to a solve's path.

    ``direct`` / ``adjoint`` / ``recompute`` are taken as set. ``auto`` takes the first of
    fused (where ``fused_ok``: the block's dynamics compute their exact trace), direct
    back-propagation, per-stage recomputation (lean solver only) whose memory ``estimate`` fits its
    budget -- every one of them the exact gradient of the discretised solve -- and the adjoint when
    none fits; without an estimate (a solve outside a CNF block) it takes direct. Direct and fused
    hold ``per_eval * evals`` bytes, recomputation ``per_eval + state * evals``
    (:class:`MemoryEstimate`). ``backward_precision=bfloat16`` makes recomputation the path of
    ``auto`` and is kept only where :func:`bfloat16_native`; elsewhere the path runs in float32
    and ``why`` says so.
    """
    lean = config.backend == "fastcnf" and config.method in LEAN_METHODS
    precision, note = "float32", ""
    if config.backward_precision == "bfloat16":
        native, hardware = bfloat16_native(device)
        if native:
            precision = "bfloat16"
        else:
            note = f"; backward_precision=bfloat16 not honoured ({hardware}: emulated): float32 kept"
    if config.gradient != "auto":
        path = config.gradient
        return GradientPath(path, f"solver.gradient={path}{note}", precision if path == "recompute" else "float32")
    if precision == "bfloat16" and lean:
        return GradientPath("recompute", f"backward_precision=bfloat16 on native hardware: per-stage recomputation "
                                         f"in bfloat16", precision)
    if estimate is None:
        return GradientPath("fused" if fused_ok else "direct", f"no memory estimate{note}")
    budget = "unbounded" if math.isinf(estimate.budget) else _size(estimate.budget)
    tried = []
    for path, need, ok in (("fused", estimate.direct(), fused_ok), ("direct", estimate.direct(), True),
                           ("recompute", estimate.recompute(), lean)):
        if not ok:
            continue
        if need <= estimate.budget:
            return GradientPath(path, f"fastest exact path that fits: ~{_size(need)} for {estimate.evals} "
                                      f"evaluations, budget {budget}" + "".join(f"; {t}" for t in tried) + note)
        tried.append(f"{path} needs ~{_size(need)}")
    return GradientPath("adjoint", f"no exact path fits the budget ({budget}): " + "; ".join(tried) + note)
