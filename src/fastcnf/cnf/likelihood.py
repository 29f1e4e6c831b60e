"""Log-densities of any velocity field ``v(t, x)`` by fastcnf's engine: exact trace or Hutchinson.

A velocity field that carries data to a source distribution defines a CNF, and its log-density
follows from the instantaneous change of variables (FFJORD eq. 4)::

    log p(x) = log p_prior(z(T)) + int_0^T tr(df/dz)(t, z(t)) dt,   dz/dt = f(t, z),  z(0) = x

:func:`log_prob` wraps the field as the dynamics of a :class:`~fastcnf.cnf.block.CNFBlock` and
solves once: same solvers, tolerances, NFE accounting and divergence estimators as training, and
every fast path of the engine (a concat-squash MLP in fastcnf's own convention gets its fused
forward-mode exact trace).

Time conventions (``T = end_time``):

* ``data_to_noise`` (fastcnf's; flow-matching models trained by :mod:`fastcnf.flow_matching.loss`):
  ``f(t, z) = v(t, z)``, data at ``t = 0``, source at ``t = T``.
* ``noise_to_data`` (torchcfm, facebookresearch/flow_matching: source at ``t = 0``, data at
  ``t = T``): ``f(s, z) = -v(T - s, z)`` -- the same trajectories run backwards.

Divergence: ``exact`` (FFJORD's exact trace; the network's forward-mode trace, a batched
vector-Jacobian product, or one pass per dimension) or ``hutchinson`` (FFJORD eq. 7) with
``probes`` independent probes per example, each held fixed along its solve: the batch is repeated
``probes`` times in one solve, and the result is the mean over probes with its standard error.

References: Grathwohl et al. 2019, "FFJORD: Free-form Continuous Dynamics for Scalable Reversible
Generative Models", eq. 4 and 7; Chen et al. 2018, "Neural Ordinary Differential Equations".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from fastcnf.cnf.block import CNFBlock
from fastcnf.cnf.divergence import DivergenceEstimator, ExactTrace, Hutchinson
from fastcnf.ode.solve import SolverConfig

__all__ = ["LogProbResult", "TIME_CONVENTIONS", "log_prob", "standard_normal_log_density"]

TIME_CONVENTIONS = ("data_to_noise", "noise_to_data")
DIVERGENCES = ("exact", "hutchinson")


@dataclass
class LogProbResult:
    """Result of :func:`log_prob`.

    Attributes:
        log_prob: (B,) log-density per example (with Hutchinson: the mean over probes).
        stderr: (B,) standard error of that mean over probes (Hutchinson with ``probes > 1``);
            None for the exact trace and for a single probe.
        nfe_forward: function evaluations of the solve (all probes share one solve).
        probes: Hutchinson probes per example (1 for the exact trace).
    """

    log_prob: Tensor
    stderr: Tensor | None
    nfe_forward: int
    probes: int


def standard_normal_log_density(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` summed over all non-batch dimensions, (B,)."""
    return (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).reshape(z.shape[0], -1).sum(1)


class _VelocityDynamics(nn.Module):
    """A velocity callable as a CNF block's dynamics ``f(t, z)`` in fastcnf's convention.

    Built per call of :func:`log_prob`; ``cond`` is that call's conditioning (repeated over probes).
    """

    def __init__(self, velocity: Callable[..., Tensor], reverse: bool, end_time: float,
                 cond: Tensor | None) -> None:
        super().__init__()
        self.velocity = velocity  # a module is registered (its parameters are the block's); a function is kept as is
        self.reverse = reverse
        self.end_time = end_time
        self.cond = cond

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        args = () if self.cond is None else (self.cond,)
        if self.reverse:
            return -self.velocity(self.end_time - t, z, *args)
        return self.velocity(t, z, *args)


def _prior_log_density(prior, z: Tensor) -> Tensor:
    if prior is None:
        return standard_normal_log_density(z)
    if hasattr(prior, "log_prob"):  # a fastcnf prior or a torch distribution
        out = prior.log_prob(z)
    else:
        out = prior(z)
    if out.shape != z.shape[:1]:
        raise ValueError(f"prior log-density must have shape ({z.shape[0]},), got {tuple(out.shape)}")
    return out


def _repeat(x: Tensor, probes: int) -> Tensor:
    return x.repeat(probes, *([1] * (x.dim() - 1))) if probes > 1 else x


def log_prob(
    velocity: Callable[..., Tensor],
    x: Tensor,
    *,
    prior: Callable[[Tensor], Tensor] | None = None,
    divergence: str = "exact",
    probes: int = 1,
    noise: str = "rademacher",
    atol: float = 1e-5,
    rtol: float = 1e-5,
    method: str = "dopri5",
    end_time: float = 1.0,
    time_convention: str = "data_to_noise",
    cond: Tensor | None = None,
    generator: torch.Generator | None = None,
    max_nfe: int = 10000,
    grad: bool = False,
) -> LogProbResult:
    """Log-density of ``x`` under the CNF defined by the velocity field ``velocity``.

    Args:
        velocity: any callable ``v(t, x)`` (an ``nn.Module`` or a function; ``v(t, x, cond)`` when
            ``cond`` is given), called with a scalar tensor ``t`` and a batch like ``x``.
        x: batch (B, ...) in the data space.
        prior: log-density of the source at the latent end, a callable ``z -> (B,)`` or an object
            with ``log_prob`` (fastcnf prior, torch distribution); default standard normal.
        divergence: ``exact`` or ``hutchinson``.
        probes: Hutchinson probes per example (``exact`` takes 1).
        noise: Hutchinson probe distribution, ``rademacher`` (lowest variance among unit-covariance
            probes with independent entries) or ``gaussian``.
        atol, rtol, method, max_nfe: solver settings (:class:`~fastcnf.ode.solve.SolverConfig`).
        end_time: the time ``T`` at which the field reaches the source (1 for flow matching).
        time_convention: ``data_to_noise`` (fastcnf) or ``noise_to_data`` (torchcfm and most flow
            matching code; integrated as ``f(s, z) = -v(T - s, z)``).
        cond: per-example conditioning (B, ...) passed as ``velocity``'s third argument (e.g. labels).
        generator: random source of the Hutchinson probes.
        grad: keep the graph for back-propagation (default: no gradients are tracked).

    Returns:
        :class:`LogProbResult` with the per-example log-density, its standard error (Hutchinson,
        ``probes > 1``), the solve's NFE and the number of probes.

    Raises:
        ValueError: unknown divergence or time convention, ``probes < 1``, or ``probes > 1`` with
            the exact trace.

    Example:
        >>> A = torch.tensor([[0.5, 0.2], [0.0, -0.3]])
        >>> res = log_prob(lambda t, x: x @ A.T, torch.randn(16, 2))
        >>> res.log_prob.shape, res.nfe_forward > 0
        (torch.Size([16]), True)
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; accepted: {', '.join(DIVERGENCES)}")
    if time_convention not in TIME_CONVENTIONS:
        raise ValueError(f"unknown time convention {time_convention!r}; accepted: {', '.join(TIME_CONVENTIONS)}")
    probes = int(probes)
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    if divergence == "exact" and probes != 1:
        raise ValueError("probes apply to the Hutchinson estimator; the exact trace takes probes=1")
    if cond is not None and cond.shape[0] != x.shape[0]:
        raise ValueError(f"cond ({cond.shape[0]}) and x ({x.shape[0]}) batches differ in size")
    reverse = time_convention == "noise_to_data"
    if isinstance(velocity, nn.Module) and not reverse and cond is None:
        net: nn.Module = velocity  # as it stands: the engine's fast paths (fused exact trace) apply
    else:
        net = _VelocityDynamics(velocity, reverse, float(end_time), _repeat(cond, probes) if cond is not None else None)
    estimator: DivergenceEstimator = ExactTrace() if divergence == "exact" else Hutchinson(noise, generator)
    solver = SolverConfig(method=method, atol=atol, rtol=rtol, max_nfe=max_nfe)
    block = CNFBlock(net, estimator, solver, end_time=float(end_time), name="log_prob")
    # T in the batch's dtype and device (not the velocity's: the block is never moved as a whole,
    # which would also move and retype a velocity module the caller owns)
    block.end_time_policy.to(dtype=x.dtype, device=x.device)
    b = x.shape[0]
    with torch.enable_grad() if grad else torch.no_grad():
        z, logdet = block(_repeat(x, probes))
        values = (_prior_log_density(prior, z) + logdet).reshape(probes, b)
    mean = values.mean(0)
    stderr = values.std(0, correction=1) / math.sqrt(probes) if probes > 1 else None
    return LogProbResult(log_prob=mean, stderr=stderr, nfe_forward=int(block.nfe.forward), probes=probes)
