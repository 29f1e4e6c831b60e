"""The bi-directional spiral generator (fastcnf.data.spirals; Nguyen et al. 2019, "InfoCNF", Appendix E.1): equations, directions, parameters, seeds."""
import numpy as np
import pytest
import torch

from fastcnf.data import DataConfig, DataError, load_data
from fastcnf.data.spirals import (CLOCKWISE, COUNTER_CLOCKWISE, N_EXTRAPOLATE, N_OBSERVED, SpiralBundle,
                                  make_spirals, spiral_ground_truth)


def test_spirals_are_reproducible_from_the_seed():
    x1, y1, t1 = make_spirals(20, seed=3)
    x2, y2, t2 = make_spirals(20, seed=3)
    x3, _, _ = make_spirals(20, seed=4)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(t1, t2)
    assert not torch.equal(x1, x3)


def test_half_the_spirals_turn_each_way_and_the_turn_matches_the_label():
    x, y, _ = make_spirals(40, seed=0)
    assert int((y == CLOCKWISE).sum()) == 20 and int((y == COUNTER_CLOCKWISE).sum()) == 20
    truth = x[:, :, 2:4].double()
    # eqs. 8-9: clockwise spirals are centred at (-5, 0), counter-clockwise ones at (+5, 0)
    centre = torch.where(y == CLOCKWISE, -5.0, 5.0).double()
    rel = truth.clone()
    rel[..., 0] -= centre[:, None]
    step = rel[:, 1:] - rel[:, :-1]
    cross = rel[:, :-1, 0] * step[..., 1] - rel[:, :-1, 1] * step[..., 0]  # sign of the angular velocity
    assert bool((cross[y == COUNTER_CLOCKWISE] > 0).all())
    assert bool((cross[y == CLOCKWISE] < 0).all())


def test_ground_truth_window_lies_on_the_papers_spiral_and_noise_is_0_3():
    x, y, times = make_spirals(200, seed=1)
    length = N_OBSERVED + N_EXTRAPOLATE
    assert x.shape == (200, length, 6) and times.shape == (length,)
    assert torch.allclose(times[1:] - times[:-1], torch.full((length - 1,), 6 * np.pi / 999), atol=1e-5)
    for i in range(0, 200, 17):
        a, b = float(x[i, 0, 4]), float(x[i, 0, 5])
        full = spiral_ground_truth(a, b, int(y[i]))
        start = int(np.argmin(((full - x[i, 0, 2:4].double().numpy()) ** 2).sum(1)))
        np.testing.assert_allclose(x[i, :, 2:4].numpy(), full[start:start + length], atol=1e-4)
        # (a, b) are constant along the sequence
        assert torch.all(x[i, :, 4] == x[i, 0, 4]) and torch.all(x[i, :, 5] == x[i, 0, 5])
    noise = (x[..., 0:2] - x[..., 2:4]).double()
    assert abs(float(noise.mean())) < 0.01 and abs(float(noise.std()) - 0.3) < 0.005


def test_parameters_follow_the_papers_gaussians():
    x, _, _ = make_spirals(4000, seed=2, n_observed=2, n_extrapolate=0)
    a, b = x[:, 0, 4].double(), x[:, 0, 5].double()
    assert abs(float(a.mean()) - 1.0) < 0.006 and abs(float(a.std()) - 0.08) < 0.005
    assert abs(float(b.mean()) - 0.25) < 0.002 and abs(float(b.std()) - 0.03) < 0.002


def test_clockwise_equation_8_and_counter_clockwise_equation_9():
    t = np.linspace(0, 6 * np.pi, 1000)
    ccw = spiral_ground_truth(1.1, 0.2, COUNTER_CLOCKWISE)
    np.testing.assert_allclose(ccw[:, 0], (1.1 + 0.2 * t) * np.cos(t) + 5)
    cw = spiral_ground_truth(0.9, 0.3, CLOCKWISE)
    tau = 6 * np.pi + 1 - t
    np.testing.assert_allclose(cw[:, 1], (0.9 + 0.3 * 50 / tau) * np.sin(tau))


def test_bad_generator_arguments_are_clear_errors():
    with pytest.raises(DataError, match="even"):
        make_spirals(3, seed=0)
    with pytest.raises(DataError, match="n_observed"):
        make_spirals(2, seed=0, n_observed=900, n_extrapolate=200)
    with pytest.raises(DataError, match="direction"):
        spiral_ground_truth(1.0, 0.25, 2)


def test_registry_loads_spirals_with_independent_test_draw():
    bundle = load_data(DataConfig(name="spirals", n_train=10, n_test=4), seed=5)
    assert isinstance(bundle, SpiralBundle)
    assert bundle.shape == (N_OBSERVED + N_EXTRAPOLATE, 6) and bundle.num_classes == 2 and bundle.levels is None
    assert len(bundle.train) == 10 and len(bundle.test) == 4 and bundle.train.y.dtype == torch.int64
    x_te, _, _ = make_spirals(4, seed=6)
    assert torch.equal(bundle.test.x, x_te)
