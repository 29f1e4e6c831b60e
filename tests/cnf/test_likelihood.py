"""The public log-density of a velocity field (issue 19): against fields with closed-form densities
(a linear field's Gaussian pushforward; the exact marginal field between two Gaussians), in both
time conventions, exact and Hutchinson (unbiased within its standard error, which shrinks as
1/sqrt(probes)), and equal to a CNF block built around the same network.
"""
from __future__ import annotations

import math

import pytest
import torch

from fastcnf.cnf import CNFBlock, ConcatSquashMLP, ExactTrace
from fastcnf.cnf.likelihood import log_prob, standard_normal_log_density
from fastcnf.ode import SolverConfig

DTYPE = torch.float64


def _matrix(d=3, seed=0, scale=0.4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, d, generator=g, dtype=DTYPE) * scale


def _data(b=32, d=3, seed=1):
    return torch.randn(b, d, generator=torch.Generator().manual_seed(seed), dtype=DTYPE) * 1.3 + 0.5


def _linear_closed_form(A, x, end_time=1.0):
    """v = A x from 0 to T: z = exp(T A) x, log p(x) = log N(z) + T tr(A)."""
    z = x @ torch.linalg.matrix_exp(end_time * A).T
    return standard_normal_log_density(z) + end_time * torch.trace(A)


# the exact marginal field of the independent path x_t = (1 - t) x + t eps between data N(m, s^2 I)
# and noise N(0, I): E[eps - x | x_t] = -m + (t - (1 - t) s^2) / var_t (x_t - (1 - t) m)
MEAN, SCALE = torch.tensor([1.5, -1.0], dtype=DTYPE), 0.5


def _gaussian_marginal_field(t, x):
    var = (1 - t) ** 2 * SCALE ** 2 + t ** 2
    return -MEAN + (t - (1 - t) * SCALE ** 2) / var * (x - (1 - t) * MEAN)


def _gaussian_log_density(x):
    return (-0.5 * ((x - MEAN) / SCALE) ** 2 - math.log(SCALE) - 0.5 * math.log(2 * math.pi)).sum(1)


@pytest.mark.parametrize("end_time", [1.0, 0.7])
def test_exact_log_prob_of_a_linear_field_is_the_gaussian_pushforward(end_time):
    A, x = _matrix(), _data()
    res = log_prob(lambda t, z: z @ A.T, x, end_time=end_time)  # solver tolerances 1e-5
    torch.testing.assert_close(res.log_prob, _linear_closed_form(A, x, end_time), rtol=1e-4, atol=1e-4)
    tight = log_prob(lambda t, z: z @ A.T, x, end_time=end_time, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(tight.log_prob, _linear_closed_form(A, x, end_time), rtol=0, atol=1e-7)
    assert res.stderr is None and res.probes == 1 and res.nfe_forward > 0


def test_noise_to_data_convention_runs_the_same_flow_backwards():
    """v(t, x) = -A x from noise (t = 0) to data (t = T) is the field A x from data to noise."""
    A, x = _matrix(seed=2), _data(seed=3)
    res = log_prob(lambda t, z: -(z @ A.T), x, time_convention="noise_to_data", atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(res.log_prob, _linear_closed_form(A, x), rtol=0, atol=1e-7)


@pytest.mark.parametrize("convention", ["data_to_noise", "noise_to_data"])
def test_log_prob_of_the_exact_gaussian_marginal_field_is_the_data_density(convention):
    x = MEAN + SCALE * torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    def reversed_field(t, z):  # the same field written noise -> data, as torchcfm trains it
        return -_gaussian_marginal_field(1 - t, z)

    field = reversed_field if convention == "noise_to_data" else _gaussian_marginal_field
    res = log_prob(field, x, time_convention=convention, atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(res.log_prob, _gaussian_log_density(x), rtol=0, atol=1e-5)


def test_log_prob_flattens_images_for_the_prior():
    A = _matrix(d=4, seed=4)
    x = _data(b=8, d=4, seed=5)
    images = x.reshape(8, 1, 2, 2)
    res = log_prob(lambda t, z: (z.reshape(8, 4) @ A.T).reshape(z.shape), images, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(res.log_prob, _linear_closed_form(A, x), rtol=0, atol=1e-7)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_log_prob_is_unbiased_within_its_standard_error(noise):
    A, x = _matrix(d=4, seed=6, scale=0.6), _data(b=64, d=4, seed=7)
    exact = _linear_closed_form(A, x)
    res = log_prob(lambda t, z: z @ A.T, x, divergence="hutchinson", probes=32, noise=noise,
                   generator=torch.Generator().manual_seed(0))
    assert res.probes == 32 and res.stderr.shape == (64,) and (res.stderr > 0).all()
    zscores = (res.log_prob - exact) / res.stderr
    assert (zscores.abs() < 4).float().mean() >= 0.95
    assert abs(zscores.mean().item()) < 4 / math.sqrt(64)  # no bias: the mean z-score is ~N(0, 1/B)


def test_hutchinson_standard_error_shrinks_as_one_over_sqrt_probes():
    A, x = _matrix(d=4, seed=8, scale=0.6), _data(b=64, d=4, seed=9)

    def stderr(probes):
        res = log_prob(lambda t, z: z @ A.T, x, divergence="hutchinson", probes=probes,
                       generator=torch.Generator().manual_seed(probes))
        return res.stderr.mean().item()

    ratio = stderr(16) / stderr(64)
    assert 1.6 < ratio < 2.5  # sqrt(64 / 16) = 2


def test_a_module_velocity_is_a_cnf_block_dynamics_as_it_stands():
    torch.manual_seed(0)
    net = ConcatSquashMLP(2, (16, 16)).to(DTYPE)
    x = _data(b=16, d=2, seed=10)
    solver = SolverConfig(atol=1e-8, rtol=1e-8)
    block = CNFBlock(net, ExactTrace(), solver, end_time=1.0).to(DTYPE)
    with torch.no_grad():
        z, logdet = block(x)
    expected = standard_normal_log_density(z) + logdet
    res = log_prob(net, x, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(res.log_prob, expected, rtol=0, atol=1e-10)
    # through the generic adapter (a function, autograd trace): the same density
    generic = log_prob(lambda t, z: net(t, z), x, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(generic.log_prob, expected, rtol=0, atol=1e-6)
    assert next(net.parameters()).dtype == DTYPE and net.training  # the caller's module is left as it was


def test_conditioning_is_passed_to_the_velocity_and_repeated_over_probes():
    A, x = _matrix(d=3, seed=11), _data(b=6, d=3, seed=12)
    scale = torch.tensor([0.5, 1.0, 1.5, -0.5, 2.0, 0.0], dtype=DTYPE)

    def velocity(t, z, c):
        return c[:, None] * (z @ A.T)

    expected = torch.stack([_linear_closed_form(c * A, x[i:i + 1])[0] for i, c in enumerate(scale)])
    res = log_prob(velocity, x, cond=scale, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(res.log_prob, expected, rtol=0, atol=1e-7)
    est = log_prob(velocity, x, cond=scale, divergence="hutchinson", probes=8,
                   generator=torch.Generator().manual_seed(0))
    assert est.log_prob.shape == (6,)
    assert ((est.log_prob - expected).abs() <= 5 * est.stderr + 1e-6).all()


def test_a_given_prior_replaces_the_standard_normal():
    A, x = _matrix(seed=13), _data(seed=14)
    prior = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(3, dtype=DTYPE),
                                                                       2 * torch.ones(3, dtype=DTYPE)), 1)
    z = x @ torch.linalg.matrix_exp(A).T
    expected = prior.log_prob(z) + torch.trace(A)
    as_object = log_prob(lambda t, v: v @ A.T, x, prior=prior, atol=1e-9, rtol=1e-9).log_prob
    torch.testing.assert_close(as_object, expected, rtol=0, atol=1e-7)
    as_function = log_prob(lambda t, v: v @ A.T, x, prior=prior.log_prob, atol=1e-9, rtol=1e-9).log_prob
    torch.testing.assert_close(as_function, expected, rtol=0, atol=1e-7)


def test_gradients_flow_only_when_asked():
    torch.manual_seed(1)
    net = ConcatSquashMLP(2, (8, 8))
    x = torch.randn(8, 2)
    assert not log_prob(net, x).log_prob.requires_grad
    res = log_prob(net, x, grad=True, divergence="hutchinson", probes=2, generator=torch.Generator().manual_seed(0))
    res.log_prob.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_invalid_arguments_are_rejected():
    x = _data(b=4)
    with pytest.raises(ValueError, match="probes"):
        log_prob(lambda t, z: z, x, probes=4)
    with pytest.raises(ValueError, match="accepted: exact, hutchinson"):
        log_prob(lambda t, z: z, x, divergence="trace")
    with pytest.raises(ValueError, match="accepted: data_to_noise, noise_to_data"):
        log_prob(lambda t, z: z, x, time_convention="forward")
    with pytest.raises(ValueError, match=">= 1"):
        log_prob(lambda t, z: z, x, divergence="hutchinson", probes=0)
