"""The flow-matching loss (issue 19): per-example times for any dynamics network, the loss against
its definition, class-wise pairing, and Gaussian-to-Gaussian training whose likelihood (by the
engine, exact trace) comes within a few hundredths of a nat of the data's own density.
"""
from __future__ import annotations

import math

import pytest
import torch

from fastcnf.cnf import ConcatSquashConvNet, ConcatSquashMLP
from fastcnf.flow_matching.pairing import ExactOTCoupling, IndependentCoupling
from fastcnf.flow_matching.loss import flow_matching_loss, velocity_at_times
from fastcnf.cnf.likelihood import log_prob
from fastcnf.flow_matching.paths import IndependentCFMPath, LipmanOTPath, UniformTime
from fastcnf.cnf.unet import UNetVelocity


def _per_example(net, t, x, cond=None):
    rows = [net(t[i], x[i:i + 1], *(() if cond is None else (cond[i:i + 1],))) for i in range(x.shape[0])]
    return torch.cat(rows)


@pytest.mark.filterwarnings("ignore:ConcatSquashConvNet takes a scalar time")  # channels-last: not vmappable
@pytest.mark.parametrize("make", [lambda: ConcatSquashMLP(3, (16, 16)), lambda: ConcatSquashConvNet(1, (8, 8)),
                                  lambda: ConcatSquashConvNet(1, (8, 8), channels_last=False)],
                         ids=["concat-squash-mlp", "concat-squash-conv", "concat-squash-conv-nchw"])
def test_velocity_at_times_equals_evaluating_each_example_at_its_time(make):
    torch.manual_seed(0)
    net = make()
    x = torch.randn(5, 3) if isinstance(net, ConcatSquashMLP) else torch.randn(5, 1, 6, 6)
    t = torch.rand(5)
    torch.testing.assert_close(velocity_at_times(net, t, x), _per_example(net, t, x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(velocity_at_times(net, torch.tensor(0.4), x), net(torch.tensor(0.4), x))


def test_velocity_at_times_passes_conditioning_to_a_per_example_network():
    torch.manual_seed(0)
    net = UNetVelocity(1, base_channels=8, levels=1, num_classes=3)
    x, t, y = torch.randn(4, 1, 4, 4), torch.rand(4), torch.tensor([0, 2, 1, 2])
    torch.testing.assert_close(velocity_at_times(net, t, x, y), _per_example(net, t, x, y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", [IndependentCFMPath(0.0), LipmanOTPath(1e-3)], ids=repr)
def test_loss_is_the_mean_squared_error_to_the_target_velocity(path):
    """Replays the generator: times first, then the path's draws (none for these paths)."""
    torch.manual_seed(0)
    net = ConcatSquashMLP(2, (16, 16))
    x, eps = torch.randn(16, 2) + 2, torch.randn(16, 2)
    loss = flow_matching_loss(net, x, eps, path, generator=torch.Generator().manual_seed(5))
    t = torch.rand(16, generator=torch.Generator().manual_seed(5))
    x_t, u_t = path.sample(x, eps, t)
    expected = torch.stack([((net(t[i], x_t[i:i + 1])[0] - u_t[i]) ** 2).mean() for i in range(16)]).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)


def test_loss_uses_the_coupled_noise():
    torch.manual_seed(0)
    net = ConcatSquashMLP(2, (16, 16))
    x, eps = torch.randn(16, 2) + 2, torch.randn(16, 2)
    path = IndependentCFMPath()
    loss = flow_matching_loss(net, x, eps, path, ExactOTCoupling(), UniformTime(),
                              generator=torch.Generator().manual_seed(1))
    paired = eps[ExactOTCoupling()(x, eps)]
    replay = flow_matching_loss(net, x, paired, path, IndependentCoupling(), UniformTime(),
                                generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loss, replay)


def test_class_conditional_loss_pairs_within_classes_and_trains_the_label_embedding():
    torch.manual_seed(0)
    net = UNetVelocity(1, base_channels=8, levels=1, num_classes=2)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    x = torch.rand(6, 1, 4, 4) + labels[:, None, None, None]  # the classes differ in brightness
    eps = torch.randn(6, 1, 4, 4) + 2.0 * labels[:, None, None, None]  # a class-conditional source
    loss = flow_matching_loss(net, x, eps, IndependentCFMPath(), ExactOTCoupling(),
                              generator=torch.Generator().manual_seed(0), labels=labels, cond=labels)
    loss.backward()
    assert torch.isfinite(loss) and net.label_emb.weight.grad.abs().sum() > 0


def test_loss_rejects_noise_of_another_shape():
    with pytest.raises(ValueError, match="differ"):
        flow_matching_loss(ConcatSquashMLP(2), torch.randn(4, 2), torch.randn(4, 3), IndependentCFMPath())


MEAN, SCALE = torch.tensor([1.5, -1.0]), 0.5


def _data_log_density(x):
    return (-0.5 * ((x - MEAN) / SCALE) ** 2 - math.log(SCALE) - 0.5 * math.log(2 * math.pi)).sum(1)


@pytest.mark.parametrize("coupling,steps,batch", [(IndependentCoupling(), 400, 256), (ExactOTCoupling(), 300, 64)],
                         ids=["cfm", "ot-cfm"])
def test_flow_matching_trains_gaussian_to_gaussian_to_the_data_density(coupling, steps, batch):
    """Data N(m, s^2 I) in 2-D: the trained CNF's NLL on test points (exact trace, by the engine)
    exceeds the data's own NLL on the same points by their KL divergence, a few hundredths of a
    nat (the untrained network: 2-3 nats)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = ConcatSquashMLP(2, (32, 32))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    path = IndependentCFMPath()
    for _ in range(steps):
        x = MEAN + SCALE * torch.randn(batch, 2, generator=g)
        loss = flow_matching_loss(net, x, torch.randn(batch, 2, generator=g), path, coupling, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    test = MEAN + SCALE * torch.randn(1000, 2, generator=g)
    gap = (_data_log_density(test) - log_prob(net, test).log_prob).mean().item()
    assert -0.01 < gap < 0.08
