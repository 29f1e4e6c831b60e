"""Conditional probability paths and time samplers for flow matching, in fastcnf's time convention.

A CNF block integrates ``dz/dt = f(t, z)`` from data at ``t = 0`` to the latent at ``t = T``
(:mod:`fastcnf.cnf.block`). Flow matching here trains ``f`` directly in that convention with
``T = 1``: the conditional path goes from a data point ``x`` (``t = 0``) to a noise sample ``eps``
(``t = 1``) -- the time reversal ``t = 1 - t'`` of the papers' convention (``t' = 0`` noise,
``t' = 1`` data). A trained network is then a CNF block's dynamics as it stands, and every fast
path of the engine (e.g. the fused forward-mode trace of a concat-squash MLP) applies.

Paths (per example; ``x`` data, ``eps`` noise, ``xi ~ N(0, I)`` drawn by the path):

* :class:`IndependentCFMPath` (Tong et al. 2024, I-CFM, eq. 14-15, reversed)::

      x_t = (1 - t) x + t eps + sigma xi,        u_t = eps - x

* :class:`LipmanOTPath` (Lipman et al. 2023, OT path, eq. 20-23, reversed by ``t' = 1 - t``)::

      x_t = (1 - t) x + (sigma_min + (1 - sigma_min) t) eps,
      u_t = (1 - sigma_min) eps - x = ((1 - sigma_min) x_t - x) / (sigma_min + (1 - sigma_min) t)

  In the papers' time the flow is ``psi_t'(eps) = (1 - (1 - sigma_min) t') eps + t' x`` (eq. 22)
  with velocity ``x - (1 - sigma_min) eps`` (eq. 23); substituting ``t' = 1 - t`` gives ``x_t``
  above and ``d x_t / dt = -(d psi / dt')``. The latent end ``t = 1`` is exactly ``eps``; the data
  end ``t = 0`` is the data smoothed by ``N(0, sigma_min^2 I)``.

The regression target of a path is a function of ``(x, eps, t)`` only; ``xi`` never enters it
(I-CFM's ``u_t`` is constant along the Gaussian, Tong et al. eq. 15).

References: Lipman et al. 2023, "Flow Matching for Generative Modeling", §4.1 eq. 20-23;
Tong et al. 2024, "Improving and generalizing flow-based generative models with minibatch optimal
transport", eq. 14-15 (I-CFM); Esser et al. 2024, "Scaling Rectified Flow Transformers for
High-Resolution Image Synthesis" (logit-normal time sampling).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "ProbabilityPath",
    "IndependentCFMPath",
    "LipmanOTPath",
    "TimeSampler",
    "UniformTime",
    "LogitNormalTime",
]


def _per_example(t: Tensor, like: Tensor) -> Tensor:
    """``t`` of shape () or (B,) broadcast against a batch ``like`` of shape (B, ...)."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.dim() == 0:
        return t
    if t.shape != like.shape[:1]:
        raise ValueError(f"time must be a scalar or have shape ({like.shape[0]},), got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (like.dim() - 1)))


class ProbabilityPath:
    """A Gaussian conditional path ``p_t(. | x, eps) = N(mean_t, std_t^2 I)`` from data ``x``
    (``t = 0``) to noise ``eps`` (``t = 1``) and its target velocity ``u_t``.

    Subclasses implement :meth:`mean`, :meth:`std` and :meth:`velocity`; ``t`` is a scalar or a
    (B,) tensor, batches are (B, D) or (B, C, H, W).
    """

    name = "base"

    def mean(self, x_data: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError

    def std(self, t: Tensor) -> Tensor | float:
        """Standard deviation of the path around :meth:`mean` (beyond what ``noise`` carries)."""
        raise NotImplementedError

    def velocity(self, x_data: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The conditional target ``u_t`` for the pair ``(x_data, noise)``."""
        raise NotImplementedError

    def sample(self, x_data: Tensor, noise: Tensor, t: Tensor,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(x_t, u_t)``: a point of the path at time ``t`` and the target velocity there."""
        if x_data.shape != noise.shape:
            raise ValueError(f"data {tuple(x_data.shape)} and noise {tuple(noise.shape)} differ in shape")
        x_t = self.mean(x_data, noise, t)
        std = self.std(t)
        if not (isinstance(std, float) and std == 0.0):
            xi = torch.randn(x_data.shape, dtype=x_data.dtype, device=x_data.device, generator=generator)
            x_t = x_t + _per_example(torch.as_tensor(std), x_data) * xi
        return x_t, self.velocity(x_data, noise, t)


class IndependentCFMPath(ProbabilityPath):
    """Independent conditional flow matching (I-CFM; Tong et al. 2024 eq. 14-15), reversed:
    ``x_t = (1 - t) x + t eps + sigma xi``, ``u_t = eps - x``.

    With minibatch-OT pairing (:mod:`fastcnf.flow_matching.pairing`) this is OT-CFM.

    Example:
        >>> path = IndependentCFMPath(sigma=0.0)
        >>> x_t, u_t = path.sample(torch.zeros(4, 2), torch.ones(4, 2), torch.full((4,), 0.25))
    """

    name = "cfm"

    def __init__(self, sigma: float = 0.0) -> None:
        if not sigma >= 0.0:
            raise ValueError(f"path sigma must be >= 0, got {sigma!r}")
        self.sigma = float(sigma)

    def mean(self, x_data, noise, t):
        t = _per_example(t, x_data)
        return (1 - t) * x_data + t * noise

    def std(self, t):
        return self.sigma

    def velocity(self, x_data, noise, t):
        return noise - x_data

    def __repr__(self) -> str:
        return f"IndependentCFMPath(sigma={self.sigma})"


class LipmanOTPath(ProbabilityPath):
    """Lipman et al. 2023's optimal-transport conditional path (eq. 20-23), reversed:
    ``x_t = (1 - t) x + (sigma_min + (1 - sigma_min) t) eps``, ``u_t = (1 - sigma_min) eps - x``.

    Deterministic given ``(x, eps, t)``: all of its spread comes from ``eps``.

    Example:
        >>> path = LipmanOTPath(sigma_min=1e-4)
        >>> x_t, u_t = path.sample(torch.zeros(4, 2), torch.ones(4, 2), torch.full((4,), 0.25))
    """

    name = "ot"

    def __init__(self, sigma_min: float = 1e-4) -> None:
        if not 0.0 <= sigma_min < 1.0:
            raise ValueError(f"path sigma_min must be in [0, 1), got {sigma_min!r}")
        self.sigma_min = float(sigma_min)

    def mean(self, x_data, noise, t):
        t = _per_example(t, x_data)
        return (1 - t) * x_data + (self.sigma_min + (1 - self.sigma_min) * t) * noise

    def std(self, t):
        return 0.0

    def velocity(self, x_data, noise, t):
        return (1 - self.sigma_min) * noise - x_data

    def velocity_at(self, x_t: Tensor, x_data: Tensor, t: Tensor) -> Tensor:
        """The same target as a field of ``x_t`` (the reversed eq. 21):
        ``((1 - sigma_min) x_t - x) / (sigma_min + (1 - sigma_min) t)``."""
        t = _per_example(t, x_data)
        return ((1 - self.sigma_min) * x_t - x_data) / (self.sigma_min + (1 - self.sigma_min) * t)

    def __repr__(self) -> str:
        return f"LipmanOTPath(sigma_min={self.sigma_min})"




class TimeSampler:
    """Draws the per-example times ``t`` in [0, 1] of a flow-matching batch."""

    name = "base"

    def __call__(self, batch_size: int, *, dtype: torch.dtype = torch.float32, device=None,
                 generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError


class UniformTime(TimeSampler):
    """``t ~ U[0, 1]`` (Lipman et al. 2023; Tong et al. 2024)."""

    name = "uniform"

    def __call__(self, batch_size, *, dtype=torch.float32, device=None, generator=None):
        return torch.rand(batch_size, dtype=dtype, device=device, generator=generator)

    def __repr__(self) -> str:
        return "UniformTime()"


class LogitNormalTime(TimeSampler):
    """``t = sigmoid(m + s n)``, ``n ~ N(0, 1)``: more weight on the middle of the path
    (Esser et al. 2024; ``m = 0, s = 1`` there). Symmetric in ``t -> 1 - t`` for ``m = 0``,
    so the reversed convention leaves it unchanged; ``m`` flips sign between conventions."""

    name = "logit_normal"

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        if not std > 0:
            raise ValueError(f"logit-normal std must be > 0, got {std!r}")
        self.mean, self.std = float(mean), float(std)

    def __call__(self, batch_size, *, dtype=torch.float32, device=None, generator=None):
        n = torch.randn(batch_size, dtype=dtype, device=device, generator=generator)
        return torch.sigmoid(self.mean + self.std * n)

    def __repr__(self) -> str:
        return f"LogitNormalTime(mean={self.mean}, std={self.std})"
