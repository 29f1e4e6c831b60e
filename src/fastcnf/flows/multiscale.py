"""FFJORD's multiscale CNF architecture for images (FFJORD §4 and appendix B; InfoCNF app. B).

For each scale i of ``n_scales``: (logit transform at the first scale), ``n_blocks`` CNF blocks,
then — except at the last scale — a squeeze, ``n_blocks`` more CNF blocks, and a factor-out of
half the channels. With ``n_scales = 0`` the number is chosen as FFJORD does: one scale per
halving while both sides are at least 4 (1x8x8 -> 2, 1x28x28 -> 3, 3x32x32 -> 4).

References: Grathwohl et al. 2019, "FFJORD: Free-form Continuous Dynamics for Scalable Reversible
Generative Models", §4 and appendix B; Nguyen et al. 2019, "InfoCNF: Efficient Conditional Continuous
Normalizing Flow Using Adaptive Solvers", appendix B. Full entries: docs/bibliography.md.
"""
from __future__ import annotations

from typing import Callable, Sequence

from torch import nn

from fastcnf.flows.layers import LogitTransform, Squeeze
from fastcnf.flows.sequential import FactorOut, SequentialFlow

__all__ = ["auto_n_scales", "build_multiscale"]


def auto_n_scales(shape: Sequence[int]) -> int:
    """FFJORD's ``calc_n_scale``: count halvings while height and width are >= 4."""
    _, h, w = shape
    n = 0
    while h >= 4 and w >= 4:
        n += 1
        h //= 2
        w //= 2
    return max(n, 1)


def build_multiscale(
    shape: Sequence[int],
    make_block: Callable[[int, str], nn.Module],
    n_scales: int = 0,
    n_blocks: int = 2,
    logit_alpha: float | None = 1e-6,
) -> SequentialFlow:
    """Build the multiscale flow for per-example ``shape`` (C, H, W).

    Args:
        make_block: ``(channels, name) -> CNF block`` for a block acting on ``channels`` channels.
        n_scales: number of scales (0: FFJORD's automatic choice).
        n_blocks: CNF blocks before and after each squeeze.
        logit_alpha: logit transform's alpha at the input (None: no logit transform).
    """
    c, h, w = (int(s) for s in shape)
    if n_scales <= 0:
        n_scales = auto_n_scales(shape)
    steps: list[nn.Module] = []
    if logit_alpha is not None:
        steps.append(LogitTransform(logit_alpha))
    for i in range(n_scales):
        for j in range(n_blocks):
            steps.append(make_block(c, f"scale{i}.cnf{j}"))
        if i < n_scales - 1:
            if h % 2 or w % 2:
                raise ValueError(f"cannot squeeze a {h}x{w} map at scale {i}; use fewer scales")
            steps.append(Squeeze(2))
            c, h, w = c * 4, h // 2, w // 2
            for j in range(n_blocks):
                steps.append(make_block(c, f"scale{i}.cnf{n_blocks + j}"))
            steps.append(FactorOut(0.5))
            c = c // 2
    return SequentialFlow(steps, shape)
