"""Scoring new points: one log-density per row, in the data's own units.

``log p(x)`` of every row of an array, read batch by batch (a memory-mapped file stays on disk),
put in the model's scale (tables: standardised, and ``log |du/dx| = -sum log std`` added back;
images: uniformly dequantised with a seeded generator as in evaluation, also in bits/dim). The
divergence is the exact trace where the data's dimension allows (``EXACT_TRACE_MAX_DIM``) or
Hutchinson's estimator (Hutchinson 1989; FFJORD, Grathwohl et al. 2019, §3.1) with ``probes``
independent probes per row, whose mean is the score and whose standard error is returned beside it.
For class-conditional priors the score is the marginal ``log sum_y p(x | y) p(y)``.

With ``row_steps`` (the default) blocks whose exact-trace solve is fused (concat-squash MLP
dynamics) integrate every row with its own error control and step size
(:func:`fastcnf.ode.row_solver.solve_rows`; Lienen & Guennemann 2022, "torchode"): each row meets the
tolerance by itself rather than through a norm over the batch, easy rows take fewer steps, and a
row's score does not depend on the batch it is in. ``row_steps=False`` is evaluation's batch solve.
``steps`` solves instead with that many equal steps of a fixed-step method (the samplers'
:func:`fastcnf.ode.fixed_step.fixed_steps`): a known cost, ``steps`` x stages evaluations per row, and
an accuracy to be checked against an adaptive solve (``fastcnf score`` does).
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from fastcnf.cnf.divergence import ExactTrace, Hutchinson
from fastcnf.data.base import dequantize
from fastcnf.data.standardize import Standardizer
from fastcnf.evaluation.metrics import fork_rng
from fastcnf.models.flow_model import bits_per_dim_from_log_prob
from fastcnf.ode.fixed_step import fixed_steps

__all__ = ["EXACT_TRACE_MAX_DIM", "ScoreResult", "divergence_for_scoring", "row_steps_for_scoring", "score_rows"]

#: largest dimension scored with the exact trace by default (the dimension up to which
#: :class:`~fastcnf.cnf.divergence.ExactTrace` vectorises its ``D`` vector-Jacobian products)
EXACT_TRACE_MAX_DIM = 64


@dataclass
class ScoreResult:
    """Per-row scores: ``log_prob`` (nats, float64), ``stderr`` (Hutchinson's standard error per
    row, or None with the exact trace), ``bits_per_dim`` (images, else None), ``exact`` (trace used)
    and ``nfe`` (function evaluations per batch, mean; per row with per-row error control)."""

    log_prob: np.ndarray
    stderr: np.ndarray | None
    bits_per_dim: np.ndarray | None
    exact: bool
    nfe: float


@contextmanager
def _on_blocks(model: nn.Module, attr: str, value: Callable[[nn.Module], object]) -> Iterator[None]:
    """Set ``attr`` of every CNF block of ``model`` to ``value(block)`` for the duration of the
    block; the blocks' own values are restored afterwards."""
    blocks = list(model.cnf_blocks()) if hasattr(model, "cnf_blocks") else []
    saved = [getattr(b, attr) for b in blocks]
    try:
        for b in blocks:
            setattr(b, attr, value(b))
        yield
    finally:
        for b, v in zip(blocks, saved):
            setattr(b, attr, v)


def divergence_for_scoring(model: nn.Module, exact: bool):
    """Every CNF block of ``model`` uses the exact trace (``exact``) or Gaussian Hutchinson probes
    for the duration of the block; the blocks' own estimators are restored afterwards."""
    return _on_blocks(model, "divergence", lambda b: ExactTrace() if exact else (
        b.divergence if isinstance(b.divergence, Hutchinson) else Hutchinson()))


def row_steps_for_scoring(model: nn.Module, on: bool):
    """Every CNF block of ``model`` solves with per-row steps (``on``) for the duration of the block."""
    return _on_blocks(model, "row_steps", lambda b: on)


@torch.no_grad()
def score_rows(model: nn.Module, x: Tensor, *, standardizer: Standardizer | None = None, levels: int | None = None,
               batch_size: int = 10000, probes: int = 1, exact: bool | None = None, seed: int = 0,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               progress: bool = False, row_steps: bool = True, steps: int | None = None,
               method: str = "rk4") -> ScoreResult:
    """Log-densities of the rows of ``x`` under a :class:`~fastcnf.models.FlowModel`.

    Args:
        model: the trained flow (its evaluation tolerance is the accuracy of the scores).
        x: ``(N, *shape)`` rows in the data's own units (integer pixels for images); may be a view
            of a memory map: only one batch is read at a time.
        standardizer: the run's standardisation (tables), or None.
        levels: quantisation levels of images (dequantised with a generator seeded by ``seed``).
        batch_size: rows per solve.
        probes: Hutchinson probes per row when the trace is estimated (>= 2 gives a standard error).
        exact: exact trace; None: exact iff the dimension is at most :data:`EXACT_TRACE_MAX_DIM`.
        progress: show a tqdm progress bar on stderr.
        row_steps: per-row error control and step sizes where the solve is fused (module docstring);
            ``nfe`` is then the mean evaluations per row.
        steps, method: ``steps`` equal steps of the fixed-step ``method`` (euler, midpoint, heun,
            rk4) instead of the adaptive solver; None: adaptive.

    Example:
        >>> import torch
        >>> from fastcnf import CNFBlock, ConcatSquashMLP, FlowModel, SequentialFlow
        >>> model = FlowModel(SequentialFlow([CNFBlock(ConcatSquashMLP(2))], input_shape=(2,)))
        >>> x = torch.randn(5, 2)
        >>> r = score_rows(model, x, row_steps=False)  # evaluation's batch solve
        >>> ref = model.eval().log_prob(x).detach().double().numpy()
        >>> r.log_prob.shape, r.exact, bool(abs(r.log_prob - ref).max() < 1e-5)
        ((5,), True, True)
        >>> bool(abs(score_rows(model, x).log_prob - ref).max() < 1e-3)  # per-row steps: within the tolerance
        True
    """
    from tqdm import tqdm

    if batch_size < 1 or probes < 1:
        raise ValueError(f"batch size and probes must be >= 1, got {batch_size} and {probes}")
    dim = int(math.prod(x.shape[1:]))
    exact = dim <= EXACT_TRACE_MAX_DIM if exact is None else bool(exact)
    k = 1 if exact else probes
    prior = model.prior
    conditional = getattr(prior, "conditional", False)
    log_jac = standardizer.log_abs_det if standardizer is not None else 0.0
    n = x.shape[0]
    out = np.empty(n, dtype=np.float64)
    err = np.empty(n, dtype=np.float64) if k > 1 else None
    was_training = model.training
    model.eval()
    nfe = batches = 0
    try:
        fixed = fixed_steps(model, method, steps) if steps is not None else nullcontext()
        with divergence_for_scoring(model, exact), row_steps_for_scoring(model, row_steps), fixed, fork_rng(seed):
            gen = torch.Generator().manual_seed(seed)
            for start in tqdm(range(0, n, batch_size), disable=not progress, unit="batch", desc="score",
                              leave=False):
                xb = x[start:start + batch_size]
                if levels is not None:
                    xb = dequantize(xb, levels, generator=gen)
                elif standardizer is not None:
                    xb = standardizer.transform(xb)
                xb = xb.to(device, dtype)
                b = xb.shape[0]
                if k > 1:
                    xb = xb.repeat(k, *([1] * (xb.dim() - 1)))
                z, logdet = model(xb)
                lp_z = prior.marginal_log_prob(z) if conditional else prior.log_prob(z)
                lp = (lp_z + logdet).double().reshape(k, b).cpu() + log_jac
                out[start:start + b] = lp.mean(0).numpy()
                if err is not None:
                    err[start:start + b] = (lp.std(0, unbiased=True) / math.sqrt(k)).numpy()
                nfe += model.nfe_last()[0] if hasattr(model, "nfe_last") else 0
                batches += 1
    finally:
        model.train(was_training)
    bpd = None
    if levels is not None:
        bpd = bits_per_dim_from_log_prob(torch.from_numpy(out), dim, levels).numpy()
    return ScoreResult(out, err, bpd, exact, nfe / max(batches, 1))
