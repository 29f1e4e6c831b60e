"""The bi-directional spiral data set of InfoCNF (Nguyen et al. 2019) §4.6 and Appendix E.1.

Ground truth (InfoCNF eqs. 8-9), on ``N_GROUND_TRUTH = 1000`` equally spaced times ``t`` in
``[0, 6 pi]``:

* clockwise (direction 0): ``R = a + b * 50 / tau``, ``x = R cos(tau) - 5``, ``y = R sin(tau)``
  with the reversed clock ``tau = 6 pi + 1 - t`` (so ``tau`` runs from ``6 pi + 1`` down to 1,
  the angle decreases and ``50 / tau`` never divides by zero);
* counter-clockwise (direction 1): ``R = a + b * t``, ``x = R cos(t) + 5``, ``y = R sin(t)``;

``a ~ N(1.0, 0.08)`` and ``b ~ N(0.25, 0.03)`` per spiral (InfoCNF writes ``N(mean, 0.08)``; we read
the second number as the standard deviation). Exactly half of the spirals turn each way
(``n // 2`` clockwise), in a random order.

Observations (InfoCNF Appendix E.1): from each ground-truth spiral one window of ``200`` consecutive
(equally spaced) time steps is drawn at a uniformly random start, and Gaussian noise of standard
deviation ``0.3`` is added. Where InfoCNF is silent we choose, and say so: the time range ``[0, 6 pi]``
and the reversed clock of the clockwise spiral follow Chen et al.'s (2018) spiral example that
InfoCNF builds on; the window is followed by an *extrapolation horizon* of ``100`` more ground-truth
steps (the window start is drawn so that the horizon fits); the test set is an independent draw
of spirals (seed ``seed + 1``) generated the same way; all times are relative to the window start
(``t_i = i * dt``, ``dt = 6 pi / 999``), as every window is modelled from ``t0 = 0``.

Layout. ``DataSplit.x`` is ``(N, 300, 6)`` float32 with channels :data:`SPIRAL_CHANNELS`:
``(obs_x, obs_y, true_x, true_y, a, b)`` — the noisy observation, the noise-free ground truth
at the same time, and the spiral's parameters repeated along time (so the trainer's batcher,
which draws ``x[idx]``, brings everything a sequence needs). ``DataSplit.y`` is the direction
(``int64``: 0 clockwise, 1 counter-clockwise). Steps ``0..199`` are observed, ``200..299`` are the
extrapolation horizon. The times are ``SpiralBundle.times`` (shared by all sequences).

References: Nguyen et al. 2019, "InfoCNF: Efficient Conditional Continuous Normalizing Flow Using
Adaptive Solvers", §4.6, Appendix E.1 eqs. 8-9, Figure 9; Chen et al. 2018, "Neural Ordinary
Differential Equations", §5.1 (the spiral data InfoCNF extends); Rubanova et al. 2019, "Latent ODEs for
Irregularly-Sampled Time Series".
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .base import DataBundle, DataError, DataSplit

__all__ = [
    "SPIRAL_CHANNELS",
    "N_GROUND_TRUTH",
    "N_OBSERVED",
    "N_EXTRAPOLATE",
    "NOISE_STD",
    "PARAM_MEAN",
    "PARAM_STD",
    "CLOCKWISE",
    "COUNTER_CLOCKWISE",
    "SpiralBundle",
    "spiral_ground_truth",
    "make_spirals",
    "load_spirals",
]

#: channels of ``x``: noisy observation, noise-free ground truth, the parameters a and b
SPIRAL_CHANNELS = ("obs_x", "obs_y", "true_x", "true_y", "a", "b")
N_GROUND_TRUTH = 1000  #: points of each ground-truth spiral (InfoCNF E.1)
N_OBSERVED = 200  #: observed window length (InfoCNF E.1)
N_EXTRAPOLATE = 100  #: extrapolation horizon after the window (our choice)
NOISE_STD = 0.3  #: observation noise (InfoCNF E.1)
T_STOP = 6 * math.pi  #: ground-truth time range [0, 6 pi] (Chen et al.'s example)
PARAM_MEAN = (1.0, 0.25)  #: means of a and b (InfoCNF E.1)
PARAM_STD = (0.08, 0.03)  #: standard deviations of a and b (InfoCNF E.1)
CLOCKWISE, COUNTER_CLOCKWISE = 0, 1
DEFAULT_N_TRAIN = 5000  #: InfoCNF: 5,000 spirals
DEFAULT_N_TEST = 1000  #: our choice (InfoCNF does not give the test size)


@dataclass
class SpiralBundle(DataBundle):
    """A :class:`DataBundle` plus the time grid of the sequences.

    Attributes:
        times: ``(n_observed + n_extrapolate,)`` float32 times, ``times[0] == 0``.
        n_observed: steps of each sequence the model observes (the rest is the horizon).
        noise_std: standard deviation of the observation noise.
    """

    times: Tensor = field(default_factory=lambda: torch.zeros(0))
    n_observed: int = N_OBSERVED
    noise_std: float = NOISE_STD


def spiral_ground_truth(a: float, b: float, direction: int, n_points: int = N_GROUND_TRUTH) -> np.ndarray:
    """The noise-free spiral of InfoCNF eq. 8 (clockwise) or eq. 9 (counter-clockwise), ``(n, 2)``.

    Raises:
        DataError: ``direction`` is not 0 (clockwise) or 1 (counter-clockwise).
    """
    t = np.linspace(0.0, T_STOP, n_points)
    if direction == CLOCKWISE:
        tau = T_STOP + 1.0 - t
        r = a + b * 50.0 / tau
        return np.stack([r * np.cos(tau) - 5.0, r * np.sin(tau)], axis=1)
    if direction == COUNTER_CLOCKWISE:
        r = a + b * t
        return np.stack([r * np.cos(t) + 5.0, r * np.sin(t)], axis=1)
    raise DataError(f"spiral direction must be {CLOCKWISE} (clockwise) or {COUNTER_CLOCKWISE} "
                    f"(counter-clockwise), got {direction!r}")


def make_spirals(n: int, seed: int, n_observed: int = N_OBSERVED, n_extrapolate: int = N_EXTRAPOLATE,
                 noise_std: float = NOISE_STD) -> tuple[Tensor, Tensor, Tensor]:
    """Draw ``n`` spiral sequences (see the module docstring), deterministic in ``seed``.

    Returns:
        ``x`` ``(n, n_observed + n_extrapolate, 6)`` float32 (channels :data:`SPIRAL_CHANNELS`),
        ``direction`` ``(n,)`` int64, ``times`` ``(n_observed + n_extrapolate,)`` float32.

    Raises:
        DataError: ``n`` is odd or negative, or the window and horizon do not fit in 1,000 steps.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0 or n % 2:
        raise DataError(f"the number of spirals must be a non-negative even integer "
                        f"(half turn each way), got {n!r}")
    length = n_observed + n_extrapolate
    if n_observed < 2 or n_extrapolate < 0 or length > N_GROUND_TRUTH:
        raise DataError(f"need 2 <= n_observed and n_observed + n_extrapolate <= {N_GROUND_TRUTH}, "
                        f"got n_observed={n_observed}, n_extrapolate={n_extrapolate}")
    rng = np.random.default_rng(seed)
    direction = np.array([CLOCKWISE] * (n // 2) + [COUNTER_CLOCKWISE] * (n // 2), dtype=np.int64)
    rng.shuffle(direction)
    a = rng.normal(PARAM_MEAN[0], PARAM_STD[0], size=n)
    b = rng.normal(PARAM_MEAN[1], PARAM_STD[1], size=n)
    start = rng.integers(0, N_GROUND_TRUTH - length + 1, size=n)
    noise = rng.normal(0.0, noise_std, size=(n, length, 2))
    x = np.empty((n, length, len(SPIRAL_CHANNELS)), dtype=np.float64)
    for i in range(n):
        truth = spiral_ground_truth(a[i], b[i], int(direction[i]))[start[i]:start[i] + length]
        x[i, :, 0:2] = truth + noise[i]
        x[i, :, 2:4] = truth
    x[:, :, 4] = a[:, None]
    x[:, :, 5] = b[:, None]
    dt = T_STOP / (N_GROUND_TRUTH - 1)
    times = torch.arange(length, dtype=torch.float64) * dt
    return (torch.from_numpy(x).to(torch.float32), torch.from_numpy(direction),
            times.to(torch.float32))


def load_spirals(n_train: int = 0, n_test: int = 0, seed: int = 0) -> SpiralBundle:
    """The spiral data set: train drawn with ``seed``, test with ``seed + 1`` (0 = default sizes
    5,000 / 1,000)."""
    n_train = n_train or DEFAULT_N_TRAIN
    n_test = n_test or DEFAULT_N_TEST
    x_tr, y_tr, times = make_spirals(n_train, seed)
    x_te, y_te, _ = make_spirals(n_test, seed + 1)
    return SpiralBundle(
        name="spirals",
        train=DataSplit(x_tr, y_tr),
        test=DataSplit(x_te, y_te),
        shape=tuple(x_tr.shape[1:]),
        num_classes=2,
        levels=None,
        split=(f"bi-directional spirals (InfoCNF, Nguyen et al. 2019, App. E.1): {n_train} train (seed {seed}) / {n_test} test "
               f"(seed {seed + 1}) sequences, {N_OBSERVED} observed + {N_EXTRAPOLATE} extrapolated "
               f"steps, noise std {NOISE_STD}"),
        times=times,
        n_observed=N_OBSERVED,
        noise_std=NOISE_STD,
    )
