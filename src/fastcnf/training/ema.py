"""An exponential moving average of the trained weights (``train.ema_decay``).

After every optimiser step the average moves towards the new weights,
``a_t = w_t a_{t-1} + (1 - w_t) theta_t`` with ``w_t = d (1 - d^(t-1)) / (1 - d^t)``, which is the
bias-corrected average ``a_t = sum_s d^(t-s) (1 - d) theta_s / (1 - d^t)`` of the weights after each
step (the correction of Kingma & Ba 2015, "Adam", §3, so the initial weights carry no weight and a short
run is not pulled towards them). Averaging the iterates of stochastic gradient descent goes back to
Polyak & Juditsky 1992 ("Acceleration of stochastic approximation by averaging"); the exponential
average is the usual choice for flow-matching and diffusion models.

The trainer steps the raw weights and validates, tests, samples and exports the average; the
checkpoint keeps both (and the number of updates), so a resumed run continues the same average.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor, nn

__all__ = ["WeightAverage", "averaged_weights"]


class WeightAverage:
    """The bias-corrected exponential moving average of a model's floating-point parameters.

    Args:
        model: the trained model (its parameters are averaged; buffers are taken as they are).
        decay: ``d`` in ``[0, 1)``; 0 turns the average off (every method is then a no-op).

    Example:
        >>> net = nn.Linear(1, 1, bias=False)
        >>> avg = WeightAverage(net, decay=0.5)
        >>> for v in (1.0, 3.0):
        ...     _ = net.weight.data.fill_(v); avg.update(net)
        >>> round(float(avg.shadow["weight"]), 4)  # (0.5 * 1 + 3) / 1.5
        2.3333
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.updates = 0
        self.shadow: dict[str, Tensor] = {}
        if self.enabled:
            self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.is_floating_point()}

    @property
    def enabled(self) -> bool:
        return self.decay > 0.0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards the model's current parameters (one optimiser step)."""
        if not self.enabled:
            return
        self.updates += 1
        d, t = self.decay, self.updates
        keep = d * (1.0 - d ** (t - 1)) / (1.0 - d ** t)  # 0 at the first update: a_1 = theta_1
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach(), 1.0 - keep)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the average into ``model`` (nothing happens before the first update)."""
        if not self.enabled or self.updates == 0:
            return
        params = dict(model.named_parameters())
        for name, a in self.shadow.items():
            params[name].copy_(a)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """The average in ``model`` inside the block, the trained weights back after it."""
        if not self.enabled or self.updates == 0:
            yield
            return
        params = dict(model.named_parameters())
        saved = {name: params[name].detach().clone() for name in self.shadow}
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, v in saved.items():
                    params[name].copy_(v)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "average": self.shadow} if self.enabled else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.enabled or not state:
            return
        self.updates = int(state["updates"])
        for name, v in state["average"].items():
            if name in self.shadow:
                self.shadow[name].copy_(v)


def averaged_weights(state: dict[str, Any]) -> dict[str, Tensor] | None:
    """A checkpoint's model weights with the average in place of the parameters, or None when the
    run kept no average (``train.ema_decay = 0``) or had not stepped yet."""
    ema = state.get("ema") or {}
    if not ema or not int(ema.get("updates", 0)):
        return None
    return {**state["model"], **ema["average"]}
