"""A small convolutional U-Net velocity field over whole images, for flow matching.

Flow matching regresses one network on the whole image (FFJORD's multiscale factor-outs do not
apply), so the dynamics need a receptive field over the image: a U-Net with ``levels``
down-samplings, residual blocks conditioned on a sinusoidal time embedding (and optionally a
class embedding), group normalisation (per example: the Jacobian of one example's output w.r.t.
another's input is zero, as the change of variables requires) and skip connections.

``forward(t, x, y=None)`` takes ``t`` as a scalar (a CNF block's solve) or one time per example
(a flow-matching batch; ``per_example_time = True``). Sizes not divisible by ``2**levels`` are
zero-padded at the bottom/right and cropped back, so 8x8 digits and 28x28 MNIST both work.

References: Ronneberger et al. 2015, "U-Net: Convolutional Networks for Biomedical Image
Segmentation"; Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (residual blocks with a
time embedding, appendix B); Lipman et al. 2023 and Tong et al. 2024 (U-Net velocity fields).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["UNetVelocity", "sinusoidal_embedding"]


def sinusoidal_embedding(t: Tensor, dim: int, max_frequency: float = 4.0) -> Tensor:
    """``[sin(w_k t), cos(w_k t)]`` with ``w_k`` geometric from 1 to ``max_frequency`` (rad per
    unit time), (B, dim).

    Low frequencies on purpose: the field's smoothness in ``t`` sets the adaptive solver's NFE at
    evaluation (a randomly initialised 4x4 U-Net: 26 evaluations with ``max_frequency = 4``, 68
    with 16, 260 with 100); the time MLP still forms sharp functions of ``t`` where training
    asks for them."""
    half = dim // 2
    freqs = torch.exp(torch.linspace(0.0, math.log(max_frequency), half, dtype=t.dtype, device=t.device))
    args = t.reshape(-1, 1) * freqs
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus the embedding as a per-channel shift, GroupNorm-SiLU-conv, skip."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = _norm(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class UNetVelocity(nn.Module):
    """Convolutional U-Net velocity field ``v(t, x)`` for images (B, C, H, W).

    Args:
        channels: image channels (1 for digits and MNIST, 3 for CIFAR-10).
        base_channels: width of the first level.
        levels: number of 2x down-samplings (2: 8x8 -> 2x2, 28x28 -> 7x7).
        channel_mult: width multiplier per level, ``levels + 1`` entries (default ``1, 2, 2, ...``).
        num_classes: with a number, the field is class-conditional: ``forward(t, x, y)`` adds a
            learned label embedding to the time embedding, and ``y`` is required.
        groups: group-normalisation groups (reduced to a divisor of each width).
        max_frequency: highest frequency of the sinusoidal time embedding (see
            :func:`sinusoidal_embedding`: low keeps the field smooth in ``t``).

    Example:
        >>> net = UNetVelocity(1, base_channels=16, levels=2, num_classes=10)
        >>> v = net(torch.rand(4), torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
        >>> v.shape
        torch.Size([4, 1, 8, 8])
    """

    per_example_time = True

    def __init__(self, channels: int, base_channels: int = 32, levels: int = 2,
                 channel_mult: Sequence[int] | None = None, num_classes: int | None = None,
                 groups: int = 8, max_frequency: float = 4.0) -> None:
        super().__init__()
        if levels < 0:
            raise ValueError(f"levels must be >= 0, got {levels}")
        mult = list(channel_mult) if channel_mult is not None else [1] + [2] * levels
        if len(mult) != levels + 1:
            raise ValueError(f"channel_mult needs levels + 1 = {levels + 1} entries, got {len(mult)}")
        widths = [base_channels * m for m in mult]
        emb_dim = 4 * base_channels
        self.channels, self.levels, self.num_classes = channels, levels, num_classes
        self.base_channels, self.max_frequency = base_channels, float(max_frequency)
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes, emb_dim) if num_classes else None
        self.conv_in = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(_ResBlock(widths[i], widths[i], emb_dim, groups) for i in range(levels))
        self.downsample = nn.ModuleList(nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1)
                                        for i in range(levels))
        self.mid = _ResBlock(widths[-1], widths[-1], emb_dim, groups)
        self.upsample = nn.ModuleList(nn.Conv2d(widths[i + 1], widths[i], 3, padding=1) for i in range(levels))
        self.up_blocks = nn.ModuleList(_ResBlock(2 * widths[i], widths[i], emb_dim, groups) for i in range(levels))
        self.norm_out = _norm(widths[0], groups)
        self.conv_out = nn.Conv2d(widths[0], channels, 3, padding=1)

    def forward(self, t: Tensor, x: Tensor, y: Tensor | None = None) -> Tensor:
        b, _, height, width = x.shape
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1)
        if t.shape[0] == 1:
            t = t.expand(b)
        elif t.shape[0] != b:
            raise ValueError(f"time must be a scalar or have shape ({b},), got {tuple(t.shape)}")
        emb = self.time_mlp(sinusoidal_embedding(t, self.base_channels, self.max_frequency))
        if self.label_emb is not None:
            if y is None:
                raise ValueError("this UNetVelocity is class-conditional: pass labels y")
            emb = emb + self.label_emb(y.reshape(-1).long())
        elif y is not None:
            raise ValueError("labels given to an unconditional UNetVelocity (num_classes=None)")
        factor = 2 ** self.levels
        pad_h, pad_w = (-height) % factor, (-width) % factor
        h = F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x
        h = self.conv_in(h)
        skips = []
        for block, down in zip(self.down_blocks, self.downsample):
            h = block(h, emb)
            skips.append(h)
            h = down(h)
        h = self.mid(h, emb)
        for i in reversed(range(self.levels)):
            h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
            h = self.up_blocks[i](torch.cat([h, skips[i]], dim=1), emb)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return out[:, :, :height, :width]

    def extra_repr(self) -> str:
        return f"channels={self.channels}, levels={self.levels}, num_classes={self.num_classes}"
