"""The U-Net velocity field (issue 19): shapes on 8x8 digits and 28x28 MNIST (also sizes not
divisible by 2**levels), per-example times, batch independence (a per-example Jacobian, as the
change of variables needs), label conditioning, and use as a CNF block's dynamics.
"""
from __future__ import annotations

import pytest
import torch

from fastcnf.cnf import CNFBlock, Hutchinson
from fastcnf.cnf.likelihood import log_prob
from fastcnf.cnf.unet import UNetVelocity, sinusoidal_embedding
from fastcnf.ode import SolverConfig


def _net(**kwargs) -> UNetVelocity:
    torch.manual_seed(0)
    return UNetVelocity(**{"channels": 1, "base_channels": 8, **kwargs})


@pytest.mark.parametrize("size,levels", [(8, 2), (28, 2), (28, 3), (7, 2), (5, 1)])
def test_output_shape_equals_input_shape(size, levels):
    x = torch.randn(3, 1, size, size)
    assert _net(levels=levels)(torch.rand(3), x).shape == x.shape


def test_three_channel_images_and_channel_multipliers():
    net = UNetVelocity(3, base_channels=8, levels=2, channel_mult=(1, 2, 4))
    x = torch.randn(2, 3, 8, 8)
    assert net(torch.tensor(0.5), x).shape == x.shape
    with pytest.raises(ValueError, match="channel_mult"):
        UNetVelocity(3, levels=2, channel_mult=(1, 2))


def test_scalar_time_equals_the_same_time_per_example():
    net, x = _net(), torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(net(torch.tensor(0.3), x), net(torch.full((4,), 0.3), x))


def test_each_output_depends_only_on_its_own_example_and_time():
    net = _net()
    x, t = torch.randn(5, 1, 8, 8), torch.rand(5)
    batched = net(t, x)
    for i in range(5):
        torch.testing.assert_close(batched[i], net(t[i], x[i:i + 1])[0], rtol=1e-5, atol=1e-6)


def test_output_changes_with_time():
    net, x = _net(), torch.randn(2, 1, 8, 8)
    assert (net(torch.tensor(0.1), x) - net(torch.tensor(0.9), x)).abs().max() > 1e-3


def test_class_conditional_output_changes_with_the_label():
    net, x, t = _net(num_classes=10), torch.randn(4, 1, 8, 8), torch.rand(4)
    a = net(t, x, torch.tensor([0, 1, 2, 3]))
    b = net(t, x, torch.tensor([4, 1, 7, 3]))
    assert (a[0] - b[0]).abs().max() > 1e-3 and (a[2] - b[2]).abs().max() > 1e-3
    torch.testing.assert_close(a[1], b[1])
    with pytest.raises(ValueError, match="labels"):
        net(t, x)
    with pytest.raises(ValueError, match="unconditional"):
        _net()(t, x, torch.tensor([0, 1, 2, 3]))


def test_sinusoidal_embedding_is_bounded_and_distinguishes_times():
    emb = sinusoidal_embedding(torch.tensor([0.0, 0.5, 1.0]), 9)
    assert emb.shape == (3, 9) and emb.abs().max() <= 1
    assert (emb[0] - emb[1]).abs().max() > 0.1


def test_unet_is_a_cnf_block_dynamics_with_the_hutchinson_estimator():
    net = _net(levels=1)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    net = net.to(torch.float64)
    block = CNFBlock(net, Hutchinson(generator=torch.Generator().manual_seed(0)),
                     SolverConfig(atol=1e-6, rtol=1e-6), end_time=1.0)
    with torch.no_grad():
        z, logdet = block(x)
        back = block.inverse(z)
    assert z.shape == x.shape and torch.isfinite(logdet).all()
    torch.testing.assert_close(back, x, rtol=1e-4, atol=1e-4)
    exact = log_prob(net, x)  # 16 dimensions: the exact trace
    est = log_prob(net, x, divergence="hutchinson", probes=16, generator=torch.Generator().manual_seed(1))
    assert ((est.log_prob - exact.log_prob).abs() <= 5 * est.stderr + 1e-6).all()
