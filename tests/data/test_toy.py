"""Synthetic data sets (FFJORD 2-D toys, InfoCNF 1-D mixture) and the data registry."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastcnf.config import ConfigError
from fastcnf.data import DATASETS, DataConfig, load_data
from fastcnf.data.toy import (
    EIGHT_GAUSSIAN_CENTERS,
    MIX1D_MEANS,
    MIX1D_STDS,
    MIX1D_WEIGHTS,
    TOY_SAMPLERS,
    mix1d_density,
    sample_mix1d,
    sample_mix1d_labeled,
)

N = 20_000
FFJORD_TOYS = ["swissroll", "circles", "rings", "moons", "8gaussians", "pinwheel", "2spirals",
               "checkerboard"]


def draw(name: str, n: int = N, seed: int = 0) -> np.ndarray:
    return TOY_SAMPLERS[name](n, np.random.default_rng(seed)).astype(np.float64)


def test_all_eight_ffjord_toys_are_registered():
    assert sorted(TOY_SAMPLERS) == sorted(FFJORD_TOYS)
    assert set(FFJORD_TOYS) <= set(DATASETS)


@pytest.mark.parametrize("name", FFJORD_TOYS)
@pytest.mark.parametrize("n", [0, 1, 7, 2001])
def test_toy_sampler_returns_exactly_n_finite_float32_points(name, n):
    x = TOY_SAMPLERS[name](n, np.random.default_rng(3))
    assert x.shape == (n, 2) and x.dtype == np.float32
    assert np.isfinite(x).all()


@pytest.mark.parametrize("name", FFJORD_TOYS)
def test_toy_sampler_is_deterministic_given_the_generator_seed(name):
    np.testing.assert_array_equal(draw(name, 500, seed=5), draw(name, 500, seed=5))
    assert not np.array_equal(draw(name, 500, seed=5), draw(name, 500, seed=6))


@pytest.mark.parametrize("name", FFJORD_TOYS)
def test_toy_sampler_ignores_numpy_global_state(name):
    np.random.seed(0)
    a = draw(name, 300, seed=1)
    np.random.seed(123)
    b = draw(name, 300, seed=1)
    np.testing.assert_array_equal(a, b)


def test_8gaussians_points_cluster_around_the_eight_centres():
    x = draw("8gaussians")
    centers = EIGHT_GAUSSIAN_CENTERS / 1.414
    dist = np.linalg.norm(x[:, None, :] - centers[None], axis=2)
    nearest = dist.argmin(axis=1)
    # Per-coordinate std 0.5 / 1.414: nearest-centre distance is Rayleigh, mean sigma sqrt(pi/2).
    sigma = 0.5 / 1.414
    assert dist.min(axis=1).mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.03)
    np.testing.assert_allclose(np.bincount(nearest, minlength=8) / N, 1 / 8, atol=0.015)
    assert np.linalg.norm(centers, axis=1) == pytest.approx(np.full(8, 4 / 1.414))


def test_checkerboard_points_lie_uniformly_on_the_black_squares():
    x = draw("checkerboard")
    assert np.abs(x).max() <= 4.0
    cell = np.floor(x / 2).astype(int)
    assert ((cell[:, 0] + cell[:, 1]) % 2 == 0).all()
    squares = (cell[:, 0] + 2) * 4 + (cell[:, 1] + 2)
    counts = np.bincount(squares, minlength=16)
    assert (counts > 0).sum() == 8
    np.testing.assert_allclose(counts[counts > 0] / N, 1 / 8, atol=0.015)


def test_circles_have_radii_three_and_one_and_a_half_in_equal_parts():
    r = np.linalg.norm(draw("circles"), axis=1)
    outer = r > 2.25
    assert outer.mean() == pytest.approx(0.5, abs=0.005)  # n // 2 points on each circle
    assert r[outer].mean() == pytest.approx(3.0, abs=0.05)
    assert r[~outer].mean() == pytest.approx(1.5, abs=0.05)


def test_rings_have_four_radii_with_a_quarter_of_the_points_each():
    r = np.linalg.norm(draw("rings"), axis=1)
    radii = np.array([3.0, 2.25, 1.5, 0.75])
    gap = np.abs(r[:, None] - radii[None])
    np.testing.assert_allclose(np.bincount(gap.argmin(axis=1), minlength=4) / N, 0.25,
                               atol=0.01)
    assert gap.min(axis=1).mean() < 0.1  # noise std 0.08


def sklearn_reference(name: str, n: int) -> np.ndarray:
    """FFJORD's own calls into scikit-learn's generators (lib/toy_data.py)."""
    from sklearn import datasets

    if name == "swissroll":
        return datasets.make_swiss_roll(n, noise=1.0, random_state=0)[0][:, [0, 2]] / 5
    if name == "circles":
        return datasets.make_circles(n, factor=0.5, noise=0.08, random_state=0)[0] * 3
    return datasets.make_moons(n, noise=0.1, random_state=0)[0] * 2 + np.array([-1, -0.2])


@pytest.mark.parametrize("name", ["swissroll", "circles", "moons"])
def test_resampled_sklearn_toys_match_ffjords_sklearn_calls_in_mean_and_covariance(name):
    ours, reference = draw(name), sklearn_reference(name, N)
    np.testing.assert_allclose(ours.mean(0), reference.mean(0), atol=0.06)
    np.testing.assert_allclose(np.cov(ours.T), np.cov(reference.T), atol=0.1)


def test_pinwheel_norm_follows_from_the_radial_and_tangential_noise():
    x = draw("pinwheel")
    # A rotation keeps the norm: |x|^2 / 4 = r^2 + t^2 with r ~ N(1, 0.3^2), t ~ N(0, 0.1^2).
    assert (np.linalg.norm(x, axis=1) ** 2 / 4).mean() == pytest.approx(1.1, abs=0.03)
    np.testing.assert_allclose(x.mean(0), 0.0, atol=0.05)


def test_2spirals_points_follow_the_spiral_angle_radius_relation():
    x = draw("2spirals")
    s = 3 * np.linalg.norm(x, axis=1)
    assert s.mean() / 3 == pytest.approx(2 * np.pi / 3, abs=0.1)  # E[3 pi sqrt(U)] / 3
    # Arm (-s cos s, s sin s) has polar angle pi - s; its mirror has -s: (angle + s) mod pi ~ 0.
    residue = np.mod(np.arctan2(x[:, 1], x[:, 0]) + s, np.pi)
    off = np.minimum(residue, np.pi - residue)[s > 3]
    assert (off < 0.5).mean() > 0.65  # about 0.32 for points spread uniformly
    np.testing.assert_allclose(x.mean(0), 0.0, atol=0.05)


def test_mix1d_density_integrates_to_one_and_matches_the_stated_parameters():
    grid = np.linspace(-12, 12, 8001)
    density = mix1d_density(grid)
    trapezoid = ((density[1:] + density[:-1]) / 2 * np.diff(grid)).sum()
    assert trapezoid == pytest.approx(1.0, abs=1e-9)
    assert MIX1D_WEIGHTS.sum() == pytest.approx(1.0)
    peak = mix1d_density(MIX1D_MEANS)
    assert peak == pytest.approx(np.full(3, 1 / 3 / (0.5 * np.sqrt(2 * np.pi))), rel=1e-6)


def test_mix1d_samples_match_the_density_moments_and_histogram():
    x = sample_mix1d(200_000, np.random.default_rng(0))[:, 0].astype(np.float64)
    mean = (MIX1D_WEIGHTS * MIX1D_MEANS).sum()
    var = (MIX1D_WEIGHTS * (MIX1D_STDS**2 + MIX1D_MEANS**2)).sum() - mean**2
    assert x.mean() == pytest.approx(mean, abs=0.03)
    assert x.var() == pytest.approx(var, rel=0.01)
    hist, edges = np.histogram(x, bins=120, range=(-6, 6), density=True)
    centres = (edges[:-1] + edges[1:]) / 2
    assert np.abs(hist - mix1d_density(centres)).max() < 0.02


def test_mix1d_labels_are_the_generating_component():
    x, y = sample_mix1d_labeled(5000, np.random.default_rng(1))
    assert y.dtype == np.int64 and set(np.unique(y)) == {0, 1, 2}
    assert (np.abs(x[:, 0] - MIX1D_MEANS[y]) < 5 * MIX1D_STDS[y]).all()


def test_toy_bundle_draws_train_from_seed_and_test_from_seed_plus_one():
    bundle = load_data(DataConfig(name="moons", n_train=300, n_test=200), seed=4)
    assert bundle.shape == (2,) and bundle.dim == 2 and not bundle.is_image
    assert bundle.levels is None and bundle.num_classes is None and bundle.train.y is None
    assert bundle.train.x.dtype == torch.float32 and bundle.train.x.shape == (300, 2)
    np.testing.assert_array_equal(bundle.train.x.numpy(),
                                  TOY_SAMPLERS["moons"](300, np.random.default_rng(4)))
    np.testing.assert_array_equal(bundle.test.x.numpy(),
                                  TOY_SAMPLERS["moons"](200, np.random.default_rng(5)))
    assert "seed 4" in bundle.split and "seed 5" in bundle.split


def test_toy_bundle_defaults_and_sampler_gives_fresh_batches():
    bundle = load_data(DataConfig(name="8gaussians"))
    assert len(bundle.train) == 20_000 and len(bundle.test) == 20_000
    rng = np.random.default_rng(0)
    (a, ya), (b, _) = bundle.sampler(64, rng), bundle.sampler(64, rng)
    assert a.shape == (64, 2) and a.dtype == torch.float32 and ya is None
    assert not torch.equal(a, b)


def test_mix1d_bundle_has_component_labels_and_a_labelled_sampler():
    bundle = load_data(DataConfig(name="mix1d", n_train=1000, n_test=500))
    assert bundle.shape == (1,) and bundle.num_classes == 3 and bundle.levels is None
    assert bundle.train.x.shape == (1000, 1) and bundle.train.y.dtype == torch.int64
    x, y = bundle.sampler(32, np.random.default_rng(0))
    assert x.shape == (32, 1) and y.shape == (32,) and y.dtype == torch.int64


def test_unknown_dataset_name_lists_valid_names_and_suggests_a_close_one():
    with pytest.raises(ConfigError, match="did you mean '8gaussians'") as err:
        load_data(DataConfig(name="8gausians"))
    for name in DATASETS:
        assert name in str(err.value)
    with pytest.raises(ConfigError, match="data.name='svhn' is not valid; accepted: "):
        load_data(DataConfig(name="svhn"))
