"""Solver-tolerance policies: fixed, per-block, and learned by gating networks (InfoCNF 002 §3).

The error tolerance of an adaptive solver decides its number of function evaluations (NFE) and
so the training time. A policy decides, for each CNF block, the tolerances of its forward solve
and of its adjoint (backward) solve:

* :class:`FixedTolerance` — one ``atol``/``rtol`` for every block (and optional adjoint ones);
* :class:`PerBlockTolerance` — a list of tolerances, one per block, in forward order;
* :class:`LearnedTolerance` — a gating network per block maps the block's input to a Gaussian
  over ``g = log10(tolerance)`` (002 §3: ``[mu_i, sigma_i^2] = G_i(x_i)``), one tolerance is
  sampled per block per batch, and the gates are trained with REINFORCE on the reward
  ``R_i = -NFE_i`` (002 eq. 6-7; see :func:`cumulative_returns` and :func:`reinforce_loss`).

Evaluation never uses a sampled tolerance: blocks solve at their evaluation tolerance
(``eval.atol``, 1e-5 as in 002 §4.2) or, when asked, at the gate's mean tolerance.

References: Nguyen et al., *InfoCNF* (002), §3 eq. 6-7, §4.2, §4.4; Williams 1992 (REINFORCE).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import replace
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from fastcnf.ode.solve import SolverConfig

__all__ = [
    "ToleranceError",
    "check_tolerance",
    "FixedTolerance",
    "PerBlockTolerance",
    "ToleranceGate",
    "MLPGate",
    "ConvGate",
    "make_gate",
    "cumulative_returns",
    "reinforce_loss",
    "MovingAverageBaseline",
    "ReturnBaseline",
    "LearnedTolerance",
    "TOLERANCE_POLICIES",
    "pinned_tolerance",
    "tolerance_pinned",
]


class ToleranceError(ValueError):
    """A tolerance outside (0, 1) or a per-block list of the wrong length."""


def check_tolerance(value: float | None, name: str = "tolerance", allow_none: bool = False) -> float | None:
    """``value`` as a float if it lies in (0, 1); otherwise a :class:`ToleranceError` naming ``name``."""
    if value is None and allow_none:
        return None
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ToleranceError(f"{name} must be a number in (0, 1), got {value!r}") from None
    if not (0.0 < v < 1.0) or math.isnan(v):
        raise ToleranceError(f"{name} must be in (0, 1) (e.g. 1e-5), got {value!r}")
    return v


def _per_block(values: Sequence[float | None], n_blocks: int, name: str) -> list[float | None]:
    """A scalar-or-list setting broadcast to one value per block."""
    values = list(values)
    if len(values) == 1:
        values = values * n_blocks
    if len(values) != n_blocks:
        raise ToleranceError(f"{name} has {len(values)} values but the model has {n_blocks} CNF blocks; "
                             f"give one value (all blocks) or {n_blocks} (one per block, forward order)")
    return [check_tolerance(v, f"{name}[{i}]", allow_none=True) for i, v in enumerate(values)]


class FixedTolerance:
    """One forward tolerance (and optionally adjoint tolerances) for every block.

    Args:
        atol, rtol: forward-solve tolerances in (0, 1).
        adjoint_atol, adjoint_rtol: backward (adjoint) solve tolerances; None keeps the solver's.

    Example:
        >>> policy = FixedTolerance(1e-3, 1e-3, adjoint_atol=1e-4)
        >>> policy.apply(model.cnf_blocks())  # doctest: +SKIP
    """

    def __init__(self, atol: float, rtol: float | None = None, adjoint_atol: float | None = None,
                 adjoint_rtol: float | None = None) -> None:
        self.atol = check_tolerance(atol, "atol")
        self.rtol = check_tolerance(atol if rtol is None else rtol, "rtol")
        self.adjoint_atol = check_tolerance(adjoint_atol, "adjoint_atol", allow_none=True)
        self.adjoint_rtol = check_tolerance(adjoint_rtol, "adjoint_rtol", allow_none=True)

    def solver_for(self, index: int, solver: SolverConfig) -> SolverConfig:
        out = solver.with_tolerance(self.atol, self.rtol)
        if self.adjoint_atol is not None:
            out = replace(out, adjoint_atol=self.adjoint_atol)
        if self.adjoint_rtol is not None:
            out = replace(out, adjoint_rtol=self.adjoint_rtol)
        return out

    def apply(self, blocks: Sequence[nn.Module]) -> None:
        """Set each block's training solver (its evaluation solver is left alone)."""
        for i, b in enumerate(blocks):
            b.solver = self.solver_for(i, b.solver)


class PerBlockTolerance(FixedTolerance):
    """One tolerance per block (forward order, ``model.cnf_blocks()``); a single value broadcasts.

    Args:
        atol, rtol: lists of forward tolerances (``rtol`` None: equal to ``atol``).
        adjoint_atol, adjoint_rtol: lists of adjoint tolerances (None entries keep the solver's).
    """

    def __init__(self, atol: Sequence[float], rtol: Sequence[float] | None = None,
                 adjoint_atol: Sequence[float | None] | None = None,
                 adjoint_rtol: Sequence[float | None] | None = None) -> None:
        self.atols = [check_tolerance(v, f"atol[{i}]") for i, v in enumerate(atol)]
        if not self.atols:
            raise ToleranceError("per-block atol needs at least one value")
        self.rtols = list(rtol) if rtol else list(self.atols)
        self.adjoint_atols = list(adjoint_atol) if adjoint_atol else [None]
        self.adjoint_rtols = list(adjoint_rtol) if adjoint_rtol else [None]

    def resolved(self, n_blocks: int) -> list[FixedTolerance]:
        a = _per_block(self.atols, n_blocks, "atol")
        r = _per_block(self.rtols, n_blocks, "rtol")
        aa = _per_block(self.adjoint_atols, n_blocks, "adjoint_atol")
        ar = _per_block(self.adjoint_rtols, n_blocks, "adjoint_rtol")
        return [FixedTolerance(a[i], r[i], aa[i], ar[i]) for i in range(n_blocks)]  # type: ignore[arg-type]

    def solver_for(self, index: int, solver: SolverConfig) -> SolverConfig:
        raise TypeError("PerBlockTolerance needs the number of blocks: use apply(blocks)")

    def apply(self, blocks: Sequence[nn.Module]) -> None:
        for b, policy in zip(blocks, self.resolved(len(blocks))):
            b.solver = policy.solver_for(0, b.solver)


# ---------------------------------------------------------------------------------------------
# gating networks (002 §3, Figure 1)
# ---------------------------------------------------------------------------------------------

class ToleranceGate(nn.Module):
    """A gating network ``G_i``: block input (B, ...) -> Gaussian over ``g = log10(tolerance)``.

    The features are averaged over the batch, since one tolerance is used per block per batch
    (002 §3). Subclasses provide :meth:`features` (B, hidden). The head is initialised so that
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
            raise ToleranceError(f"gate init_std must exceed min_std > 0, got {init_std}, {min_std}")
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

    def distribution(self, x: Tensor) -> torch.distributions.Normal:
        mu, sigma = self(x)
        return torch.distributions.Normal(mu, sigma)


class MLPGate(ToleranceGate):
    """Gate on vectors (B, D): ``Linear(D, hidden) -> tanh``, batch mean, linear head."""

    def __init__(self, dim: int, hidden: int = 16, **kwargs) -> None:
        super().__init__(hidden, **kwargs)
        self.body = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh())

    def features(self, x: Tensor) -> Tensor:
        return self.body(x.reshape(x.shape[0], -1))


class ConvGate(ToleranceGate):
    """Small CNN gate on images (B, C, H, W) (002 Figure 1): two 3x3 convolutions, softplus,
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
    (the concat-squash layers take the state itself as input)."""
    kw = dict(hidden=hidden, init_log10_tol=init_log10_tol, init_std=init_std, min_std=min_std)
    for m in block.net.modules():
        if isinstance(m, nn.Conv2d):
            return ConvGate(m.in_channels, **kw)
        if isinstance(m, nn.Linear):
            return MLPGate(m.in_features, **kw)
    raise ToleranceError(f"cannot infer the input size of block {getattr(block, 'name', block)!r} "
                         "for its tolerance gate (no Conv2d or Linear in block.net)")


# ---------------------------------------------------------------------------------------------
# REINFORCE (002 eq. 6-7)
# ---------------------------------------------------------------------------------------------

def cumulative_returns(loss: float, nfe: Sequence[float], alpha: float) -> Tensor:
    """002 eq. 7: ``r_i = -[L - alpha/N * sum_{j>=i} R_j]`` with ``R_j = -NFE_j``.

    Args:
        loss: the step's loss ``L`` (NLL, + beta * cross-entropy when conditional); 0 drops it.
        nfe: NFE of each block in forward order (forward + backward solves).
        alpha: weight of the reward against the loss.
    """
    rewards = -torch.as_tensor(list(nfe), dtype=torch.float64)
    n = rewards.numel()
    future = torch.flip(torch.cumsum(torch.flip(rewards, [0]), 0), [0])  # sum_{j >= i} R_j
    return -(float(loss) - alpha / n * future)


def reinforce_loss(log_probs: Sequence[Tensor], returns: Tensor, baseline: Tensor | None = None) -> Tensor:
    """Surrogate whose gradient is the REINFORCE part of 002 eq. 7:
    ``-sum_i grad log p(g_i | x) (r_i - b_i)`` (minimise it to maximise the expected return).

    ``baseline`` (one value per block, e.g. a moving average of ``r_i``) reduces the variance
    without biasing the gradient, since ``E[grad log p(g)] = 0``."""
    lp = torch.stack([p.reshape(()) for p in log_probs])
    adv = returns.to(lp) if baseline is None else (returns - baseline).to(lp)
    return -(lp * adv.detach()).sum()


class MovingAverageBaseline:
    """Per-block exponential moving average of the returns: ``b <- m b + (1 - m) r``."""

    def __init__(self, momentum: float = 0.9) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ToleranceError(f"baseline momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.value: Tensor | None = None

    def __call__(self, returns: Tensor) -> Tensor:
        """The baseline to use for ``returns`` (before this update), then update it."""
        returns = returns.detach().double()
        if self.value is None or self.value.shape != returns.shape:
            self.value = returns.clone()  # first step: advantage 0 (no signal yet)
        b = self.value.clone()
        self.value = self.momentum * self.value + (1 - self.momentum) * returns
        return b

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "value": self.value}

    def load_state_dict(self, s: dict) -> None:
        self.momentum = float(s.get("momentum", self.momentum))
        self.value = s.get("value")


class ReturnBaseline:
    """Baseline of the returns ``r_i = -L + alpha/N sum_{j>=i} R_j`` (002 eq. 7) as the sum of two
    moving averages: a per-block one of the NFE part (momentum ``momentum``) and one of the loss
    part ``-L`` (momentum ``loss_momentum``; None: ``momentum``).

    With equal momenta this is exactly :class:`MovingAverageBaseline` of ``r_i`` (the moving
    average is linear). A smaller ``loss_momentum`` follows the training loss more closely: early
    in training ``L`` falls fast, a slow average of it lags, and the lag adds a large
    action-independent term to every advantage (variance, not signal). Both parts use past steps
    only, so the baseline stays unbiased.

    Example:
        >>> b = ReturnBaseline(0.8, loss_momentum=0.0)
        >>> nfe_part = cumulative_returns(0.0, [40, 30], alpha=1.0)
        >>> baseline = b(3.5, nfe_part)  # first call: the returns themselves (advantage 0)
    """

    def __init__(self, momentum: float = 0.9, loss_momentum: float | None = None) -> None:
        self.nfe = MovingAverageBaseline(momentum)
        self.loss = MovingAverageBaseline(momentum if loss_momentum is None else loss_momentum)

    def __call__(self, loss: float, nfe_part: Tensor) -> Tensor:
        """The baseline for the returns ``nfe_part - loss`` (before this update), then update."""
        lb = self.loss(torch.tensor([-float(loss)], dtype=torch.float64))
        return self.nfe(nfe_part) + lb

    def state_dict(self) -> dict:
        return {"nfe": self.nfe.state_dict(), "loss": self.loss.state_dict()}

    def load_state_dict(self, s: dict) -> None:
        if "nfe" in s:
            self.nfe.load_state_dict(s["nfe"])
            self.loss.load_state_dict(s["loss"])
        else:  # a checkpoint from before the split: one moving average of the whole return
            self.nfe.load_state_dict(s)
            self.loss.value = None


# ---------------------------------------------------------------------------------------------
# the learned policy: gates attached to blocks
# ---------------------------------------------------------------------------------------------

class LearnedTolerance(nn.Module):
    """Learned tolerances (002 §3): one :class:`ToleranceGate` per block, run on the block's input.

    :meth:`attach` registers a forward pre-hook on each block. In training mode the hook samples
    ``g_i ~ N(mu_i, sigma_i^2)`` from the gate on the (detached) block input, sets
    ``block.solver_override`` to ``block.solver`` at tolerance ``clamp(10**g_i, min_tol, max_tol)``
    and keeps ``log p(g_i | x_i)`` with its graph in :attr:`records` for the REINFORCE update.
    In eval mode it records the gate's ``(mu, sigma)`` in :attr:`eval_records` and solves at the
    evaluation tolerance (``eval_mode="fixed"``) or at ``10**mu_i`` (``"mean"``). Inside
    :func:`pinned_tolerance` it does nothing.

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
                 init_std: float = 0.5, min_std: float = 0.05, min_tol: float = 1e-8, max_tol: float = 1e-1,
                 eval_mode: str = "fixed") -> None:
        super().__init__()
        if not blocks:
            raise ToleranceError("learned tolerances need a model with CNF blocks (none found)")
        self.min_tol = check_tolerance(min_tol, "min_tol")
        self.max_tol = check_tolerance(max_tol, "max_tol")
        if eval_mode not in ("fixed", "mean"):
            raise ToleranceError(f"eval_mode={eval_mode!r} is not valid; accepted: fixed, mean")
        self.eval_mode = eval_mode
        self.names = [getattr(b, "name", f"block{i}") for i, b in enumerate(blocks)]
        self.gates = nn.ModuleList(make_gate(b, hidden, init_log10_tol, init_std, min_std) for b in blocks)
        #: this step's samples, in call order: (block index, log_prob, tolerance, mu, sigma)
        self.records: list[tuple[int, Tensor, float, float, float]] = []
        #: evaluation batches: (block index, mu, sigma)
        self.eval_records: list[tuple[int, float, float]] = []
        self._handles: list = []
        self._blocks: list[nn.Module] = []

    def clamp(self, tol: float) -> float:
        return min(max(float(tol), self.min_tol), self.max_tol)

    def attach(self, blocks: Sequence[nn.Module]) -> None:
        self.detach()
        self._blocks = list(blocks)
        for i, b in enumerate(self._blocks):
            self._handles.append(b.register_forward_pre_hook(self._make_pre_hook(i)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def clear_overrides(self) -> None:
        for b in self._blocks:
            b.solver_override = None

    def _make_pre_hook(self, index: int):
        def pre_hook(block: nn.Module, args) -> None:
            if tolerance_pinned():
                return
            x = args[0].detach()
            gate = self.gates[index]
            if block.training:
                with torch.enable_grad():
                    mu, sigma = gate(x)
                    dist = torch.distributions.Normal(mu, sigma)
                    g = dist.sample()
                    log_prob = dist.log_prob(g)
                tol = self.clamp(10.0 ** float(g))
                block.solver_override = block.solver.with_tolerance(tol, tol)
                self.records = [r for r in self.records if r[0] != index]
                self.records.append((index, log_prob, tol, float(mu.detach()), float(sigma.detach())))
            else:
                with torch.no_grad():
                    mu, sigma = gate(x)
                self.eval_records.append((index, float(mu), float(sigma)))
                if self.eval_mode == "mean":
                    base = block.eval_solver if block.eval_solver is not None else block.solver
                    tol = self.clamp(10.0 ** float(mu))
                    block.solver_override = base.with_tolerance(tol, tol)
                else:
                    block.solver_override = None
        return pre_hook


#: ``tolerances.policy`` -> policy class
TOLERANCE_POLICIES: dict[str, type] = {
    "fixed": FixedTolerance,
    "per_block": PerBlockTolerance,
    "learned": LearnedTolerance,
}


# ---------------------------------------------------------------------------------------------
# pinning a tolerance (evaluation sweeps, the integrate-to-one check)
# ---------------------------------------------------------------------------------------------

_PINNED = [0]


def tolerance_pinned() -> bool:
    """True inside :func:`pinned_tolerance`: tolerance policies must not change the solvers."""
    return _PINNED[0] > 0


@contextlib.contextmanager
def pinned_tolerance(blocks: Sequence[nn.Module], atol: float, rtol: float | None = None) -> Iterator[None]:
    """Solve every block at ``atol``/``rtol`` (train and eval mode) while the context is open;
    learned-tolerance gates are bypassed. Restores the blocks' overrides afterwards."""
    atol = check_tolerance(atol, "atol")
    rtol = check_tolerance(atol if rtol is None else rtol, "rtol")
    saved = [b.solver_override for b in blocks]
    _PINNED[0] += 1
    try:
        for b in blocks:
            base = b.eval_solver if b.eval_solver is not None else b.solver
            b.solver_override = base.with_tolerance(atol, rtol)
        yield
    finally:
        _PINNED[0] -= 1
        for b, s in zip(blocks, saved):
            b.solver_override = s
