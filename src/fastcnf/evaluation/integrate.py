"""Does the model density integrate to one? (Nguyen et al. 2019, "InfoCNF", §4.2, Appendix C,
Figure 2a)

A CNF's density is exact only up to the ODE solver's error. For 1-D and 2-D models the area
under ``p(x)`` is computed by a midpoint Riemann sum on a regular grid,

    integral ~= sum_k p(x_k) * prod_d dx_d,

at solver tolerances from 1e-8 (machine precision) to 1e-1; ``|integral - 1|`` measures the
solver's bias on the density. The model is evaluated in float64 (float32 cannot resolve 1e-8).
Conditional models (CCNF / InfoCNF) integrate their marginal ``sum_y p(x | y) p(y)``.

A model with learned tolerances is also integrated at the tolerances its gates choose (InfoCNF
App. D: each block at its gate's mean tolerance ``10**mu_i``), reported under ``"learned"`` with
the tolerances used. ``fastcnf eval DIR --integrate`` writes ``integrate.json`` and
``figures/integrate.png``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from fastcnf.cnf.block import pinned_tolerance
from fastcnf.config import check_tolerance
from fastcnf.data.base import DataBundle

__all__ = ["IntegrateError", "DEFAULT_TOLERANCES", "integration_grid", "integrate_density", "integrate_run"]

#: InfoCNF Figure 2a: from machine precision to very loose
DEFAULT_TOLERANCES: tuple[float, ...] = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


class IntegrateError(ValueError):
    """The density cannot be integrated on a grid (not a 1-D or 2-D model)."""


def integration_grid(data: torch.Tensor, n_points: int, pad: float = 0.5) -> tuple[torch.Tensor, float, list]:
    """Midpoints of a regular grid covering ``data`` (N, D), D in {1, 2}, padded by ``pad`` times
    its range on each side. Returns ``(points (n_points**D, D), cell volume, bounds)``."""
    lo = data.min(0).values.double()
    hi = data.max(0).values.double()
    span = (hi - lo).clamp_min(1.0)
    lo, hi = lo - pad * span, hi + pad * span
    axes, width = [], []
    for d in range(data.shape[1]):
        h = float(hi[d] - lo[d]) / n_points
        axes.append(float(lo[d]) + h * (torch.arange(n_points, dtype=torch.float64) + 0.5))
        width.append(h)
    mesh = torch.meshgrid(*axes, indexing="ij")
    points = torch.stack([m.reshape(-1) for m in mesh], 1)
    return points, math.prod(width), [[float(a), float(b)] for a, b in zip(lo, hi)]


@torch.no_grad()
def _log_density(model, x: torch.Tensor) -> torch.Tensor:
    z, logdet = model(x)
    prior = model.prior
    if getattr(prior, "conditional", False) and hasattr(prior, "marginal_log_prob"):
        return prior.marginal_log_prob(z) + logdet
    return prior.log_prob(z) + logdet


@contextlib.contextmanager
def _at_gate_means(model) -> Iterator[None]:
    """Every block at its learned gate's mean tolerance (the policy's ``mean`` evaluation mode)."""
    policy = model.tolerance_policy
    saved = policy.eval_mode
    policy.eval_mode = "mean"
    try:
        yield
    finally:
        policy.eval_mode = saved


@torch.no_grad()
def integrate_density(model, points: torch.Tensor, cell: float, tolerance: float | None,
                      batch_size: int = 4096) -> tuple[float, float]:
    """Riemann sum of ``model``'s density over ``points`` at solver tolerance ``tolerance``
    (atol = rtol; None: at the learned gates' mean tolerances). Returns ``(integral, mean forward
    NFE per batch)``."""
    blocks = model.cnf_blocks()
    if tolerance is None:
        context = _at_gate_means(model)
    else:
        tolerance = check_tolerance(tolerance, "integration tolerance")
        context = pinned_tolerance(blocks, tolerance, tolerance)
    total, nfe, batches = 0.0, 0, 0
    with context:
        for start in range(0, points.shape[0], batch_size):
            x = points[start:start + batch_size].to(next(model.parameters()).device)
            lp = _log_density(model, x)
            total += float(lp.exp().sum()) * cell
            nfe += model.nfe_last()[0]
            batches += 1
    return total, nfe / max(batches, 1)


def integrate_run(model: torch.nn.Module, bundle: DataBundle, run_dir: str | Path, tolerances: Sequence[float] = DEFAULT_TOLERANCES, n_points: int | None = None,
                  pad: float = 0.5) -> dict[str, Any]:
    """Integrate the density of a trained 1-D/2-D run at each tolerance; writes
    ``RUN/integrate.json`` and ``RUN/figures/integrate.png`` (log-log, InfoCNF Fig. 2a).

    Args:
        model: the trained model; bundle: its data set; run_dir: where the outputs go.
        tolerances: solver tolerances (each in (0, 1)).
        n_points: grid points per axis (default 4000 in 1-D, 200 in 2-D).
        pad: the grid spans the training data's range padded by ``pad`` times it on each side.

    Returns:
        ``{"dim", "grid", "results": {tol: {"integral", "abs_error", "nfe_forward"}}}``.

    Raises:
        IntegrateError: the model is not 1-D or 2-D (e.g. an image model).
    """
    shape = tuple(bundle.shape)
    if len(shape) != 1 or shape[0] not in (1, 2):
        raise IntegrateError(
            f"--integrate needs a 1-D or 2-D density model (a grid over the data space); data set "
            f"{bundle.name!r} has examples of shape {shape}. Use it with mix1d or a 2-D toy set.")
    tolerances = [check_tolerance(t, "integration tolerance") for t in tolerances]
    dim = shape[0]
    n_points = n_points or (4000 if dim == 1 else 200)
    points, cell, bounds = integration_grid(bundle.train.x.reshape(-1, dim), n_points, pad)
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    model.double()
    results: dict[str, dict[str, float]] = {}
    learned: dict[str, Any] | None = None
    try:
        for tol in tolerances:
            integral, nfe = integrate_density(model, points, cell, tol)
            results[f"{tol:.0e}"] = {"tolerance": tol, "integral": integral,
                                     "abs_error": abs(integral - 1.0), "nfe_forward": nfe}
        policy = getattr(model, "tolerance_policy", None)
        if policy is not None and hasattr(policy, "eval_mode"):  # learned tolerances (InfoCNF App. D)
            policy.eval_records = []
            integral, nfe = integrate_density(model, points, cell, None)
            chosen: dict[str, list[float]] = {}
            for i, mu, _ in policy.eval_records:
                chosen.setdefault(policy.names[i], []).append(policy.clamp(10.0 ** mu))
            learned = {"integral": integral, "abs_error": abs(integral - 1.0), "nfe_forward": nfe,
                       "tolerances": {k: float(np.mean(v)) for k, v in chosen.items()}}
    finally:
        model.to(dtype)
        model.train(was_training)
    out = {"dim": dim, "grid": {"bounds": bounds, "points_per_axis": n_points, "cell": cell},
           "results": results}
    if learned is not None:
        out["learned"] = learned
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".integrate.json.{os.getpid()}.tmp"  # atomic: readers never see half a file
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, run_dir / "integrate.json")
    _figure(results, run_dir / "figures" / "integrate.png")
    return out


def _figure(results: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tol = np.array([r["tolerance"] for r in results.values()])
    err = np.array([max(r["abs_error"], 1e-16) for r in results.values()])
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    ax.loglog(tol, err, "o-")
    ax.set_xlabel("solver tolerance (atol = rtol)")
    ax.set_ylabel("|integral of p(x) - 1|")
    ax.set_title("density integrates to one (InfoCNF Fig. 2a)")
    ax.grid(True, which="both", lw=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
