"""The configuration section of this method: :class:`TolerancesConfig`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fastcnf.config import ConfigError, Section, check_tolerance

__all__ = ["TolerancesConfig"]


@dataclass
class TolerancesConfig(Section):
    """Solver-tolerance policy (Nguyen et al. 2019, InfoCNF §3).

    ``fixed`` solves every block at ``solver.atol``/``rtol`` (and ``solver.adjoint_*``).
    ``per_block`` takes lists, one value per CNF block in forward order (``model.cnf_blocks()``);
    a single value applies to every block. ``learned`` samples each block's tolerance per batch
    from a gating network trained by REINFORCE.

    Attributes:
        policy: fixed, per_block or learned.
        atol, rtol: per_block: forward tolerances (rtol empty: equal to atol).
        layout: per_block: ``blocks`` (one value per CNF block, forward order, or one for all) or
            ``stacks`` (two values: the first CNF block of each scale's stack, then every other
            block; Mixed Conditional FFJORD §3: "the first CNF in each stacked CNF ... cannot
            tolerate a lot of error"). The adjoint lists follow the same layout.
        adjoint_atol, adjoint_rtol: per_block or learned: adjoint tolerances per block (empty:
            ``solver.adjoint_*``, else the forward tolerance).
        init_tol: learned: initial gate mean tolerance (0: solver.atol).
        init_std: learned: initial std of the Gaussian over log10(tolerance).
        min_std: learned: floor of that std (keeps exploring).
        min_tol, max_tol: learned: sampled tolerances are clamped to [min_tol, max_tol]. The
            ceiling is what keeps the model honest: the loss the gates see is computed at the
            sampled tolerance, so a loose solve that the model learns to exploit looks as good as
            an exact one (digits at a ceiling of 1e-1: training loss 0.35 bits/dim, exact test
            4.65 at 1e-5); 1e-3 by default, the tolerance digits-cnf trains at with an exact test
            NLL to match.
        gate_hidden: learned: width of each gate (MLP on vectors, small CNN on images).
        gate_lr: learned: Adam learning rate of the gates (their own optimiser).
        alpha: learned: weight of the reward -NFE against the loss (eq. 6).
        baseline_momentum: learned: momentum of the moving-average baseline of the returns.
        loss_baseline_momentum: learned: momentum of the baseline of the returns' loss part ``-L``
            (null: ``baseline_momentum``). Any value is an unbiased baseline (past steps only).
        include_loss: learned: the return includes -L (eq. 7); false: reward -NFE only.
        eval_tolerance: learned: evaluate at eval.atol/rtol (fixed; §4.2) or at each gate's mean
            tolerance (mean; Appendix D).
    """

    _key = "tolerances"
    policy: Literal["fixed", "per_block", "learned"] = "fixed"
    atol: list[float] = field(default_factory=list)
    rtol: list[float] = field(default_factory=list)
    layout: Literal["blocks", "stacks"] = "blocks"
    adjoint_atol: list[float] = field(default_factory=list)
    adjoint_rtol: list[float] = field(default_factory=list)
    init_tol: float = 0.0
    init_std: float = 0.5
    min_std: float = 0.05
    min_tol: float = 1e-8
    max_tol: float = 1e-3
    gate_hidden: int = 16
    gate_lr: float = 1e-2
    alpha: float = 0.01
    baseline_momentum: float = 0.9
    loss_baseline_momentum: float | None = None
    include_loss: bool = True
    eval_tolerance: Literal["fixed", "mean"] = "fixed"

    def check(self) -> None:
        for key in ("atol", "rtol", "adjoint_atol", "adjoint_rtol"):
            for i, v in enumerate(getattr(self, key)):
                check_tolerance(v, f"tolerances.{key}[{i}]")
        if self.init_tol != 0.0:
            check_tolerance(self.init_tol, "tolerances.init_tol")
        check_tolerance(self.min_tol, "tolerances.min_tol")
        check_tolerance(self.max_tol, "tolerances.max_tol")
        if not self.min_tol < self.max_tol:
            raise ConfigError(f"tolerances.min_tol={self.min_tol} must be below tolerances.max_tol={self.max_tol}")
        if not self.init_std > self.min_std > 0:
            raise ConfigError(f"tolerances.init_std ({self.init_std}) must exceed tolerances.min_std ({self.min_std}) > 0")
        for key in ("baseline_momentum", "loss_baseline_momentum"):
            m = getattr(self, key)
            if m is not None and not 0.0 <= m < 1.0:
                raise ConfigError(f"tolerances.{key}={m} must be in [0, 1)")
        if self.alpha < 0:
            raise ConfigError(f"tolerances.alpha must be >= 0, got {self.alpha}")
        self._positive("gate_lr", "gate_hidden")
        if self.policy == "fixed" and (self.atol or self.rtol):
            raise ConfigError("tolerances.atol/rtol are per-block lists (tolerances.policy=per_block); "
                              "the fixed policy uses solver.atol and solver.rtol")
        if self.layout == "stacks":
            for key in ("atol", "rtol", "adjoint_atol", "adjoint_rtol"):
                n = len(getattr(self, key))
                if n not in (0, 2) or (key == "atol" and n != 2):
                    raise ConfigError(f"tolerances.layout=stacks takes two values in tolerances.{key} (the first "
                                      f"block of each stack, then the others), got {list(getattr(self, key))}")
        if self.policy == "per_block" and not self.atol:
            raise ConfigError("tolerances.policy=per_block needs tolerances.atol, a list with one "
                              "tolerance per CNF block (forward order), e.g. [1e-3, 1e-5]")
