"""The model a user holds (issue 3, item 6): log_prob / sample / encode / decode / bits_per_dim, the
prior interface, and clear errors for bad input at the model's boundary.
"""
from __future__ import annotations

import math

import pytest
import torch

from fastcnf.cnf import CNFBlock, ConcatSquashConvNet, ConcatSquashMLP, ExactTrace
from fastcnf.flows import LogitTransform, SequentialFlow, build_multiscale
from fastcnf.models import FlowModel, InputError
from fastcnf.models.flow_model import bits_per_dim_from_log_prob
from fastcnf.ode import SolverConfig
from fastcnf.priors import StandardNormal
from reference_models import LinearField, ZeroField

DTYPE = torch.float64


def _gaussian_log_density(x: torch.Tensor) -> torch.Tensor:
    return torch.distributions.Normal(0.0, 1.0).log_prob(x).reshape(x.shape[0], -1).sum(1)


def _vector_model(dim: int = 2) -> FlowModel:
    torch.manual_seed(0)
    block = CNFBlock(ConcatSquashMLP(dim, (16, 16)), ExactTrace(), SolverConfig(atol=1e-7, rtol=1e-7), end_time=0.5)
    return FlowModel(SequentialFlow([block], (dim,))).to(DTYPE)


def _image_model(shape=(1, 4, 4)) -> FlowModel:
    torch.manual_seed(0)

    def make_block(c, name):
        return CNFBlock(ConcatSquashConvNet(c, (8,)), ExactTrace(), SolverConfig(atol=1e-6, rtol=1e-6),
                        end_time=0.5, name=name)

    return FlowModel(build_multiscale(shape, make_block, n_scales=2, n_blocks=1), levels=256).to(DTYPE)


# ---- densities ----------------------------------------------------------------------------------


def test_standard_normal_prior_is_the_gaussian_density_and_samples_it():
    prior = StandardNormal(3)
    z = torch.randn(5, 3, dtype=DTYPE)
    torch.testing.assert_close(prior.log_prob(z), _gaussian_log_density(z))
    s = prior.sample(20000, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    assert s.shape == (20000, 3) and s.dtype == DTYPE
    torch.testing.assert_close(s.mean(0), torch.zeros(3, dtype=DTYPE), atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(s.T), torch.eye(3, dtype=DTYPE), atol=0.04, rtol=0)


def test_log_prob_is_prior_of_the_encoding_plus_the_logdet():
    model = _vector_model()
    x = torch.randn(6, 2, dtype=DTYPE)
    z, logdet = model(x)
    torch.testing.assert_close(model.encode(x), z)
    torch.testing.assert_close(model.log_prob(x), _gaussian_log_density(z) + logdet)
    assert logdet.abs().max() > 1e-3


def test_samples_of_linear_dynamics_have_the_pushed_forward_covariance():
    # z = exp(TA) x with z ~ N(0, I)  =>  x ~ N(0, exp(-TA) exp(-TA)^T)
    torch.manual_seed(4)
    a = 0.8 * torch.randn(2, 2, dtype=DTYPE)
    end_time = 0.9
    block = CNFBlock(LinearField(a), ExactTrace(), SolverConfig(atol=1e-8, rtol=1e-8), end_time=end_time)
    model = FlowModel(SequentialFlow([block], (2,))).to(DTYPE).eval()
    n = 20000
    x = model.sample(n, generator=torch.Generator().manual_seed(1))
    m = torch.linalg.matrix_exp(-end_time * a)
    cov = m @ m.T
    assert x.shape == (n, 2) and x.dtype == DTYPE
    # sampling error of a covariance entry is about sqrt((S_ii S_jj + S_ij^2) / n)
    se = ((torch.diagonal(cov)[:, None] * torch.diagonal(cov)[None, :] + cov ** 2) / n).sqrt()
    assert ((torch.cov(x.T) - cov).abs() < 4 * se).all(), (torch.cov(x.T), cov)
    assert (x.mean(0).abs() < 4 * torch.diagonal(cov).sqrt() / math.sqrt(n)).all()
    # and the model's density of x is the Gaussian N(0, cov)
    gaussian = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=DTYPE), cov)
    with torch.no_grad():
        torch.testing.assert_close(model.log_prob(x[:50]), gaussian.log_prob(x[:50]), rtol=1e-6, atol=1e-6)


def test_sample_from_a_flow_without_parameters():
    model = FlowModel(SequentialFlow([LogitTransform(0.0)], (1, 2, 2)), levels=256)
    x = model.sample(4, generator=torch.Generator().manual_seed(0))
    assert x.shape == (4, 1, 2, 2) and x.dtype == torch.get_default_dtype()
    assert ((x > 0) & (x < 1)).all()  # the inverse logit maps into the unit cube
    # without parameters the flow takes any floating dtype
    x64 = x.to(DTYPE)
    torch.testing.assert_close(model.decode(model.encode(x64)), x64)


def test_bits_per_dim_equals_its_definition():
    model = _image_model()
    x = 0.05 + 0.9 * torch.rand(3, 1, 4, 4, dtype=DTYPE)
    with torch.no_grad():
        log_p = model.log_prob(x)
        bpd = model.bits_per_dim(x)
    torch.testing.assert_close(bpd, -(log_p / 16 - math.log(256)) / math.log(2), rtol=1e-12, atol=1e-12)
    assert bits_per_dim_from_log_prob(torch.tensor(0.0), 16, 17).item() == pytest.approx(math.log2(17))


def test_bits_per_dim_of_an_identity_flow_is_that_of_the_gaussian():
    # zero dynamics, no logit transform: the model is N(0, I) on the dequantised images
    shape = (1, 4, 4)
    block = CNFBlock(ZeroField(), ExactTrace(), end_time=1.0)
    model = FlowModel(SequentialFlow([block], shape), levels=256).to(DTYPE)
    x = torch.rand(5, *shape, dtype=DTYPE)
    log_gauss = (-0.5 * x.pow(2) - 0.5 * math.log(2 * math.pi)).reshape(5, -1).sum(1)
    expected = -(log_gauss / 16 - math.log(256)) / math.log(2)
    torch.testing.assert_close(model.bits_per_dim(x), expected, rtol=1e-12, atol=1e-12)
    # on x = 0 every pixel costs log2(256) - log2(N(0; 0, 1)) bits
    expected_zero = 8 + 0.5 * math.log2(2 * math.pi)
    torch.testing.assert_close(model.bits_per_dim(torch.zeros(1, *shape, dtype=DTYPE)),
                               torch.tensor([expected_zero], dtype=DTYPE))


def test_bits_per_dim_requires_image_levels():
    with pytest.raises(InputError, match="bits/dim is defined for image data only"):
        _vector_model().bits_per_dim(torch.zeros(2, 2, dtype=DTYPE))


# ---- bad input at the boundary -------------------------------------------------------------------


@pytest.mark.parametrize("method", ["log_prob", "encode", "forward", "bits_per_dim"])
def test_bad_input_is_rejected_at_the_model_boundary(method):
    model = _image_model()
    call = getattr(model, method)
    good = torch.rand(2, 1, 4, 4, dtype=DTYPE)
    with pytest.raises(InputError, match=r"expected input of shape \(batch, 1, 4, 4\), got \(1, 4, 4\)"):
        call(good[0])  # an unbatched image
    with pytest.raises(InputError, match=r"expected input of shape \(batch, 1, 4, 4\), got \(2, 1, 8, 2\)"):
        call(good.reshape(2, 1, 8, 2))
    with pytest.raises(InputError, match=r"floating-point input, got dtype torch.uint8.*dequantise"):
        call((good * 255).to(torch.uint8))
    with pytest.raises(InputError, match=r"dtype torch.float64 \(the model's\), got torch.float32"):
        call(good.float())
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = good.clone()
        x[1, 0, 2, 3] = bad
        with pytest.raises(InputError, match="input contains NaN or inf"):
            call(x)
    with pytest.raises(InputError, match="as a torch.Tensor, got list"):
        call(good.tolist())


def test_images_outside_the_unit_interval_are_rejected_by_the_logit_transform():
    model = _image_model()
    x = torch.rand(2, 1, 4, 4, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"logit transform expects dequantised images in \[0, 1\], got values in"):
        model.log_prob(x * 255)
    x[0, 0, 1, 2] = -0.5
    with pytest.raises(ValueError, match=r"got values in \[-0.5, "):
        model.log_prob(x)


def test_bad_latent_and_sample_count_are_rejected():
    model = _vector_model()
    with pytest.raises(InputError, match=r"expected latent of shape \(batch, 2\), got \(4, 3\)"):
        model.decode(torch.zeros(4, 3, dtype=DTYPE))
    with pytest.raises(InputError, match="latent contains NaN or inf"):
        model.decode(torch.tensor([[0.0, float("nan")]], dtype=DTYPE))
    with pytest.raises(InputError, match="floating-point latent, got dtype torch.int64"):
        model.decode(torch.zeros(1, 2, dtype=torch.long))
    for n in (0, -3, 2.5, True):
        with pytest.raises(InputError, match="number of samples must be a positive int"):
            model.sample(n)
