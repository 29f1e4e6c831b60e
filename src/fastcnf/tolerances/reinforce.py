"""REINFORCE for learned solver tolerances (Nguyen et al. 2019, "InfoCNF: Efficient Conditional
Continuous Normalizing Flow Using Adaptive Solvers", §3 eq. 6-7; Williams 1992, "Simple statistical
gradient-following algorithms for connectionist reinforcement learning").

The gates of :mod:`fastcnf.tolerances.gates` sample one tolerance per block per batch; the reward of
block i is ``R_i = -NFE_i`` and the return adds the (negated) loss. These functions form the
returns, the baselines and the surrogate loss whose gradient is the REINFORCE estimate.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from fastcnf.config import ConfigError

__all__ = ["cumulative_returns", "reinforce_loss", "ReturnBaseline"]



def cumulative_returns(loss: float, nfe: Sequence[float], alpha: float) -> Tensor:
    """eq. 7: ``r_i = -[L - alpha/N * sum_{j>=i} R_j]`` with ``R_j = -NFE_j``.

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
    """Surrogate whose gradient is the REINFORCE part of eq. 7:
    ``-sum_i grad log p(g_i | x) (r_i - b_i)`` (minimise it to maximise the expected return).

    ``baseline`` (one value per block, e.g. a moving average of ``r_i``) reduces the variance
    without biasing the gradient, since ``E[grad log p(g)] = 0``."""
    lp = torch.stack([p.reshape(()) for p in log_probs])
    adv = returns.to(lp) if baseline is None else (returns - baseline).to(lp)
    return -(lp * adv.detach()).sum()


class _MovingAverage:
    """Per-block exponential moving average of the returns: ``b <- m b + (1 - m) r``."""

    def __init__(self, momentum: float = 0.9) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"baseline momentum must be in [0, 1), got {momentum}")
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
    """Baseline of the returns ``r_i = -L + alpha/N sum_{j>=i} R_j`` (eq. 7) as the sum of two
    moving averages: a per-block one of the NFE part (momentum ``momentum``) and one of the loss
    part ``-L`` (momentum ``loss_momentum``; None: ``momentum``).

    With equal momenta this is exactly :class:`_MovingAverage` of ``r_i`` (the moving
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
        self.nfe = _MovingAverage(momentum)
        self.loss = _MovingAverage(momentum if loss_momentum is None else loss_momentum)

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
