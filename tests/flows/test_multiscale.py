"""FFJORD's multiscale architecture (issue 3, item 5): layout, inversion and the log-density of the
whole image flow against a brute-force Jacobian.
"""
from __future__ import annotations

import math

import pytest
import torch

from fastcnf.cnf import CNFBlock, ConcatSquashConvNet, ExactTrace
from fastcnf.flows import FactorOut, LogitTransform, SequentialFlow, Squeeze, auto_n_scales, build_multiscale
from fastcnf.flows.sequential import FlowStep
from fastcnf.models import FlowModel
from fastcnf.ode import SolverConfig
from fastcnf.priors import standard_normal_logprob

DTYPE = torch.float64


def _conv_block_factory(seed: int = 0, scale: float = 1.5, tol: float = 1e-10):
    torch.manual_seed(seed)

    def make_block(channels: int, name: str) -> CNFBlock:
        net = ConcatSquashConvNet(channels, (8, 8), activation="softplus")
        with torch.no_grad():  # a map well away from the identity
            for p in net.parameters():
                p.mul_(scale)
        return CNFBlock(net, ExactTrace(), SolverConfig(atol=tol, rtol=tol), end_time=0.5, name=name)

    return make_block


def _image_model(shape=(1, 4, 4), n_scales=2, logit=True, tol=1e-10) -> FlowModel:
    flow = build_multiscale(shape, _conv_block_factory(tol=tol), n_scales=n_scales, n_blocks=1,
                            logit_alpha=1e-6 if logit else None)
    return FlowModel(flow, levels=256).to(DTYPE)


def _images(n: int, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return 0.05 + 0.9 * torch.rand(n, *shape, generator=g, dtype=DTYPE)


class _Identity(FlowStep):
    def forward(self, x):
        return x, torch.zeros(x.shape[0], dtype=x.dtype)

    def inverse(self, y):
        return y


@pytest.mark.parametrize("shape,n_scales", [((1, 8, 8), 2), ((1, 28, 28), 3), ((3, 32, 32), 4)])
def test_automatic_number_of_scales_is_ffjords(shape, n_scales):
    assert auto_n_scales(shape) == n_scales


@pytest.mark.parametrize("shape,latent_shapes", [
    ((1, 8, 8), [(2, 4, 4), (2, 4, 4)]),
    ((1, 28, 28), [(2, 14, 14), (4, 7, 7), (4, 7, 7)]),
    ((3, 32, 32), [(6, 16, 16), (12, 8, 8), (24, 4, 4), (24, 4, 4)]),
])
def test_multiscale_factors_out_half_the_channels_per_scale(shape, latent_shapes):
    blocks = []

    def make_block(channels, name):
        blocks.append((channels, name))
        return _Identity()

    flow = build_multiscale(shape, make_block, n_scales=0, n_blocks=2)
    n_scales = len(latent_shapes)
    assert flow.latent_shapes == latent_shapes
    assert flow.latent_dim == math.prod(shape)  # the flow is dimension preserving
    # n_blocks before every squeeze and after it, n_blocks at the last scale
    assert len(blocks) == 2 * (2 * (n_scales - 1) + 1)
    assert isinstance(flow.steps[0], LogitTransform)
    assert sum(isinstance(s, Squeeze) for s in flow.steps) == sum(isinstance(s, FactorOut) for s in flow.steps) \
        == n_scales - 1
    x = torch.rand(2, *shape, dtype=DTYPE) * 0.9 + 0.05
    z, _ = flow(x)
    torch.testing.assert_close(flow.inverse(z), x, rtol=1e-9, atol=1e-9)


def test_latent_is_the_factored_pieces_then_the_final_output():
    flow = SequentialFlow([Squeeze(2), FactorOut(0.5)], (1, 4, 4))
    x = torch.arange(16, dtype=DTYPE).reshape(1, 1, 4, 4)
    z, logdet = flow(x)
    squeezed = torch.nn.functional.pixel_unshuffle(x, 2)  # (1, 4, 2, 2)
    torch.testing.assert_close(z, torch.cat([squeezed[:, 2:].reshape(1, -1), squeezed[:, :2].reshape(1, -1)], 1))
    assert logdet.item() == 0
    pieces = flow.split_latent(z)
    assert [tuple(p.shape[1:]) for p in pieces] == [(2, 2, 2), (2, 2, 2)]
    torch.testing.assert_close(flow.inverse(z), x)


def test_squeeze_is_a_volume_preserving_permutation():
    x = torch.randn(1, 2, 4, 4, dtype=DTYPE)
    y, logdet = Squeeze(2)(x)
    assert y.shape == (1, 8, 2, 2) and logdet.item() == 0
    jac = torch.autograd.functional.jacobian(lambda v: Squeeze(2)(v)[0].reshape(-1), x).reshape(32, 32)
    torch.testing.assert_close(jac @ jac.T, torch.eye(32, dtype=DTYPE))  # a permutation matrix
    assert set(jac.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(Squeeze(2).inverse(y), x)


@pytest.mark.parametrize("alpha", [0.0, 1e-6, 0.05])
def test_logit_transform_logdet_equals_the_log_derivative(alpha):
    layer = LogitTransform(alpha)
    x = _images(3, (1, 2, 2))
    y, logdet = layer(x)
    derivative = torch.autograd.functional.jacobian(lambda v: layer(v)[0].sum(0), x).sum(0)  # elementwise map
    derivative = torch.diagonal(derivative.reshape(4, 3, 4), dim1=0, dim2=2)  # (3, 4): d y_bi / d x_bi
    torch.testing.assert_close(logdet, derivative.log().sum(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.inverse(y), x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape,n_scales,tol", [((1, 4, 4), 2, 1e-10), ((1, 8, 8), 0, 1e-8)])
def test_multiscale_encode_then_decode_returns_the_image(shape, n_scales, tol):
    model = _image_model(shape, n_scales, tol=tol).eval()
    x = _images(3, shape)
    with torch.no_grad():
        z = model.encode(x)
        x_back = model.decode(z)
    assert z.shape == (3, math.prod(shape))
    assert (x_back - x).abs().max() < 1e-4
    # the CNF blocks moved the latent away from the logit of the input (not a trivial round trip)
    flow_without_cnf = torch.logit(1e-6 + (1 - 2e-6) * x)
    assert (torch.sort(z, 1).values - torch.sort(flow_without_cnf.reshape(3, -1), 1).values).abs().max() > 0.1


def test_multiscale_log_density_equals_prior_terms_plus_bruteforce_logdet():
    shape = (1, 4, 4)
    model = _image_model(shape, n_scales=2, logit=True)
    flow = model.flow
    assert len(flow.latent_sizes) == 2  # one factored-out piece and the final output
    x = _images(2, shape)
    log_p = model.log_prob(x)
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda v: flow(v.reshape(1, *shape))[0].reshape(-1),
                                                 x[i].reshape(-1), vectorize=True)
        sign, logabsdet = torch.linalg.slogdet(jac)
        z = flow(x[i:i + 1])[0]
        prior_terms = sum(standard_normal_logprob(piece) for piece in flow.split_latent(z))
        expected = prior_terms + logabsdet
        torch.testing.assert_close(log_p[i:i + 1], expected, rtol=1e-7, atol=1e-7)
        assert sign.item() == 1.0  # a flow preserves orientation
    # the CNF blocks contribute: the log-density differs from that of the logit transform alone
    logit_only = FlowModel(SequentialFlow([LogitTransform(1e-6)], shape)).to(DTYPE)
    assert (log_p - logit_only.log_prob(x)).abs().min() > 0.1
