"""Fixed invertible layers of image flows: logit transform and squeeze.

References: Dinh et al. 2017 (Real NVP) §4.1 (logit transform, squeeze); FFJORD appendix B.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastcnf.flows.sequential import FlowStep

__all__ = ["LogitTransform", "Squeeze", "squeeze2d", "unsqueeze2d"]


class LogitTransform(FlowStep):
    """``y = logit(alpha + (1 - 2 alpha) x)`` for x in [0, 1] (Real NVP §4.1).

    log|dy/dx| = log(1 - 2 alpha) - log(p) - log(1 - p) per dimension, p = alpha + (1 - 2 alpha) x.
    """

    def __init__(self, alpha: float = 1e-6) -> None:
        super().__init__()
        if not 0.0 <= alpha < 0.5:
            raise ValueError(f"logit alpha must be in [0, 0.5), got {alpha}")
        self.alpha = alpha

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # outside [0, 1] the logit is NaN: say so instead of returning a NaN log-density
        lo, hi = (float(x.detach().min()), float(x.detach().max())) if x.numel() else (0.0, 0.0)
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"the logit transform expects dequantised images in [0, 1], got values in "
                             f"[{lo:.4g}, {hi:.4g}] (scale 8-bit data by 1/256 after dequantising)")
        p = self.alpha + (1 - 2 * self.alpha) * x
        y = torch.log(p) - torch.log1p(-p)
        logdet = (math.log(1 - 2 * self.alpha) - torch.log(p) - torch.log1p(-p)).reshape(x.shape[0], -1).sum(1)
        return y, logdet

    def inverse(self, y: Tensor) -> Tensor:
        return (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


def squeeze2d(x: Tensor, factor: int = 2) -> Tensor:
    """(B, C, H, W) -> (B, C*f*f, H/f, W/f), channel order as Real NVP / FFJORD's SqueezeLayer."""
    return F.pixel_unshuffle(x, factor)


def unsqueeze2d(x: Tensor, factor: int = 2) -> Tensor:
    return F.pixel_shuffle(x, factor)


class Squeeze(FlowStep):
    """Space-to-depth squeeze by ``factor`` (volume preserving, log-det 0)."""

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.factor = factor

    def output_shape(self, shape):
        c, h, w = shape
        f = self.factor
        if h % f or w % f:
            raise ValueError(f"cannot squeeze a {h}x{w} image by {f}")
        return (c * f * f, h // f, w // f)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return squeeze2d(x, self.factor), torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)

    def inverse(self, y: Tensor) -> Tensor:
        return unsqueeze2d(y, self.factor)
