"""End-time policies (fastcnf.cnf.endtime): T0 checks, and dL/dT of TO-FLOW (Du et al. 2022, eq. 12-13): the end-state formula, autograd and finite differences agree,
and T receives a gradient in every learned variant (the FFJORD ``--train_T`` bug as regression)."""
from __future__ import annotations

import math

import pytest
import torch

from fastcnf.cnf import CNFBlock, ConcatSquashMLP, ExactTrace, Hutchinson
from fastcnf.cnf.endtime import FixedEndTime
from fastcnf.endtime.policy import LearnedEndTime, RandomEndTime, toflow_time_gradient
from fastcnf.ode.solve import SolverConfig

TIGHT = SolverConfig(method="dopri5", atol=1e-9, rtol=1e-9)


def _block(policy, solver=TIGHT, divergence=None, seed=0):
    torch.manual_seed(seed)
    net = ConcatSquashMLP(2, [16, 16], "tanh")
    return CNFBlock(net, divergence or ExactTrace(), solver, policy).double()


def _nll(z, logdet):
    log_normal = -0.5 * z.pow(2).sum(1) - z.shape[1] * 0.5 * math.log(2 * math.pi)
    return -(log_normal + logdet).mean()


def _x(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g, dtype=torch.float64) * 1.5


def test_eq12_13_matches_autograd_and_finite_difference():
    block = _block(LearnedEndTime(0.5))
    x = _x()
    z, logdet = block(x)
    loss = _nll(z, logdet)
    (autograd,) = torch.autograd.grad(loss, block.end_time)
    b = x.shape[0]
    # single block, standard normal prior: dL/dz(T) = z(T)/B, dL/dlogdet = -1/B (eq. 12-13)
    eq13 = toflow_time_gradient(block, z, z.detach() / b, torch.full((b,), -1.0 / b, dtype=z.dtype))
    h = 1e-4
    with torch.no_grad():
        losses = []
        for dT in (h, -h):
            block.end_time.fill_(0.5 + dT)
            losses.append(float(_nll(*block(x))))
        block.end_time.fill_(0.5)
    fd = (losses[0] - losses[1]) / (2 * h)
    assert abs(float(eq13) - fd) < 1e-6 * max(1.0, abs(fd))
    assert abs(float(autograd) - fd) < 1e-6 * max(1.0, abs(fd))
    assert abs(fd) > 1e-3  # a non-trivial derivative


def test_eq12_13_with_upstream_gradient_of_a_later_layer():
    # a block inside a flow: the loss reaches z(T) through a later map, dL/dz(T) is backpropagated
    block = _block(LearnedEndTime(0.8), seed=3)
    x = _x(16, seed=4)
    z, logdet = block(x)
    z.retain_grad()
    logdet.retain_grad()
    loss = _nll(torch.sin(z) * 2.0, logdet) + z.pow(3).mean()
    loss.backward()
    eq13 = toflow_time_gradient(block, z, z.grad, logdet.grad)
    assert torch.allclose(eq13, block.end_time.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("adjoint", [False, True])
@pytest.mark.parametrize("make_policy", [lambda: LearnedEndTime(0.5), lambda: FixedEndTime(0.5, learnable=True)],
                         ids=["toflow", "joint"])
def test_end_time_receives_gradient_direct_and_adjoint(adjoint, make_policy):
    # regression for FFJORD's --train_T: torch.tensor([0, T]) cut T out of the graph (grad None)
    solver = SolverConfig(method="dopri5", atol=1e-7, rtol=1e-7, gradient="adjoint" if adjoint else "auto")
    block = _block(make_policy(), solver=solver, divergence=Hutchinson("rademacher"))
    z, logdet = block(_x(8))
    _nll(z, logdet).backward()
    grad = block.end_time.grad
    assert grad is not None and torch.isfinite(grad) and abs(float(grad)) > 0


def test_adjoint_and_direct_give_the_same_time_gradient():
    grads = []
    for adjoint in (False, True):
        solver = SolverConfig(method="dopri5", atol=1e-9, rtol=1e-9, gradient="adjoint" if adjoint else "auto")
        block = _block(LearnedEndTime(0.5), solver=solver)
        _nll(*block(_x(8))).backward()
        grads.append(float(block.end_time.grad))
    assert abs(grads[0] - grads[1]) < 1e-5 * max(1.0, abs(grads[0]))


def test_steer_samples_in_training_and_evaluates_at_fixed_T():
    torch.manual_seed(0)
    policy = RandomEndTime(0.5, half_width=0.2).double()
    policy.train()
    samples = torch.stack([policy() for _ in range(400)]).detach()
    assert samples.min() >= 0.3 and samples.max() <= 0.7
    assert samples.std() > 0.08  # uniform on a width-0.4 interval: std 0.115
    policy.eval()
    assert all(float(policy()) == 0.5 for _ in range(5))
    # an evaluated STEER block equals the fixed-T block with the same network
    steer, fixed = _block(RandomEndTime(0.5, 0.2), seed=5), _block(FixedEndTime(0.5), seed=5)
    steer.eval(), fixed.eval()
    x = _x(8)
    with torch.no_grad():
        for a, b in zip(steer(x), fixed(x)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("t0", [0.0, -0.5, float("nan"), float("inf")])
def test_non_positive_end_time_is_rejected(t0):
    with pytest.raises(ValueError, match=r"end time T0 must be positive and finite, got"):
        FixedEndTime(t0)
    with pytest.raises(ValueError, match=r"end time T0 must be positive and finite, got"):
        CNFBlock(ConcatSquashMLP(2, (4,)), end_time=t0)


def test_end_time_is_exactly_t0_after_a_change_of_dtype():
    policy = FixedEndTime(0.7)
    assert policy.end_time.dtype == torch.float32
    policy.to(torch.float64)
    assert policy.end_time.item() == 0.7  # not float32(0.7) = 0.699999988...
    learned = FixedEndTime(0.7, learnable=True)
    with torch.no_grad():
        learned.end_time.fill_(0.9)  # a trained value is converted, not reset
    learned.to(torch.float64)
    assert learned.end_time.item() == pytest.approx(0.9, abs=1e-7) and learned.end_time.requires_grad
