"""Per-block and learned solver tolerances, the model side of :mod:`fastcnf.tolerances` (Nguyen
et al. 2019, "InfoCNF: Efficient Conditional Continuous
Normalizing Flow Using Adaptive Solvers", §3, §4.2, §4.4 and Appendix D).

The error tolerance of an adaptive solver decides its number of function evaluations (NFE) and so
the training time. A policy decides, for each CNF block, the tolerances of its solves:

* fixed — every block at ``solver.atol``/``rtol`` (nothing to do here);
* per block — :func:`per_block_solvers`: one tolerance per block, in forward order;
* learned — :class:`LearnedTolerance`: a gating network per block maps the block's input to a
  Gaussian over ``g = log10(tolerance)`` (§3: ``[mu_i, sigma_i^2] = G_i(x_i)``); one tolerance is
  sampled per block per batch and the gates are trained by REINFORCE on ``R_i = -NFE_i``
  (:mod:`fastcnf.tolerances.reinforce`).

Evaluation never uses a sampled tolerance: blocks solve at their evaluation tolerance (1e-5 as in
§4.2) or, when asked, at the gate's mean tolerance (Appendix D); a block pinned by
:func:`fastcnf.cnf.block.pinned_tolerance` never asks its gate. No module-level state: every choice
lives on the block or on the policy object.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Sequence

import torch
from torch import Tensor, nn

from fastcnf.config import ConfigError, SolverConfig, check_tolerance

__all__ = [
    "per_block_solvers",
    "ToleranceGate",
    "MLPGate",
    "ConvGate",
    "make_gate",
    "LearnedTolerance",
]


def _per_block(values: Sequence[float | None], n_blocks: int, name: str) -> list[float | None]:
    """A scalar-or-list setting broadcast to one value per block."""
    values = list(values) or [None]
    if len(values) == 1:
        values = values * n_blocks
    if len(values) != n_blocks:
        raise ConfigError(f"{name} has {len(values)} values but the model has {n_blocks} CNF blocks; "
                          f"give one value (all blocks) or {n_blocks} (one per block, forward order)")
    return [check_tolerance(v, f"{name}[{i}]", allow_none=True) for i, v in enumerate(values)]


def per_block_solvers(solver: SolverConfig, n_blocks: int, atol: Sequence[float], rtol: Sequence[float] = (),
                      adjoint_atol: Sequence[float] = (), adjoint_rtol: Sequence[float] = ()) -> list[SolverConfig]:
    """``solver`` with each block's tolerances (InfoCNF Appendix F's per-block baseline).

    Each list has one value per block in forward order or a single value for all blocks; an empty
    ``atol`` keeps ``solver.atol``, an empty ``rtol`` follows ``atol``, empty adjoint lists keep
    ``solver.adjoint_*``.
    """
    a = _per_block(atol, n_blocks, "tolerances.atol")
    r = _per_block(rtol, n_blocks, "tolerances.rtol") if rtol else a
    aa = _per_block(adjoint_atol, n_blocks, "tolerances.adjoint_atol")
    ar = _per_block(adjoint_rtol, n_blocks, "tolerances.adjoint_rtol")
    out = []
    for i in range(n_blocks):
        s = solver.with_tolerance(a[i] if a[i] is not None else solver.atol,
                                  r[i] if r[i] is not None else (a[i] if a[i] is not None else solver.rtol))
        if aa[i] is not None:
            s = replace(s, adjoint_atol=aa[i])
        if ar[i] is not None:
            s = replace(s, adjoint_rtol=ar[i])
        out.append(s)
    return out


# ---------------------------------------------------------------------------------------------
# gating networks (InfoCNF §3, Figure 1)
# ---------------------------------------------------------------------------------------------

class ToleranceGate(nn.Module):
    """A gating network ``G_i``: block input (B, ...) -> Gaussian over ``g = log10(tolerance)``.

    The features are averaged over the batch, since one tolerance is used per block per batch
    (InfoCNF §3). Subclasses provide :meth:`features` (B, hidden). The head is initialised so that
    every input gives ``mu = init_log10_tol`` and ``sigma = init_std``; learning moves it.

    Args:
        hidden: width of the features.
        init_log10_tol: initial mean of ``g`` (e.g. -5 for 1e-5).
        init_std: initial standard deviation of ``g`` (log10 units).
        min_std: floor of sigma (keeps the policy stochastic, so REINFORCE keeps exploring).
    """

    def __init__(self, hidden: int, init_log10_tol: float, init_std: float = 0.5, min_std: float = 0.05) -> None:
        super().__init__()
        if not init_std > min_std > 0:
            raise ConfigError(f"gate init_std must exceed min_std > 0, got {init_std}, {min_std}")
        self.head = nn.Linear(hidden, 2)
        self.min_std = float(min_std)
        with torch.no_grad():
            self.head.weight.mul_(0.01)
            self.head.bias[0] = float(init_log10_tol)
            # softplus(b) + min_std = init_std
            s = init_std - min_std
            self.head.bias[1] = s + math.log(-math.expm1(-s))

    def features(self, x: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, sigma)`` of ``g = log10(tolerance)`` for the batch ``x`` (scalars)."""
        h = self.features(x).mean(0)
        out = self.head(h)
        return out[0], nn.functional.softplus(out[1]) + self.min_std


class MLPGate(ToleranceGate):
    """Gate on vectors (B, D): ``Linear(D, hidden) -> tanh``, batch mean, linear head."""

    def __init__(self, dim: int, hidden: int = 16, **kwargs) -> None:
        super().__init__(hidden, **kwargs)
        self.body = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh())

    def features(self, x: Tensor) -> Tensor:
        return self.body(x.reshape(x.shape[0], -1))


class ConvGate(ToleranceGate):
    """Small CNN gate on images (B, C, H, W) (InfoCNF Figure 1): two 3x3 convolutions, softplus,
    global average pooling, batch mean, linear head."""

    def __init__(self, channels: int, hidden: int = 16, **kwargs) -> None:
        super().__init__(hidden, **kwargs)
        self.body = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.Softplus(),
            nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), nn.Softplus(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)


def make_gate(block: nn.Module, hidden: int, init_log10_tol: float, init_std: float, min_std: float) -> ToleranceGate:
    """The gate fitting ``block``'s input: a CNN for convolutional dynamics, an MLP for vectors.

    The input size is read from the first ``Conv2d``/``Linear`` of the block's dynamics network
    (the concat-squash layers take the state itself as input); a network that states its
    ``state_size`` (concat layers, whose first layer also takes t) gives it directly."""
    kw = dict(hidden=hidden, init_log10_tol=init_log10_tol, init_std=init_std, min_std=min_std)
    state_size = getattr(block.net, "state_size", None)  # concat layers: their first layer also sees t
    for m in block.net.modules():
        if state_size is not None and isinstance(m, (nn.Conv2d, nn.Linear)):
            return (ConvGate if isinstance(m, nn.Conv2d) else MLPGate)(int(state_size), **kw)
        if isinstance(m, nn.Conv2d):
            return ConvGate(m.in_channels, **kw)
        if isinstance(m, nn.Linear):
            return MLPGate(m.in_features, **kw)
    raise ConfigError(f"cannot infer the input size of block {getattr(block, 'name', block)!r} "
                         "for its tolerance gate (no Conv2d or Linear in block.net)")


# ---------------------------------------------------------------------------------------------
# the learned policy
# ---------------------------------------------------------------------------------------------

class LearnedTolerance(nn.Module):
    """Learned tolerances (InfoCNF §3): one :class:`ToleranceGate` per block, run on its input.

    :meth:`attach` gives each block a tolerance choice (``block.tolerance``) that, in training
    mode, samples ``g_i ~ N(mu_i, sigma_i^2)`` from the gate on the (detached) block input, solves
    at ``clamp(10**g_i, min_tol, max_tol)`` and keeps ``log p(g_i | x_i)`` with its graph in
    :attr:`records` for the REINFORCE update. In eval mode it records the gate's ``(mu, sigma)`` in
    :attr:`eval_records` and solves at the evaluation tolerance (``eval_mode="fixed"``) or at
    ``10**mu_i`` (``"mean"``). A pinned block (:func:`fastcnf.cnf.block.pinned_tolerance`) never asks its choice.

    Args:
        blocks: the model's CNF blocks in forward order.
        hidden, init_log10_tol, init_std, min_std: gate settings (:class:`ToleranceGate`).
        min_tol, max_tol: clamp of the sampled tolerance.
        eval_mode: fixed or mean.

    Example:
        >>> policy = LearnedTolerance(model.cnf_blocks(), init_log10_tol=-5.0)  # doctest: +SKIP
        >>> policy.attach(model.cnf_blocks())  # doctest: +SKIP
    """

    def __init__(self, blocks: Sequence[nn.Module], hidden: int = 16, init_log10_tol: float = -5.0,
                 init_std: float = 0.5, min_std: float = 0.05, min_tol: float = 1e-8, max_tol: float = 1e-3,
                 eval_mode: str = "fixed") -> None:
        super().__init__()
        if not blocks:
            raise ConfigError("learned tolerances need a model with CNF blocks (none found)")
        self.min_tol = check_tolerance(min_tol, "tolerances.min_tol")
        self.max_tol = check_tolerance(max_tol, "tolerances.max_tol")
        if eval_mode not in ("fixed", "mean"):
            raise ConfigError(f"tolerances.eval_tolerance={eval_mode!r} is not valid; accepted: fixed, mean")
        self.eval_mode = eval_mode
        self.names = [getattr(b, "name", f"block{i}") for i, b in enumerate(blocks)]
        self.gates = nn.ModuleList(make_gate(b, hidden, init_log10_tol, init_std, min_std) for b in blocks)
        #: this step's samples, in call order: (block index, log_prob, tolerance, mu, sigma)
        self.records: list[tuple[int, Tensor, float, float, float]] = []
        #: evaluation batches: (block index, mu, sigma)
        self.eval_records: list[tuple[int, float, float]] = []
        #: keep each block's first sample of a step for the step's later solves (gradient
        #: accumulation: one tolerance per batch, InfoCNF App. D); the trainer's hook clears
        #: :attr:`records` at each step
        self.hold_per_step = False

    def clamp(self, tol: float) -> float:
        return min(max(float(tol), self.min_tol), self.max_tol)

    def attach(self, blocks: Sequence[nn.Module]) -> None:
        """Make this policy choose the tolerance of each block's forward solves."""
        for i, b in enumerate(blocks):
            b.tolerance = _GateChoice(self, i)

    def choose(self, index: int, block: nn.Module, x: Tensor) -> SolverConfig | None:
        """The solver of block ``index`` for its input ``x`` (see the class docstring)."""
        x = x.detach()
        gate = self.gates[index]
        if block.training:
            held = [r for r in self.records if r[0] == index] if self.hold_per_step else []
            if held:
                return block.solver.with_tolerance(held[0][2], held[0][2])
            with torch.enable_grad():
                mu, sigma = gate(x)
                dist = torch.distributions.Normal(mu, sigma)
                g = dist.sample()
                log_prob = dist.log_prob(g)
            tol = self.clamp(10.0 ** float(g))
            self.records = [r for r in self.records if r[0] != index]
            self.records.append((index, log_prob, tol, float(mu.detach()), float(sigma.detach())))
            return block.solver.with_tolerance(tol, tol)
        with torch.no_grad():
            mu, sigma = gate(x)
        self.eval_records.append((index, float(mu), float(sigma)))
        if self.eval_mode == "mean":
            base = block.eval_solver if block.eval_solver is not None else block.solver
            tol = self.clamp(10.0 ** float(mu))
            return base.with_tolerance(tol, tol)
        return None


class _GateChoice:
    """``block.tolerance`` of a block driven by a :class:`LearnedTolerance` (not a module: the gates
    are registered once, in the policy)."""

    def __init__(self, policy: LearnedTolerance, index: int) -> None:
        self.policy, self.index = policy, index

    def __call__(self, block: nn.Module, x: Tensor) -> SolverConfig | None:
        return self.policy.choose(self.index, block, x)
