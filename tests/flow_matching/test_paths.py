"""Conditional probability paths and time samplers (issue 19): closed forms, the time reversal of
Lipman's OT path, and target velocities against a finite-difference time derivative of the path.
"""
from __future__ import annotations

import math

import pytest
import torch

from fastcnf.flow_matching.paths import IndependentCFMPath, LipmanOTPath, LogitNormalTime, UniformTime

DTYPE = torch.float64
SHAPES = [(7, 3), (5, 2, 3, 3)]  # vectors and images


def _batch(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=DTYPE) * 0.7 + 1.5
    eps = torch.randn(shape, generator=g, dtype=DTYPE)
    t = torch.rand(shape[0], generator=g, dtype=DTYPE) * 0.8 + 0.1
    return x, eps, t


def _col(t, like):
    return t.reshape(-1, *([1] * (like.dim() - 1)))


@pytest.mark.parametrize("shape", SHAPES)
def test_cfm_path_and_velocity_match_the_closed_form(shape):
    x, eps, t = _batch(shape)
    x_t, u_t = IndependentCFMPath(sigma=0.0).sample(x, eps, t)
    tc = _col(t, x)
    torch.testing.assert_close(x_t, (1 - tc) * x + tc * eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(u_t, eps - x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_lipman_path_is_the_time_reversal_of_the_paper(shape):
    """Lipman et al. 2023 eq. 20-22 in their time t' (noise at 0, data at 1), evaluated at
    t' = 1 - t, give the same point; the reversed velocity is minus eq. 21 at that point."""
    sigma_min = 0.05
    x, eps, t = _batch(shape)
    path = LipmanOTPath(sigma_min)
    x_t, u_t = path.sample(x, eps, t)
    tp = _col(1 - t, x)
    psi = (1 - (1 - sigma_min) * tp) * eps + tp * x  # eq. 22, x0 = eps (noise), x1 = x (data)
    u_paper = (x - (1 - sigma_min) * psi) / (1 - (1 - sigma_min) * tp)  # eq. 21 at psi
    torch.testing.assert_close(x_t, psi, rtol=0, atol=1e-12)
    torch.testing.assert_close(u_t, -u_paper, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(u_t, (1 - sigma_min) * eps - x, rtol=0, atol=1e-12)
    torch.testing.assert_close(path.velocity_at(x_t, x, t), u_t, rtol=1e-10, atol=1e-10)


def test_lipman_path_ends_at_the_noise_and_at_the_smoothed_data():
    x, eps, _ = _batch((6, 4))
    path = LipmanOTPath(sigma_min=0.1)
    x1, _ = path.sample(x, eps, torch.ones(6, dtype=DTYPE))
    x0, _ = path.sample(x, eps, torch.zeros(6, dtype=DTYPE))
    torch.testing.assert_close(x1, eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(x0, x + 0.1 * eps, rtol=0, atol=1e-12)


def test_cfm_path_ends_at_the_data_and_at_the_noise():
    x, eps, _ = _batch((6, 4))
    path = IndependentCFMPath()
    torch.testing.assert_close(path.sample(x, eps, torch.zeros(6, dtype=DTYPE))[0], x, rtol=0, atol=0)
    torch.testing.assert_close(path.sample(x, eps, torch.ones(6, dtype=DTYPE))[0], eps, rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("path", [IndependentCFMPath(0.0), IndependentCFMPath(0.3), LipmanOTPath(0.0),
                                  LipmanOTPath(0.2)], ids=repr)
def test_target_velocity_is_the_time_derivative_of_the_sampled_path(path, shape):
    """Central difference of x_t in t (the path's own extra noise held fixed by reseeding)."""
    x, eps, t = _batch(shape, seed=1)
    h = 1e-5

    def point(tt):
        return path.sample(x, eps, tt, generator=torch.Generator().manual_seed(7))

    fd = (point(t + h)[0] - point(t - h)[0]) / (2 * h)
    torch.testing.assert_close(point(t)[1], fd, rtol=1e-6, atol=1e-6)


def test_cfm_sigma_adds_gaussian_spread_around_the_mean():
    x = torch.full((20000, 2), 2.0, dtype=DTYPE)
    eps = torch.full((20000, 2), -1.0, dtype=DTYPE)
    t = torch.full((20000,), 0.25, dtype=DTYPE)
    x_t, u_t = IndependentCFMPath(sigma=0.3).sample(x, eps, t, generator=torch.Generator().manual_seed(0))
    assert abs(x_t.mean().item() - (0.75 * 2.0 - 0.25)) < 0.01
    assert abs(x_t.std().item() - 0.3) < 0.01
    torch.testing.assert_close(u_t, eps - x)  # the target does not see the spread (Tong et al. eq. 15)


def test_path_accepts_a_scalar_time():
    x, eps, _ = _batch((4, 3))
    x_t, _ = IndependentCFMPath().sample(x, eps, torch.tensor(0.5, dtype=DTYPE))
    torch.testing.assert_close(x_t, 0.5 * (x + eps))


def test_path_rejects_time_of_the_wrong_shape_and_mismatched_batches():
    x, eps, _ = _batch((4, 3))
    with pytest.raises(ValueError, match="shape"):
        IndependentCFMPath().sample(x, eps, torch.rand(3, dtype=DTYPE))
    with pytest.raises(ValueError, match="differ"):
        LipmanOTPath().sample(x, eps[:2], torch.rand(4, dtype=DTYPE))


def test_the_configured_path_is_built_and_unknown_names_are_listed():
    from fastcnf.methods import load_recipe
    from fastcnf.flow_matching.objective import FlowMatching

    cfg = load_recipe("toy-fm", ["flow_matching.path=ot", "flow_matching.sigma_min=0.01"])
    path = FlowMatching(cfg, None).path
    assert isinstance(path, LipmanOTPath) and path.sigma_min == 0.01
    assert isinstance(FlowMatching(load_recipe("toy-fm", ["flow_matching.sigma=0.1"]), None).path, IndependentCFMPath)
    with pytest.raises(ValueError, match="accepted: cfm, ot"):
        load_recipe("toy-fm", ["flow_matching.path=otcfm"])
    with pytest.raises(ValueError):
        LipmanOTPath(sigma_min=1.0)


def test_uniform_time_is_uniform_and_reproducible():
    t = UniformTime()(50000, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    assert t.shape == (50000,) and t.dtype == DTYPE
    assert 0 <= t.min() and t.max() <= 1
    assert abs(t.mean().item() - 0.5) < 0.01 and abs(t.var().item() - 1 / 12) < 0.002
    again = UniformTime()(50000, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(t, again, rtol=0, atol=0)


def test_logit_normal_time_has_normal_logits():
    t = LogitNormalTime(mean=0.5, std=0.8)(50000, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    logit = torch.log(t) - torch.log1p(-t)
    assert abs(logit.mean().item() - 0.5) < 0.02 and abs(logit.std().item() - 0.8) < 0.02
    from fastcnf.flow_matching.config import FlowMatchingConfig

    with pytest.raises(ValueError, match="accepted: uniform, logit_normal"):
        FlowMatchingConfig(time_sampling="beta")
    assert math.isclose(LogitNormalTime().std, 1.0)
