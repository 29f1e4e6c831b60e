"""Synthetic densities: FFJORD's eight 2-D toy sets and InfoCNF's 1-D mixture of three Gaussians.

Each 2-D set is ``sample_<name>(n, rng) -> (n, 2) float32`` and follows the definition in
FFJORD's ``lib/toy_data.py`` (``inf_train_gen``), rewritten to draw every random number from the
``numpy.random.Generator`` it is given (FFJORD's ``2spirals`` and ``checkerboard`` use the global
NumPy state, and its ``swissroll``/``circles``/``moons`` call scikit-learn unseeded). The
scikit-learn generators (``make_swiss_roll``, ``make_circles``, ``make_moons``) are reproduced
here in distribution so a seed fixes the whole draw. Two small changes make every sampler return
exactly ``n`` points (FFJORD returns ``5 * (n // 5)`` for ``pinwheel`` and ``2 * (n // 2)`` for
``2spirals``); for ``n`` divisible by 10 the distributions are FFJORD's.

References: Grathwohl et al. 2019 (FFJORD) §5.1 and Figure 2 (the 2-D toy densities);
Nguyen et al. 2019, "InfoCNF: Efficient Conditional Continuous Normalizing Flow Using Adaptive
Solvers", §4.2 and Appendix C (the 1-D mixture used to check that learned densities integrate to one).
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .base import DataBundle, DataError, DataSplit

__all__ = [
    "TOY_SAMPLERS",
    "EIGHT_GAUSSIAN_CENTERS",
    "sample_swissroll",
    "sample_circles",
    "sample_rings",
    "sample_moons",
    "sample_8gaussians",
    "sample_pinwheel",
    "sample_2spirals",
    "sample_checkerboard",
    "MIX1D_MEANS",
    "MIX1D_STDS",
    "MIX1D_WEIGHTS",
    "sample_mix1d",
    "sample_mix1d_labeled",
    "mix1d_density",
    "load_toy",
    "load_mix1d",
]

DEFAULT_N_TRAIN = 20_000
DEFAULT_N_TEST = 20_000


def _check_n(n: int) -> None:
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise DataError(f"number of samples must be a non-negative integer, got {n!r}")


def sample_swissroll(n: int, rng: np.random.Generator) -> np.ndarray:
    """FFJORD ``swissroll``: scikit-learn's swiss roll (noise 1.0), coordinates (x, z), over 5.

    ``t ~ 1.5 pi (1 + 2 U)``, point ``(t cos t, t sin t) + N(0, I)``, divided by 5.
    """
    _check_n(n)
    t = 1.5 * np.pi * (1.0 + 2.0 * rng.random(n))
    x = np.stack([t * np.cos(t), t * np.sin(t)], axis=1) + rng.standard_normal((n, 2))
    return (x / 5.0).astype(np.float32)


def _two_arcs(n: int, rng: np.random.Generator, noise: float,
              arcs: Callable[[int, int], np.ndarray]) -> np.ndarray:
    """scikit-learn's layout for make_circles / make_moons: ``n // 2`` points on the first curve
    at evenly spaced angles, the rest on the second, shuffled, plus Gaussian noise."""
    n_out = n // 2
    x = arcs(n_out, n - n_out)
    x = x[rng.permutation(n)]
    return x + noise * rng.standard_normal((n, 2))


def _circle_arcs(n_out: int, n_in: int, factor: float = 0.5) -> np.ndarray:
    a_out = np.linspace(0, 2 * np.pi, n_out, endpoint=False)
    a_in = np.linspace(0, 2 * np.pi, n_in, endpoint=False)
    outer = np.stack([np.cos(a_out), np.sin(a_out)], axis=1)
    inner = factor * np.stack([np.cos(a_in), np.sin(a_in)], axis=1)
    return np.concatenate([outer, inner])


def _moon_arcs(n_out: int, n_in: int) -> np.ndarray:
    a_out = np.linspace(0, np.pi, n_out)
    a_in = np.linspace(0, np.pi, n_in)
    outer = np.stack([np.cos(a_out), np.sin(a_out)], axis=1)
    inner = np.stack([1 - np.cos(a_in), 1 - np.sin(a_in) - 0.5], axis=1)
    return np.concatenate([outer, inner])


def sample_circles(n: int, rng: np.random.Generator) -> np.ndarray:
    """FFJORD ``circles``: scikit-learn's two circles (radii 1 and 0.5, noise 0.08), times 3."""
    _check_n(n)
    return (3.0 * _two_arcs(n, rng, 0.08, _circle_arcs)).astype(np.float32)


def sample_moons(n: int, rng: np.random.Generator) -> np.ndarray:
    """FFJORD ``moons``: scikit-learn's two moons (noise 0.1), times 2, shifted by (-1, -0.2)."""
    _check_n(n)
    x = 2.0 * _two_arcs(n, rng, 0.1, _moon_arcs) + np.array([-1.0, -0.2])
    return x.astype(np.float32)


def sample_rings(n: int, rng: np.random.Generator) -> np.ndarray:
    """FFJORD ``rings``: four concentric circles of radii 3, 2.25, 1.5, 0.75 at evenly spaced
    angles (``n // 4`` points on each outer ring, the rest on the inner one), shuffled, plus
    ``N(0, 0.08^2)`` noise."""
    _check_n(n)
    quarter = n // 4
    counts = [quarter, quarter, quarter, n - 3 * quarter]
    radii = [1.0, 0.75, 0.5, 0.25]
    rings = []
    for count, radius in zip(counts, radii):
        angle = np.linspace(0, 2 * np.pi, count, endpoint=False)
        rings.append(radius * np.stack([np.cos(angle), np.sin(angle)], axis=1))
    x = 3.0 * np.concatenate(rings)
    x = x[rng.permutation(n)]
    return (x + rng.normal(scale=0.08, size=x.shape)).astype(np.float32)


_SQRT_HALF = 1.0 / np.sqrt(2.0)
EIGHT_GAUSSIAN_CENTERS = 4.0 * np.array(
    [(1, 0), (-1, 0), (0, 1), (0, -1), (_SQRT_HALF, _SQRT_HALF), (_SQRT_HALF, -_SQRT_HALF),
     (-_SQRT_HALF, _SQRT_HALF), (-_SQRT_HALF, -_SQRT_HALF)])
"""Centres of ``8gaussians`` before FFJORD's final division by 1.414."""


def sample_8gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    """FFJORD ``8gaussians``: ``(N(0, 0.5^2 I) + c) / 1.414`` with ``c`` uniform over the eight
    points of norm 4 on the axes and diagonals."""
    _check_n(n)
    noise = 0.5 * rng.standard_normal((n, 2))
    centers = EIGHT_GAUSSIAN_CENTERS[rng.integers(0, 8, size=n)]
    return ((noise + centers) / 1.414).astype(np.float32)


def sample_pinwheel(n: int, rng: np.random.Generator) -> np.ndarray:
    """FFJORD ``pinwheel``: five arms. Radial ``N(1, 0.3^2)``, tangential ``N(0, 0.1^2)``, rotated
    by ``2 pi k / 5 + 0.25 exp(radial)``, times 2. Arms get ``n // 5`` or ``n // 5 + 1`` points."""
    _check_n(n)
    num_arms, rate = 5, 0.25
    features = rng.standard_normal((n, 2)) * np.array([0.3, 0.1])
    features[:, 0] += 1.0
    arms = np.arange(n) % num_arms
    angles = 2 * np.pi * arms / num_arms + rate * np.exp(features[:, 0])
    cos, sin = np.cos(angles), np.sin(angles)
    # Row vector times [[cos, -sin], [sin, cos]], FFJORD's einsum("ti,tij->tj").
    x = np.stack([features[:, 0] * cos + features[:, 1] * sin,
                  -features[:, 0] * sin + features[:, 1] * cos], axis=1)
    return (2.0 * x[rng.permutation(n)]).astype(np.float32)


def sample_2spirals(n: int, rng: np.random.Generator) -> np.ndarray:
    """FFJORD ``2spirals``: ``s = sqrt(U) * 3 pi``, point ``(-s cos s + U/2, s sin s + U/2)`` and
    its mirror image through the origin, over 3, plus ``N(0, 0.1^2)`` noise; shuffled."""
    _check_n(n)
    m = n - n // 2
    s = np.sqrt(rng.random((m, 1))) * 540 * (2 * np.pi) / 360
    d1x = -np.cos(s) * s + rng.random((m, 1)) * 0.5
    d1y = np.sin(s) * s + rng.random((m, 1)) * 0.5
    arm = np.hstack([d1x, d1y])
    x = np.vstack([arm, -arm[: n // 2]]) / 3.0
    x = x + 0.1 * rng.standard_normal(x.shape)
    return x[rng.permutation(n)].astype(np.float32)


def sample_checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    """FFJORD ``checkerboard``: uniform on the eight squares of side 2 in ``[-4, 4]^2`` where
    ``floor(x / 2) + floor(y / 2)`` is even."""
    _check_n(n)
    x1 = rng.random(n) * 4 - 2
    x2 = rng.random(n) - rng.integers(0, 2, size=n) * 2 + np.floor(x1) % 2
    return (2.0 * np.stack([x1, x2], axis=1)).astype(np.float32)


TOY_SAMPLERS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "swissroll": sample_swissroll,
    "circles": sample_circles,
    "rings": sample_rings,
    "moons": sample_moons,
    "8gaussians": sample_8gaussians,
    "pinwheel": sample_pinwheel,
    "2spirals": sample_2spirals,
    "checkerboard": sample_checkerboard,
}
"""Name -> sampler for FFJORD's 2-D toy densities."""

# InfoCNF (Nguyen et al. 2019, Appendix C, Figure 8) plots its 1-D mixture of three Gaussians but does not
# state its parameters; these are our documented choice: three separated, equally likely modes.
MIX1D_MEANS = np.array([-4.0, 0.0, 4.0])
MIX1D_STDS = np.array([0.5, 0.5, 0.5])
MIX1D_WEIGHTS = np.array([1.0, 1.0, 1.0]) / 3.0


def sample_mix1d_labeled(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` draws from the 1-D mixture as ``(x (n, 1) float32, component (n,) int64)``."""
    _check_n(n)
    component = rng.choice(len(MIX1D_WEIGHTS), size=n, p=MIX1D_WEIGHTS).astype(np.int64)
    x = MIX1D_MEANS[component] + MIX1D_STDS[component] * rng.standard_normal(n)
    return x[:, None].astype(np.float32), component


def sample_mix1d(n: int, rng: np.random.Generator) -> np.ndarray:
    """``(n, 1)`` float32 draws from the 1-D mixture of three Gaussians (InfoCNF Appendix C).

    Means ``(-4, 0, 4)``, standard deviations ``0.5``, equal weights (:data:`MIX1D_MEANS`, ...).
    """
    return sample_mix1d_labeled(n, rng)[0]


def mix1d_density(x: np.ndarray) -> np.ndarray:
    """The true density of :func:`sample_mix1d` at ``x`` (any shape; returned with that shape)."""
    x = np.asarray(x, dtype=np.float64)
    z = (x[..., None] - MIX1D_MEANS) / MIX1D_STDS
    pdf = np.exp(-0.5 * z**2) / (MIX1D_STDS * np.sqrt(2 * np.pi))
    return (pdf * MIX1D_WEIGHTS).sum(axis=-1)


def _draw_toy(name: str, n: int, rng: np.random.Generator) -> tuple[Tensor, None]:
    return torch.from_numpy(TOY_SAMPLERS[name](n, rng)), None


def _draw_mix1d(n: int, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    x, y = sample_mix1d_labeled(n, rng)
    return torch.from_numpy(x), torch.from_numpy(y)


def _split_text(kind: str, n_train: int, n_test: int, seed: int) -> str:
    return (f"{kind}: fresh training batches from the sampler; fixed draws of {n_train} train "
            f"(numpy seed {seed}) and {n_test} test (numpy seed {seed + 1})")


def load_toy(name: str, n_train: int = 0, n_test: int = 0, seed: int = 0) -> DataBundle:
    """Bundle for one of FFJORD's 2-D toy sets (``n_train``/``n_test`` 0 means 20,000 each)."""
    if name not in TOY_SAMPLERS:
        raise DataError(f"unknown 2-D toy set {name!r}; valid: {', '.join(TOY_SAMPLERS)}")
    n_train = n_train or DEFAULT_N_TRAIN
    n_test = n_test or DEFAULT_N_TEST
    sampler = partial(_draw_toy, name)
    train_x, _ = sampler(n_train, np.random.default_rng(seed))
    test_x, _ = sampler(n_test, np.random.default_rng(seed + 1))
    return DataBundle(name=name, train=DataSplit(train_x), test=DataSplit(test_x), shape=(2,),
                      num_classes=None, levels=None,
                      split=_split_text(f"FFJORD 2-D toy '{name}'", n_train, n_test, seed),
                      sampler=sampler)


def load_mix1d(n_train: int = 0, n_test: int = 0, seed: int = 0) -> DataBundle:
    """Bundle for the 1-D mixture of three Gaussians; labels are the component index."""
    n_train = n_train or DEFAULT_N_TRAIN
    n_test = n_test or DEFAULT_N_TEST
    train = DataSplit(*_draw_mix1d(n_train, np.random.default_rng(seed)))
    test = DataSplit(*_draw_mix1d(n_test, np.random.default_rng(seed + 1)))
    return DataBundle(name="mix1d", train=train, test=test, shape=(1,), num_classes=3,
                      levels=None,
                      split=_split_text("1-D mixture of 3 Gaussians", n_train, n_test, seed),
                      sampler=_draw_mix1d)
