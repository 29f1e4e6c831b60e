"""Glow's invertible per-channel layers: actnorm with data-dependent initialisation and the
invertible 1x1 convolution (Kingma & Dhariwal 2018, "Glow: Generative Flow with Invertible 1x1
Convolutions", §3.1-3.2).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcnf.flows.sequential import FlowStep

__all__ = ["ActNorm", "InvConv1x1", "initialize_actnorm"]


def _check_channels(name: str, x: Tensor, channels: int) -> None:
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{name} expects input of shape (batch, {channels}, H, W), got {tuple(x.shape)}")


class ActNorm(FlowStep):
    """Per-channel affine map ``y = (x + bias) * exp(logs)`` (Glow §3.1, table 1 row 1).

    Data-dependent initialisation: the first forward pass *in training mode* sets
    ``bias = -mean`` and ``logs = -log(std + 1e-6)`` per channel (statistics over batch and
    pixels, biased variance), so that batch's output has zero mean and unit variance per channel.
    The ``initialized`` buffer is part of the state dict: a loaded model is not re-initialised.
    Before initialisation (or in eval mode without it) the layer is the identity.

    log|det| = H * W * sum(logs).

    Example::

        >>> norm = ActNorm(3)
        >>> y, logdet = norm(torch.randn(16, 3, 4, 4) * 5 + 2)   # initialises on this batch
        >>> bool(norm.initialized)
        True

    Note for data-parallel training: initialise (:func:`initialize_actnorm`) *before* wrapping
    the model in DistributedDataParallel, whose constructor then broadcasts rank 0's values.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"ActNorm needs at least one channel, got {channels}")
        self.channels = int(channels)
        self.eps = float(eps)
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))
        # Python-side cache so that an initialised layer does not read the buffer (a host-device
        # sync on GPU) on every forward; reset whenever a state dict is loaded.
        self._known_initialized = False

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._known_initialized = False

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set bias and logs from the batch ``x`` (Glow §3.1) and mark the layer initialised."""
        _check_channels("ActNorm", x, self.channels)
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = (x - mean).pow(2).mean(dim=(0, 2, 3), keepdim=True).sqrt()
        self.bias.copy_(-mean)
        self.logs.copy_(-torch.log(std + self.eps))
        self.initialized.fill_(True)
        self._known_initialized = True

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _check_channels("ActNorm", x, self.channels)
        if self.training and not self._known_initialized:
            if bool(self.initialized):
                self._known_initialized = True
            else:
                self.initialize(x)
        y = (x + self.bias) * torch.exp(self.logs)
        logdet = (x.shape[2] * x.shape[3] * self.logs.sum()).expand(x.shape[0])
        return y, logdet

    def inverse(self, y: Tensor) -> Tensor:
        _check_channels("ActNorm", y, self.channels)
        return y * torch.exp(-self.logs) - self.bias

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class InvConv1x1(FlowStep):
    """Invertible 1x1 convolution ``y[:, :, i, j] = W x[:, :, i, j]`` (Glow §3.2).

    ``W`` starts as a random rotation (QR of a Gaussian matrix). With ``lu=True`` it is
    parametrised as ``W = P L (U + diag(sign_s * exp(log_s)))`` (Glow §3.2, "LU decomposition"):
    ``P`` and ``sign_s`` are fixed buffers, ``L`` unit lower-triangular, ``U`` strictly upper
    triangular, and log|det W| = sum(log_s) costs O(C) instead of O(C^3).

    log|det| = H * W * log|det W| (``torch.linalg.slogdet`` for the plain parametrisation).

    Example::

        >>> conv = InvConv1x1(4, lu=True)
        >>> y, logdet = conv(torch.randn(2, 4, 8, 8))
    """

    def __init__(self, channels: int, lu: bool = True) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"InvConv1x1 needs at least one channel, got {channels}")
        self.channels = int(channels)
        self.lu = bool(lu)
        dtype = torch.get_default_dtype()
        rotation = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))[0]
        if self.lu:
            perm, lower, upper = torch.linalg.lu(rotation)
            s = torch.diagonal(upper)
            self.register_buffer("perm", perm.to(dtype))
            self.register_buffer("sign_s", torch.sign(s).to(dtype))
            self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels, dtype=dtype), -1),
                                 persistent=False)
            self.register_buffer("eye", torch.eye(channels, dtype=dtype), persistent=False)
            self.lower = nn.Parameter(lower.to(dtype))
            self.upper = nn.Parameter(torch.triu(upper, 1).to(dtype))
            self.log_s = nn.Parameter(torch.log(s.abs()).to(dtype))
        else:
            self.weight = nn.Parameter(rotation.to(dtype))

    def weight_matrix(self) -> Tensor:
        """The (C, C) matrix ``W``."""
        if not self.lu:
            return self.weight
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.perm @ lower @ upper

    def log_abs_det(self) -> Tensor:
        """log|det W| (per pixel)."""
        if self.lu:
            return self.log_s.sum()
        return torch.linalg.slogdet(self.weight)[1]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _check_channels("InvConv1x1", x, self.channels)
        w = self.weight_matrix()
        y = F.conv2d(x, w.reshape(self.channels, self.channels, 1, 1))
        logdet = (x.shape[2] * x.shape[3] * self.log_abs_det()).expand(x.shape[0])
        return y, logdet

    def inverse(self, y: Tensor) -> Tensor:
        _check_channels("InvConv1x1", y, self.channels)
        w_inv = torch.linalg.inv(self.weight_matrix())
        return F.conv2d(y, w_inv.reshape(self.channels, self.channels, 1, 1))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, lu={self.lu}"


@torch.no_grad()
def initialize_actnorm(module: nn.Module, x: Tensor, *args: Any, **kwargs: Any) -> int:
    """Run ``module(x, ...)`` once in training mode so that every not yet initialised
    :class:`ActNorm` inside it takes its data-dependent initialisation from ``x`` (Glow §3.1).

    Restores the module's training flag. Returns the number of actnorms initialised by this call.
    Use it on a large first batch, and before wrapping the model in DistributedDataParallel.
    """
    norms = [m for m in module.modules() if isinstance(m, ActNorm)]
    before = sum(bool(m.initialized) for m in norms)
    was_training = module.training
    module.train()
    try:
        module(x, *args, **kwargs)
    finally:
        module.train(was_training)
    return sum(bool(m.initialized) for m in norms) - before
