"""Glow (Kingma & Dhariwal 2018) as steps of a :class:`~fastcnf.flows.sequential.SequentialFlow`.

One Glow *flow step* is actnorm -> invertible 1x1 convolution -> affine coupling (Glow §3,
table 1); a *level* is a squeeze, ``K`` flow steps and — except at the last level — a split
whose factored half gets a learned conditional prior (Glow §3, figure 2b; Real NVP §3.6).
:func:`build_glow` assembles ``L`` levels. Each :class:`GlowStep` is a single entry of
``flow.steps``, so part boundaries for training by parts (Bhatt & Inouye 2021, "Learning Flows by Parts") can be put
between any two flow steps: at level boundaries ("split by blocks") or inside a level ("split
across blocks", the paper's ``1_{1/2}``). ``flow.level_boundaries`` lists where each level starts.

Choices that follow the official code (github.com/openai/glow, ``model.py`` / ``tfops.py``):

- the coupling's scale is ``sigmoid(h + 2)`` rather than ``exp(h)``, and the coupling network's
  output channels interleave shift (even) and raw scale (odd);
- the coupling network is conv3x3 -> actnorm -> ReLU -> conv1x1 -> actnorm -> ReLU -> zero-init
  conv3x3 whose output is multiplied by ``exp(3 * logs)`` (``conv2d_zeros``), hidden convolutions
  drawn from N(0, 0.05^2) without bias (the actnorm supplies it);
- the split prior is a zero-init conv3x3 on the kept half, output channels interleaving mean and
  log-scale;
- the input is ``x - 0.5`` for x in [0, 1) (``preprocess="shift"``).

Deliberate differences: actnorm stores ``logs`` directly (the official code stores ``logs / 3``
to speed up its learning; that is an optimiser detail); 3x3 convolutions pad with zeros (the
official code appends an "edge" channel marking padded pixels); the top level's prior is the
fixed standard normal (the official ``--learntop`` is off by default).

References: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions",
NeurIPS 2018, §3.1-3.3 and table 1; Dinh et al. 2017 (Real NVP) §3.6 (multiscale, squeeze).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcnf.flows.invertible import ActNorm, InvConv1x1, _check_channels, initialize_actnorm
from fastcnf.flows.layers import LogitTransform, Squeeze
from fastcnf.flows.sequential import FactorOut, FlowStep, SequentialFlow

__all__ = [
    "ActNorm",
    "InvConv1x1",
    "ZeroConv2d",
    "AffineCoupling",
    "GlowStep",
    "GlowSplit",
    "Shift",
    "build_glow",
    "initialize_actnorm",
]


class ZeroConv2d(nn.Module):
    """Zero-initialised 3x3 convolution scaled by ``exp(logscale_factor * logs)`` per output
    channel (the official Glow code's ``conv2d_zeros``): outputs 0 at initialisation, so the
    coupling it ends and the split prior it parametrises start from a fixed, known map."""

    def __init__(self, in_channels: int, out_channels: int, logscale_factor: float = 3.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        self.logscale_factor = float(logscale_factor)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) * torch.exp(self.logs * self.logscale_factor)


class _HiddenActNorm(nn.Module):
    """Actnorm inside the coupling network: the output only (its log-det is not part of the flow's)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = ActNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x)[0]


def _hidden_conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
    nn.init.normal_(conv.weight, 0.0, 0.05)  # official default_initializer
    return conv


class AffineCoupling(FlowStep):
    """Glow's affine coupling (Glow §3.3, table 1 row 3).

    ``x = [x_a, x_b]`` split along channels (x_a: the first ``channels // 2``);
    ``h = NN(x_a)``, ``shift = h[:, 0::2]``, ``scale = sigmoid(h[:, 1::2] + 2)``;
    ``y = [x_a, (x_b + shift) * scale]``; log|det| = sum(log scale).

    ``NN`` = conv3x3 -> actnorm -> ReLU -> conv1x1 -> actnorm -> ReLU -> :class:`ZeroConv2d`, as in
    the official code; the hidden actnorms are initialised from data like :class:`ActNorm`.
    The sigmoid scale (the official code's choice; the paper writes ``exp``) keeps the scale in
    (0, 1), so the coupling cannot blow up. Because the last convolution starts at zero, the
    coupling starts as ``y_b = sigmoid(2) x_b ≈ 0.881 x_b`` — not exactly the identity.

    Example::

        >>> coupling = AffineCoupling(4, hidden=32)
        >>> y, logdet = coupling(torch.randn(2, 4, 8, 8))
    """

    def __init__(self, channels: int, hidden: int = 512) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"an affine coupling needs at least 2 channels, got {channels}")
        if hidden < 1:
            raise ValueError(f"the coupling network needs at least 1 hidden channel, got {hidden}")
        self.channels = int(channels)
        self.hidden = int(hidden)
        self.channels_a = self.channels // 2
        channels_b = self.channels - self.channels_a
        self.net = nn.Sequential(
            _hidden_conv(self.channels_a, hidden, 3), _HiddenActNorm(hidden), nn.ReLU(),
            _hidden_conv(hidden, hidden, 1), _HiddenActNorm(hidden), nn.ReLU(),
            ZeroConv2d(hidden, 2 * channels_b),
        )

    def _shift_and_log_scale(self, x_a: Tensor) -> tuple[Tensor, Tensor]:
        h = self.net(x_a)
        return h[:, 0::2], F.logsigmoid(h[:, 1::2] + 2.0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _check_channels("AffineCoupling", x, self.channels)
        x_a, x_b = x[:, : self.channels_a], x[:, self.channels_a:]
        shift, log_scale = self._shift_and_log_scale(x_a)
        y_b = (x_b + shift) * torch.exp(log_scale)
        return torch.cat([x_a, y_b], dim=1), log_scale.reshape(x.shape[0], -1).sum(1)

    def inverse(self, y: Tensor) -> Tensor:
        _check_channels("AffineCoupling", y, self.channels)
        y_a, y_b = y[:, : self.channels_a], y[:, self.channels_a:]
        shift, log_scale = self._shift_and_log_scale(y_a)
        return torch.cat([y_a, y_b * torch.exp(-log_scale) - shift], dim=1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, hidden={self.hidden}"


class GlowStep(FlowStep):
    """One Glow flow step: :class:`ActNorm` -> :class:`InvConv1x1` -> :class:`AffineCoupling`
    (Glow figure 2a). One entry of ``flow.steps``, so parts can be cut between any two steps."""

    def __init__(self, channels: int, hidden: int = 512, lu: bool = True) -> None:
        super().__init__()
        self.actnorm = ActNorm(channels)
        self.invconv = InvConv1x1(channels, lu=lu)
        self.coupling = AffineCoupling(channels, hidden)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x, logdet = self.actnorm(x)
        x, ld = self.invconv(x)
        logdet = logdet + ld
        x, ld = self.coupling(x)
        return x, logdet + ld

    def inverse(self, y: Tensor) -> Tensor:
        return self.actnorm.inverse(self.invconv.inverse(self.coupling.inverse(y)))


class GlowSplit(FactorOut):
    """Glow's split (``split2d``): factor out the second half of the channels and whiten it with a
    learned conditional prior ``z2 ~ N(mean(z1), exp(logs(z1))^2)`` (Glow §3, figure 2b).

    ``(mean, logs)`` come from a :class:`ZeroConv2d` on the kept half ``z1`` (mean on even output
    channels, logs on odd). The factored piece of the latent is ``eps = (z2 - mean) * exp(-logs)``
    with log|det| = -sum(logs), so ``log N(z2; mean, exp(logs)) = log N(eps; 0, I) - sum(logs)``
    exactly and the flow's latent stays standard normal under the model.

    Example::

        >>> split = GlowSplit(8)
        >>> kept, eps, logdet = split(torch.randn(2, 8, 4, 4))   # kept: 4 channels, eps: 4
    """

    def __init__(self, channels: int) -> None:
        super().__init__(0.5)
        if channels < 2:
            raise ValueError(f"a split needs at least 2 channels, got {channels}")
        self.channels = int(channels)
        keep, out = self.split_sizes(self.channels)
        self.prior = ZeroConv2d(keep, 2 * out)

    def conditional_prior(self, kept: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, logs)`` of the factored half given the kept half."""
        h = self.prior(kept)
        return h[:, 0::2], h[:, 1::2]

    def transform_factored(self, factored: Tensor, kept: Tensor) -> tuple[Tensor, Tensor]:
        mean, logs = self.conditional_prior(kept)
        return (factored - mean) * torch.exp(-logs), -logs.reshape(kept.shape[0], -1).sum(1)

    def untransform_factored(self, latent: Tensor, kept: Tensor) -> Tensor:
        mean, logs = self.conditional_prior(kept)
        return latent * torch.exp(logs) + mean

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class Shift(FlowStep):
    """``y = x + offset`` (log-det 0). Glow's preprocessing is ``offset = -0.5``: dequantised
    data in [0, 1) is centred to [-0.5, 0.5)."""

    def __init__(self, offset: float = -0.5) -> None:
        super().__init__()
        self.offset = float(offset)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x + self.offset, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)

    def inverse(self, y: Tensor) -> Tensor:
        return y - self.offset

    def extra_repr(self) -> str:
        return f"offset={self.offset}"


# preprocessing name -> factory(logit_alpha)
PREPROCESSING: dict[str, Callable[[float | None], FlowStep]] = {
    "shift": lambda alpha: Shift(-0.5),
    "logit": lambda alpha: LogitTransform(1e-6 if alpha is None else alpha),
}


def build_glow(
    shape: Sequence[int],
    levels: int = 3,
    steps: int = 32,
    hidden: int = 512,
    lu: bool = True,
    preprocess: str = "shift",
    logit_alpha: float | None = None,
) -> SequentialFlow:
    """Build Glow for per-example image ``shape`` (C, H, W) with data in [0, 1) (dequantised).

    Layout of ``flow.steps``: the preprocessing step, then for each level ``i`` of ``levels``:
    :class:`~fastcnf.flows.layers.Squeeze`, ``steps`` :class:`GlowStep`, and — except at the last
    level — a :class:`GlowSplit`. ``flow.level_boundaries[i]`` is the index in ``flow.steps`` where
    level ``i`` starts (level 0 starts at 0 and includes the preprocessing), so the ranges
    ``level_boundaries[i]:level_boundaries[i+1]`` (the last up to ``len(flow.steps)``) partition
    the steps; finer part boundaries may fall between any two :class:`GlowStep`.

    Args:
        shape: per-example input shape (C, H, W); H and W must be divisible by ``2**levels``.
        levels: number of levels L (Glow: 3 for 32x32 images).
        steps: flow steps K per level (Glow: 32).
        hidden: channels of the coupling networks' hidden layers (Glow: 512).
        lu: LU-parametrised 1x1 convolutions.
        preprocess: ``"shift"`` (x - 0.5, Glow) or ``"logit"`` (Real NVP's logit transform).
        logit_alpha: the logit transform's alpha (default 1e-6); only for ``preprocess="logit"``.

    Raises:
        ValueError: for a shape that is not (C, H, W), sides not divisible by ``2**levels``,
            ``levels``, ``steps`` or ``hidden`` below 1, an unknown ``preprocess``, or a
            ``logit_alpha`` given with ``preprocess="shift"``.

    Example::

        >>> from fastcnf.models.flow_model import FlowModel
        >>> model = FlowModel(build_glow((3, 16, 16), levels=2, steps=2, hidden=16), levels=256)
        >>> tuple(model.sample(2).shape)
        (2, 3, 16, 16)
    """
    if len(shape) != 3:
        raise ValueError(f"Glow needs an image shape (C, H, W), got {tuple(shape)}")
    c, h, w = (int(s) for s in shape)
    if min(c, h, w) < 1:
        raise ValueError(f"image shape must be positive, got {(c, h, w)}")
    for name, value in (("levels", levels), ("steps", steps), ("hidden", hidden)):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"Glow's {name} must be an integer >= 1, got {value!r}")
    factor = 2 ** levels
    if h % factor or w % factor:
        raise ValueError(f"a {h}x{w} image cannot be squeezed {levels} times: both sides must be "
                         f"divisible by 2**levels = {factor}; use fewer levels or pad the images")
    if preprocess not in PREPROCESSING:
        raise ValueError(f"unknown preprocess {preprocess!r}; valid: {sorted(PREPROCESSING)}")
    if logit_alpha is not None and preprocess != "logit":
        raise ValueError(f"logit_alpha applies only to preprocess='logit', not {preprocess!r}")

    flow_steps: list[nn.Module] = [PREPROCESSING[preprocess](logit_alpha)]
    boundaries: list[int] = []
    for i in range(levels):
        boundaries.append(0 if i == 0 else len(flow_steps))
        flow_steps.append(Squeeze(2))
        c, h, w = 4 * c, h // 2, w // 2
        flow_steps.extend(GlowStep(c, hidden, lu) for _ in range(steps))
        if i < levels - 1:
            split = GlowSplit(c)
            flow_steps.append(split)
            c = split.split_sizes(c)[0]
    flow = SequentialFlow(flow_steps, shape)
    flow.level_boundaries = boundaries
    return flow
