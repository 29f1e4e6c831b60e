"""RNODE regularisers (Finlay et al. 2020, "How to train your neural ODE", eq. 3-4) integrated as extra
ODE states equal a direct quadrature along a trajectory from an independent torchdiffeq solve:
int_0^T ||f||^2 dt and int_0^T ||e^T df/dz||^2 dt (the solve's noise e); the Frobenius estimate is
unbiased for int_0^T ||df/dz||_F^2 dt; the network's own trace gives the same gradients as autograd."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchdiffeq import odeint

from fastcnf.cnf import CNFBlock, ConcatSquashMLP, ExactTrace, Hutchinson
from fastcnf.endtime.policy import LearnedEndTime, RandomEndTime
from fastcnf.cnf.regularizers import JacobianFrobenius, KineticEnergy
from fastcnf.ode.solve import SolverConfig
from reference_models import simpson, trajectory


DTYPE = torch.float64
TIGHT = SolverConfig(atol=1e-10, rtol=1e-10)


def _net(dim: int, scale: float = 2.0, seed: int = 0) -> ConcatSquashMLP:
    """A random concat-squash MLP with larger weights than the default init."""
    torch.manual_seed(seed)
    net = ConcatSquashMLP(dim, (16, 16), activation="tanh").to(DTYPE)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return net


@pytest.mark.parametrize("divergence", [ExactTrace("vmap"), ExactTrace("auto"), Hutchinson("gaussian")],
                         ids=["exact-vmap", "exact-network-trace", "hutchinson"])
def test_regularizer_states_match_quadrature_along_trajectory(divergence):
    torch.manual_seed(0)
    net = ConcatSquashMLP(2, [16, 16], "tanh").double()
    T = 0.7
    block = CNFBlock(net, divergence, SolverConfig(atol=1e-10, rtol=1e-10), LearnedEndTime(T),
                     [KineticEnergy(0.1), JacobianFrobenius(0.2)]).double()
    x = torch.randn(6, 2, dtype=torch.float64)
    torch.manual_seed(10)
    block(x)
    # the solve's noise is its first draw from the global generator: redraw it from the same seed
    torch.manual_seed(10)
    noise = divergence.sample_noise(x) if isinstance(divergence, Hutchinson) else torch.randn_like(x)
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
    kin_q, jac_q = simpson(torch.stack(kin), ts), simpson(torch.stack(jac), ts)
    assert torch.allclose(block.reg_states["kinetic"], kin_q, rtol=1e-6)
    assert torch.allclose(block.reg_states["jacobian_frobenius"], jac_q, rtol=1e-6)
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
    assert torch.allclose(block.reg_states["kinetic"], simpson(kin, ts), rtol=1e-6)


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


@pytest.mark.parametrize("estimator", [ExactTrace(), Hutchinson("gaussian")], ids=["exact", "hutchinson"])
def test_jacobian_frobenius_state_equals_its_definition_in_expectation(estimator):
    # every example draws its own noise: a batch of copies of one point samples the estimator
    torch.manual_seed(3)
    net = _net(2, scale=2.0)
    end_time = 0.5
    block = CNFBlock(net, estimator, SolverConfig(atol=1e-7, rtol=1e-7), end_time=end_time,
                     regularizers=[JacobianFrobenius(1.0)])
    n = 2000
    x0 = torch.randn(1, 2, dtype=DTYPE)
    with torch.no_grad():
        block(x0.repeat(n, 1))
    draws = block.reg_states["jacobian_frobenius"]
    ts, zs = trajectory(net, x0, end_time, 101)
    frob2 = torch.stack([
        torch.autograd.functional.jacobian(lambda v: net(t, v.unsqueeze(0)).squeeze(0), z[0]).pow(2).sum()
        for t, z in zip(ts, zs)
    ])
    exact = simpson(frob2, ts)
    stderr = draws.std() / math.sqrt(n)
    assert abs(draws.mean() - exact) < 3 * stderr, (draws.mean().item(), exact.item(), stderr.item())
    assert draws.std() > 1e-3


class _CountingMLP(ConcatSquashMLP):
    """Counts the evaluations of the fused network trace and the backward passes through each f."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0
        self.backward_passes = 0

    def _count(self, grad):
        self.backward_passes += 1

    def trace_forward(self, t, z):
        self.calls += 1
        f, trace = super().trace_forward(t, z)
        if f.requires_grad:
            f.register_hook(self._count)
        return f, trace

    def _trace_forward_autograd(self, t, z):  # what the block calls under the Jacobian regulariser
        self.calls += 1
        f, trace = super()._trace_forward_autograd(t, z)
        if f.requires_grad:
            f.register_hook(self._count)
        return f, trace


def _jacobian_frobenius_block(mode: str, net: nn.Module) -> CNFBlock:
    # euler with 6 steps: the cost of each evaluation's vector-Jacobian product stays small even
    # if it walked back through the whole solve
    return CNFBlock(net, ExactTrace(mode), SolverConfig(method="euler", step_size=1 / 6, gradient="direct"), end_time=0.5,
                    regularizers=[JacobianFrobenius(1.0)]).to(DTYPE)


def test_jacobian_frobenius_through_the_network_trace_differentiates_each_evaluation_once():
    torch.manual_seed(0)
    net = _CountingMLP(2, (16, 16)).to(DTYPE)
    block = _jacobian_frobenius_block("auto", net)
    block(torch.randn(3, 2, dtype=DTYPE))
    assert net.calls == 6
    assert net.backward_passes == 6  # one vector-Jacobian product per evaluation
