"""The CNF block (issue 3, items 1 and 3): change of variables, inversion, end time, gradients,
and the regularisers integrated as extra states.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchdiffeq import odeint

from fastcnf.cnf import (CNFBlock, ConcatSquashMLP, ExactTrace, FixedEndTime, Hutchinson,
                         JacobianFrobenius, KineticEnergy)
from fastcnf.flows import SequentialFlow
from fastcnf.models import FlowModel
from fastcnf.ode import SolverConfig
from fastcnf.priors import standard_normal_logprob

DTYPE = torch.float64
TIGHT = SolverConfig(atol=1e-10, rtol=1e-10)


def _net(dim: int, scale: float = 2.0, seed: int = 0, activation: str = "tanh") -> ConcatSquashMLP:
    """A random concat-squash MLP with larger weights than the default init, so that the flow
    moves the density well away from the prior."""
    torch.manual_seed(seed)
    net = ConcatSquashMLP(dim, (16, 16), activation=activation).to(DTYPE)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return net


def _model(block: CNFBlock, dim: int) -> FlowModel:
    return FlowModel(SequentialFlow([block], (dim,))).to(DTYPE)


class _Zero(nn.Module):
    def forward(self, t, z):
        return torch.zeros_like(z)


class _Linear(nn.Module):
    """f(t, z) = A z: z(T) = exp(T A) z(0) and log-det = T tr(A)."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, t, z):
        return z @ self.a.T


# ---- the change of variables -------------------------------------------------------------------


def test_density_integrates_to_one_in_1d():
    model = _model(CNFBlock(_net(1, scale=3.0), ExactTrace(), SolverConfig(atol=1e-8, rtol=1e-8),
                            end_time=1.0), 1).eval()
    grid = torch.linspace(-12.0, 12.0, 2401, dtype=DTYPE).unsqueeze(1)
    with torch.no_grad():
        log_p = model.log_prob(grid)
    mass = torch.trapezoid(log_p.exp(), grid[:, 0])
    assert abs(mass.item() - 1.0) < 1e-3
    # the flow is far from the identity: the density is not the prior's
    assert (log_p - standard_normal_logprob(grid)).abs().max() > 1.0


def test_density_integrates_to_one_in_2d():
    model = _model(CNFBlock(_net(2, scale=2.0), ExactTrace(), SolverConfig(atol=1e-6, rtol=1e-6),
                            end_time=1.0), 2).eval()
    axis = torch.linspace(-8.0, 8.0, 81, dtype=DTYPE)
    grid = torch.cartesian_prod(axis, axis)
    with torch.no_grad():
        log_p = model.log_prob(grid)
    density = log_p.exp().reshape(81, 81)
    mass = torch.trapezoid(torch.trapezoid(density, axis, dim=1), axis)
    assert abs(mass.item() - 1.0) < 1e-2
    assert (log_p - standard_normal_logprob(grid)).abs().max() > 1.0
    # the grid holds the mass: the density vanishes on its border
    border = torch.cat([density[0], density[-1], density[:, 0], density[:, -1]])
    assert border.max() < 1e-8


@pytest.mark.parametrize("estimator", [ExactTrace(), Hutchinson("rademacher")], ids=["exact", "hutchinson"])
def test_encode_then_decode_returns_the_input_in_2d(estimator):
    model = _model(CNFBlock(_net(2, scale=2.0), estimator, TIGHT, end_time=1.0), 2).eval()
    x = torch.randn(16, 2, dtype=DTYPE) * 2
    with torch.no_grad():
        z = model.encode(x)
        x_back = model.decode(z)
    assert (z - x).abs().max() > 0.1  # the map is not the identity
    assert (x_back - x).abs().max() < 1e-4


def test_inverse_with_logdet_returns_the_forward_logdet():
    block = CNFBlock(_net(2), ExactTrace(), TIGHT, end_time=0.8)
    x = torch.randn(8, 2, dtype=DTYPE)
    with torch.no_grad():
        z, logdet = block(x)
        x_back, logdet_back = block.inverse(z, with_logdet=True)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-7)
    torch.testing.assert_close(logdet_back, logdet, rtol=0, atol=1e-7)
    assert logdet.abs().min() > 1e-2


def test_zero_dynamics_log_prob_equals_the_prior():
    model = _model(CNFBlock(_Zero(), ExactTrace(), end_time=1.3), 3)
    x = torch.randn(10, 3, dtype=DTYPE)
    z, logdet = model(x)
    torch.testing.assert_close(z, x, rtol=0, atol=1e-13)
    torch.testing.assert_close(logdet, torch.zeros(10, dtype=DTYPE), rtol=0, atol=0)
    torch.testing.assert_close(model.log_prob(x), standard_normal_logprob(x), rtol=0, atol=1e-14)


@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_linear_dynamics_logdet_equals_end_time_times_trace(mode):
    torch.manual_seed(1)
    a = torch.randn(3, 3, dtype=DTYPE)
    end_time = 0.7
    block = CNFBlock(_Linear(a), ExactTrace(mode), TIGHT, end_time=end_time).to(DTYPE)
    x = torch.randn(5, 3, dtype=DTYPE)
    z, logdet = block(x)
    torch.testing.assert_close(logdet, torch.full((5,), end_time * torch.trace(a).item(), dtype=DTYPE),
                               rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(z, x @ torch.linalg.matrix_exp(end_time * a).T, rtol=1e-8, atol=1e-8)


def test_linear_dynamics_log_prob_derivative_in_end_time_equals_analytic():
    # log p(x) = log N(exp(TA) x) + T tr(A)  =>  d/dT = -(exp(TA) x)^T A exp(TA) x + tr(A)
    torch.manual_seed(2)
    a = 0.5 * torch.randn(2, 2, dtype=DTYPE)
    block = CNFBlock(_Linear(a), ExactTrace(), TIGHT, end_time=FixedEndTime(0.9, learnable=True)).to(DTYPE)
    model = _model(block, 2)
    x = torch.randn(4, 2, dtype=DTYPE)
    (grad_t,) = torch.autograd.grad(model.log_prob(x).sum(), block.end_time_policy.end_time)
    zt = x @ torch.linalg.matrix_exp(0.9 * a).T
    expected = (-(zt * (zt @ a.T)).sum(1) + torch.trace(a)).sum()
    torch.testing.assert_close(grad_t, expected, rtol=1e-8, atol=1e-10)


# ---- gradients -------------------------------------------------------------------------------------


def _loss_and_grads(adjoint: bool, estimator_factory, regularizers=(), learnable=True):
    torch.manual_seed(0)
    net = _net(2, scale=1.5, activation="softplus")
    solver = SolverConfig(atol=1e-10, rtol=1e-10, adjoint=adjoint)
    block = CNFBlock(net, estimator_factory(), solver, end_time=FixedEndTime(0.6, learnable=learnable),
                     regularizers=[r() for r in regularizers]).to(DTYPE)
    model = _model(block, 2)
    x = (torch.randn(6, 2, generator=torch.Generator().manual_seed(5), dtype=DTYPE)).requires_grad_(True)
    loss = -model.log_prob(x).mean() + model.regularization_loss()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params + [x])
    return loss.detach(), grads, params


ESTIMATORS = {
    "exact-network": lambda: ExactTrace("auto"),
    "exact-vmap": lambda: ExactTrace("vmap"),
    "hutchinson": lambda: Hutchinson("rademacher", generator=torch.Generator().manual_seed(11)),
}


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_adjoint_gradients_equal_direct_backpropagation(estimator):
    regs = (lambda: KineticEnergy(0.3), lambda: JacobianFrobenius(0.2)) if estimator == "hutchinson" else ()
    loss_d, grads_d, params = _loss_and_grads(False, ESTIMATORS[estimator], regs)
    loss_a, grads_a, _ = _loss_and_grads(True, ESTIMATORS[estimator], regs)
    torch.testing.assert_close(loss_a, loss_d, rtol=1e-10, atol=0)
    assert params[-1].ndim == 0  # the learnable end time is among the parameters
    for ga, gd in zip(grads_a, grads_d):
        assert (ga - gd).norm() <= 1e-4 * gd.norm() + 1e-12, ((ga - gd).norm().item(), gd.norm().item())
    assert grads_d[-2].abs() > 1e-3  # dL/dT is not trivially zero


def test_end_time_receives_gradients_only_when_learnable():
    _, grads, params = _loss_and_grads(False, ESTIMATORS["exact-network"], learnable=False)
    assert all(p.ndim > 0 for p in params)  # a fixed T is not trained
    block = CNFBlock(_net(2), end_time=FixedEndTime(0.5, learnable=True))
    assert block.end_time.requires_grad and float(block.end_time.detach()) == 0.5


@pytest.mark.parametrize("adjoint", [False, True], ids=["direct", "adjoint"])
def test_log_prob_derivative_in_end_time_matches_finite_difference(adjoint):
    net = _net(2, scale=2.0)
    policy = FixedEndTime(0.7, learnable=True)
    block = CNFBlock(net, ExactTrace(), SolverConfig(atol=1e-11, rtol=1e-11, adjoint=adjoint), end_time=policy)
    model = _model(block, 2)
    x = torch.randn(5, 2, dtype=DTYPE)
    (grad_t,) = torch.autograd.grad(model.log_prob(x).sum(), policy.end_time)
    h = 1e-4
    with torch.no_grad():
        values = []
        for dt in (h, -h):
            policy.end_time.fill_(0.7 + dt)
            values.append(model.log_prob(x).sum())
        policy.end_time.fill_(0.7)
    finite_difference = (values[0] - values[1]) / (2 * h)
    torch.testing.assert_close(grad_t, finite_difference, rtol=1e-6, atol=1e-8)
    assert grad_t.abs() > 1e-2


@pytest.mark.parametrize("t0", [0.0, -0.5, float("nan"), float("inf")])
def test_non_positive_end_time_is_rejected(t0):
    with pytest.raises(ValueError, match=r"end time T0 must be positive and finite, got"):
        FixedEndTime(t0)
    with pytest.raises(ValueError, match=r"end time T0 must be positive and finite, got"):
        CNFBlock(ConcatSquashMLP(2, (4,)), end_time=t0)


def test_end_time_is_exactly_t0_after_a_change_of_dtype():
    policy = FixedEndTime(0.7)
    assert policy.end_time.dtype == torch.float32
    policy.to(DTYPE)
    assert policy.end_time.item() == 0.7  # not float32(0.7) = 0.699999988...
    learned = FixedEndTime(0.7, learnable=True)
    with torch.no_grad():
        learned.end_time.fill_(0.9)  # a trained value is converted, not reset
    learned.to(DTYPE)
    assert learned.end_time.item() == pytest.approx(0.9, abs=1e-7) and learned.end_time.requires_grad


# ---- regularisers ----------------------------------------------------------------------------------


def _trajectory(net, x, end_time, n_points):
    ts = torch.linspace(0.0, end_time, n_points, dtype=DTYPE)
    with torch.no_grad():
        zs = odeint(net, x, ts, atol=1e-11, rtol=1e-11, method="dopri5")
    return ts, zs


def _simpson(values: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """Composite Simpson rule over dim 0 (odd number of equally spaced points)."""
    n = values.shape[0]
    assert n % 2 == 1
    h = (ts[-1] - ts[0]) / (n - 1)
    w = torch.ones(n, dtype=values.dtype)
    w[1:-1:2] = 4
    w[2:-1:2] = 2
    return (h / 3) * torch.tensordot(w, values, dims=1)


def test_kinetic_energy_state_equals_quadrature_along_the_trajectory():
    net = _net(2, scale=2.0)
    end_time = 0.9
    block = CNFBlock(net, ExactTrace(), TIGHT, end_time=end_time, regularizers=[KineticEnergy(1.0)])
    x = torch.randn(6, 2, dtype=DTYPE)
    with torch.no_grad():
        block(x)
    ts, zs = _trajectory(net, x, end_time, 201)
    with torch.no_grad():
        speed2 = torch.stack([net(t, z).pow(2).sum(1) for t, z in zip(ts, zs)])
    torch.testing.assert_close(block.reg_states["kinetic"], _simpson(speed2, ts), rtol=1e-7, atol=0)


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
    ts, zs = _trajectory(net, x0, end_time, 101)
    frob2 = torch.stack([
        torch.autograd.functional.jacobian(lambda v: net(t, v.unsqueeze(0)).squeeze(0), z[0]).pow(2).sum()
        for t, z in zip(ts, zs)
    ])
    exact = _simpson(frob2, ts)
    stderr = draws.std() / math.sqrt(n)
    assert abs(draws.mean() - exact) < 3 * stderr, (draws.mean().item(), exact.item(), stderr.item())
    assert draws.std() > 1e-3


def test_regularisation_loss_is_the_weighted_mean_of_the_states():
    block = CNFBlock(_net(2), ExactTrace(), end_time=0.5, regularizers=[KineticEnergy(0.25), JacobianFrobenius(0.5)])
    model = _model(block, 2)
    with torch.no_grad():
        model(torch.randn(7, 2, dtype=DTYPE))
    states = model.regularization_states()
    expected = 0.25 * states["kinetic"].mean() + 0.5 * states["jacobian_frobenius"].mean()
    torch.testing.assert_close(model.regularization_loss(), expected)
    assert states["kinetic"].min() > 0


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
    return CNFBlock(net, ExactTrace(mode), SolverConfig(method="euler", step_size=1 / 6), end_time=0.5,
                    regularizers=[JacobianFrobenius(1.0)]).to(DTYPE)


def test_jacobian_frobenius_gradient_through_the_network_trace_equals_autograd():
    grads = {}
    for mode in ("vmap", "auto"):  # auto: the fused forward-mode trace of ConcatSquashMLP
        net = _net(2)
        block = _jacobian_frobenius_block(mode, net)
        assert block.divergence.uses_network_trace(net) == (mode == "auto")
        torch.manual_seed(0)  # the same Frobenius noise for both
        x = torch.randn(3, 2, dtype=DTYPE)
        model = _model(block, 2)
        model(x)
        loss = model.regularization_loss()
        grads[mode] = (loss.detach(), torch.autograd.grad(loss, list(net.parameters())))
    torch.testing.assert_close(grads["auto"][0], grads["vmap"][0], rtol=1e-12, atol=0)
    for ga, gv in zip(grads["auto"][1], grads["vmap"][1]):
        torch.testing.assert_close(ga, gv, rtol=1e-9, atol=1e-14)


def test_jacobian_frobenius_through_the_network_trace_differentiates_each_evaluation_once():
    torch.manual_seed(0)
    net = _CountingMLP(2, (16, 16)).to(DTYPE)
    block = _jacobian_frobenius_block("auto", net)
    block(torch.randn(3, 2, dtype=DTYPE))
    assert net.calls == 6
    assert net.backward_passes == 6  # one vector-Jacobian product per evaluation
