"""RNODE regularisers integrated as extra ODE states equal a direct quadrature along the solved
trajectory: int_0^T ||f||^2 dt and int_0^T ||e^T df/dz||^2 dt (fixed Hutchinson noise e)."""
from __future__ import annotations

import pytest
import torch
from torchdiffeq import odeint

from fastcnf.cnf import CNFBlock, ConcatSquashMLP, ExactTrace, Hutchinson
from fastcnf.cnf.endtime import LearnedEndTime, RandomEndTime
from fastcnf.cnf.regularizers import JacobianFrobenius, KineticEnergy
from fastcnf.ode.solve import SolverConfig


def _simpson(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    h = (t[-1] - t[0]) / (len(t) - 1)
    w = torch.ones(len(t), dtype=y.dtype)
    w[1:-1:2], w[2:-1:2] = 4, 2
    return (h / 3) * (w[:, None] * y).sum(0)


@pytest.mark.parametrize("divergence", [ExactTrace("vmap"), ExactTrace("auto"), Hutchinson("gaussian")],
                         ids=["exact-vmap", "exact-network-trace", "hutchinson"])
def test_regularizer_states_match_quadrature_along_trajectory(divergence):
    torch.manual_seed(0)
    net = ConcatSquashMLP(2, [16, 16], "tanh").double()
    T = 0.7
    block = CNFBlock(net, divergence, SolverConfig(atol=1e-10, rtol=1e-10), LearnedEndTime(T),
                     [KineticEnergy(0.1), JacobianFrobenius(0.2)]).double()
    x = torch.randn(6, 2, dtype=torch.float64)
    block(x)
    noise = block.odefunc.noise
    assert noise is not None
    ts = torch.linspace(0.0, T, 401, dtype=torch.float64)
    with torch.no_grad():
        traj = odeint(lambda t, z: net(t, z), x, ts, atol=1e-11, rtol=1e-11, method="dopri5")
    kin, jac = [], []
    for t, z in zip(ts, traj):
        z = z.clone().requires_grad_(True)
        f = net(t, z)
        kin.append(f.pow(2).sum(1).detach())
        (vjp,) = torch.autograd.grad(f, z, noise)
        jac.append(vjp.pow(2).sum(1))
    kin_q, jac_q = _simpson(torch.stack(kin), ts), _simpson(torch.stack(jac), ts)
    assert torch.allclose(block.reg_states["kinetic"], kin_q, rtol=1e-6)
    assert torch.allclose(block.reg_states["jacobian_frobenius"], jac_q, rtol=1e-6)
    # regularisation_loss-style weighting is what the trainer adds
    assert kin_q.min() > 0 and jac_q.min() > 0


def test_regularizers_compose_with_steer_and_integrate_to_the_sampled_T():
    torch.manual_seed(1)
    net = ConcatSquashMLP(2, [8], "tanh").double()
    policy = RandomEndTime(0.5, 0.3)
    block = CNFBlock(net, ExactTrace(), SolverConfig(atol=1e-10, rtol=1e-10), policy, [KineticEnergy(1.0)]).double()
    block.train()
    x = torch.randn(4, 2, dtype=torch.float64)
    block(x)
    T = policy.last_sample
    ts = torch.linspace(0.0, T, 201, dtype=torch.float64)
    with torch.no_grad():
        traj = odeint(lambda t, z: net(t, z), x, ts, atol=1e-11, rtol=1e-11)
        kin = torch.stack([net(t, z).pow(2).sum(1) for t, z in zip(ts, traj)])
    assert torch.allclose(block.reg_states["kinetic"], _simpson(kin, ts), rtol=1e-6)


def test_regularizer_gradient_reaches_learned_T():
    torch.manual_seed(2)
    net = ConcatSquashMLP(2, [8], "tanh").double()
    block = CNFBlock(net, ExactTrace(), SolverConfig(atol=1e-9, rtol=1e-9), LearnedEndTime(0.5),
                     [KineticEnergy(1.0)]).double()
    block(torch.randn(4, 2, dtype=torch.float64))
    block.reg_states["kinetic"].mean().backward()
    # d/dT int_0^T ||f||^2 dt > 0 contains the end-point rate ||f(z(T), T)||^2 > 0
    assert block.end_time.grad is not None and float(block.end_time.grad) != 0


def test_jacobian_regularizer_with_network_trace_trains_as_vmap():
    """exact_mode auto (the network's own trace) and vmap give the same loss and gradients with the
    Jacobian-Frobenius regulariser, whose rate differentiates f once more (create_graph)."""
    grads = []
    for mode in ("auto", "vmap"):
        torch.manual_seed(0)
        net = ConcatSquashMLP(2, [8, 8], "tanh").double()
        block = CNFBlock(net, ExactTrace(mode), SolverConfig(atol=1e-8, rtol=1e-8), LearnedEndTime(0.5),
                         [KineticEnergy(0.1), JacobianFrobenius(0.2)]).double()
        torch.manual_seed(1)
        z, logdet = block(torch.randn(5, 2, dtype=torch.float64))
        loss = z.pow(2).sum() - logdet.sum() + sum(v.sum() for v in block.reg_states.values())
        grads.append(torch.autograd.grad(loss, list(block.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


def test_mean_reduction_is_the_sum_divided_by_the_dimension():
    """``reduction="mean"`` (RNODE's code, bits/dim unit) integrates ||f||^2 / D and ||e^T J||^2 / D."""
    torch.manual_seed(2)
    D = 5
    net = ConcatSquashMLP(D, [8], "tanh").double()
    x = torch.randn(4, D, dtype=torch.float64)
    states = {}
    for reduction in ("sum", "mean"):
        torch.manual_seed(3)  # same Hutchinson noise for both
        block = CNFBlock(net, Hutchinson("gaussian"), SolverConfig(atol=1e-10, rtol=1e-10), LearnedEndTime(0.6),
                         [KineticEnergy(1.0, reduction), JacobianFrobenius(1.0, reduction)]).double()
        block(x)
        states[reduction] = block.reg_states
    for k in ("kinetic", "jacobian_frobenius"):
        assert torch.allclose(states["mean"][k] * D, states["sum"][k], rtol=1e-8)
    with pytest.raises(ValueError, match="reduction must be one of sum, mean"):
        KineticEnergy(1.0, "average")
