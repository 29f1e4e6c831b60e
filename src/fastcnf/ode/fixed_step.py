"""Fixed-step samplers: Euler, midpoint, Heun and RK4 with N equal steps (N = 1 allowed).

Every CNF solves through :func:`fastcnf.ode.solve.solve`; a fixed-step method there is one of
torchdiffeq's fixed-grid solvers (``euler``, ``midpoint``, ``rk4`` -- the 3/8 rule -- and ``heun``,
torchdiffeq's ``heun2``). A step size ``1 / N`` of the rescaled interval ``[0, 1]`` gives exactly
``N`` equal steps (:func:`fixed_grid_options`), so the number of function evaluations (NFE) of one
solve is ``N`` times the method's stages (:data:`EVALUATIONS_PER_STEP`).

:func:`fixed_steps` pins a model's CNF blocks to such a solver while a ``with`` block runs (sampling
and likelihood alike); the adaptive solvers stay every block's default.

References: Hairer, Norsett & Wanner 1993, "Solving Ordinary Differential Equations I", §II.1
(explicit Runge-Kutta methods); Liu et al. 2023, "Flow Straight and Fast" (few-step Euler sampling
of straightened flows).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import replace
from typing import Iterator

import torch

from fastcnf.config import ConfigError, SolverConfig

__all__ = ["EVALUATIONS_PER_STEP", "TORCHDIFFEQ_NAMES", "fixed_grid_options", "fixed_step_solver",
           "fixed_steps", "check_fixed_step"]

#: fixed-step method -> function evaluations per step
EVALUATIONS_PER_STEP: dict[str, int] = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}

#: fastcnf's method name -> torchdiffeq's, where they differ
TORCHDIFFEQ_NAMES: dict[str, str] = {"heun": "heun2"}


def check_fixed_step(method: str, steps: int) -> None:
    """Raise :class:`ConfigError` unless ``method`` is a fixed-step method and ``steps >= 1``."""
    if method not in EVALUATIONS_PER_STEP:
        raise ConfigError(f"fixed-step method must be one of {', '.join(EVALUATIONS_PER_STEP)}, got {method!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"the number of steps must be an integer >= 1, got {steps!r}")


def fixed_grid_options(step_size: float, length: float) -> dict:
    """torchdiffeq's options for a fixed-grid solve over an interval of ``length`` with steps of
    ``step_size`` (a fraction of the interval). When ``1 / step_size`` is an integer ``N`` the grid
    is ``N + 1`` equally spaced points: torchdiffeq's own grid rounds ``length / step`` up and, for
    e.g. ``step_size = 1/3``, would add a fourth step of length ~1e-16 (one more evaluation)."""
    n = round(1.0 / step_size)
    if n >= 1 and math.isclose(n * step_size, 1.0, rel_tol=1e-9):
        def grid(func, y0, t):
            g = torch.linspace(float(t[0]), float(t[-1]), n + 1, dtype=t.dtype, device=t.device)
            g[0], g[-1] = t[0], t[-1]  # torchdiffeq asserts the ends are exactly t's
            return g
        return {"grid_constructor": grid}
    return {"step_size": step_size * length}


def fixed_step_solver(base: SolverConfig, method: str, steps: int) -> SolverConfig:
    """``base`` with ``method`` and ``steps`` equal steps over the block's interval (torchdiffeq
    backend, no per-stage recomputation: neither applies to fixed grids)."""
    check_fixed_step(method, steps)
    # per-stage recomputation is for the lean adaptive solvers: a fixed-step solve back-propagates directly
    gradient = "direct" if base.gradient == "recompute" else base.gradient
    return replace(base, method=method, step_size=1.0 / steps, gradient=gradient, backward_precision="float32")


@contextlib.contextmanager
def fixed_steps(model, method: str, steps: int) -> Iterator[int]:
    """Solve every CNF block of ``model`` (anything with ``cnf_blocks()``) with ``steps`` steps of
    ``method`` while the context is open, in training and evaluation mode; restores the blocks'
    solvers afterwards. Yields the NFE of one solve of one block (``steps`` x stages).

    Example:
        >>> from fastcnf.cnf import CNFBlock, ConcatSquashMLP
        >>> from fastcnf.flows import SequentialFlow
        >>> from fastcnf.models import FlowModel
        >>> model = FlowModel(SequentialFlow([CNFBlock(ConcatSquashMLP(2), end_time=1.0)], input_shape=(2,)))
        >>> with fixed_steps(model, "rk4", 2) as nfe:
        ...     x = model.sample(16)
        >>> nfe, model.nfe_last()[0]
        (8, 8)
    """
    check_fixed_step(method, steps)
    if not hasattr(model, "cnf_blocks"):
        raise ConfigError(f"fixed-step solvers apply to flows made of CNF blocks, not to a {type(model).__name__}")
    blocks = list(model.cnf_blocks())
    saved = [b.pinned_solver for b in blocks]
    try:
        for b in blocks:
            base = b.eval_solver if b.eval_solver is not None else b.solver
            b.pinned_solver = fixed_step_solver(base, method, steps)
        yield steps * EVALUATIONS_PER_STEP[method]
    finally:
        for b, s in zip(blocks, saved):
            b.pinned_solver = s
