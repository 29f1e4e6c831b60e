"""The CNF block (issue 3, items 1 and 3): change of variables, inversion, end time, gradients,
and the regularisers integrated as extra states.
"""
from __future__ import annotations


import pytest
import torch

from fastcnf.cnf import CNFBlock, ConcatSquashMLP, ExactTrace, FixedEndTime, Hutchinson, JacobianFrobenius, KineticEnergy
from fastcnf.endtime.policy import RandomEndTime
from fastcnf.flows import SequentialFlow
from fastcnf.models import FlowModel
from fastcnf.ode import SolverConfig
from fastcnf.priors import standard_normal_logprob
from reference_models import LinearField, ZeroField, simpson, trajectory

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
    model = _model(CNFBlock(ZeroField(), ExactTrace(), end_time=1.3), 3)
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
    block = CNFBlock(LinearField(a), ExactTrace(mode), TIGHT, end_time=end_time).to(DTYPE)
    x = torch.randn(5, 3, dtype=DTYPE)
    z, logdet = block(x)
    torch.testing.assert_close(logdet, torch.full((5,), end_time * torch.trace(a).item(), dtype=DTYPE),
                               rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(z, x @ torch.linalg.matrix_exp(end_time * a).T, rtol=1e-8, atol=1e-8)


def test_linear_dynamics_log_prob_derivative_in_end_time_equals_analytic():
    # log p(x) = log N(exp(TA) x) + T tr(A)  =>  d/dT = -(exp(TA) x)^T A exp(TA) x + tr(A)
    torch.manual_seed(2)
    a = 0.5 * torch.randn(2, 2, dtype=DTYPE)
    block = CNFBlock(LinearField(a), ExactTrace(), TIGHT, end_time=FixedEndTime(0.9, learnable=True)).to(DTYPE)
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
    solver = SolverConfig(atol=1e-10, rtol=1e-10, gradient="adjoint" if adjoint else "auto")
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
    block = CNFBlock(net, ExactTrace(), SolverConfig(atol=1e-11, rtol=1e-11, gradient="adjoint" if adjoint else "auto"), end_time=policy)
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


# ---- regularisers ----------------------------------------------------------------------------------


def test_regularisation_loss_is_the_weighted_mean_of_the_quadrature_integrals():
    """The model's regularisation loss against an independent reference: a torchdiffeq solve of the
    trajectory, Simpson integrals of ||f||^2 and ||e^T df/dz||^2 (the solve's Frobenius noise e,
    redrawn from the same seed), then the weighted batch means."""
    net = _net(2)
    end_time = 0.5
    block = CNFBlock(net, ExactTrace(), TIGHT, end_time=end_time,
                     regularizers=[KineticEnergy(0.25), JacobianFrobenius(0.5)])
    model = _model(block, 2)
    x = torch.randn(7, 2, dtype=DTYPE)
    torch.manual_seed(4)
    model(x)
    torch.manual_seed(4)
    noise = torch.randn_like(x)  # the block's first draw: the Jacobian-Frobenius noise
    ts, zs = trajectory(net, x, end_time, 201)
    kinetic, frobenius = [], []
    for t, z in zip(ts, zs):
        z = z.clone().requires_grad_(True)
        f = net(t, z)
        (e_jac,) = torch.autograd.grad(f, z, noise)
        kinetic.append(f.detach().pow(2).sum(1))
        frobenius.append(e_jac.pow(2).sum(1))
    expected = 0.25 * simpson(torch.stack(kinetic), ts).mean() + 0.5 * simpson(torch.stack(frobenius), ts).mean()
    torch.testing.assert_close(model.regularization_loss(), expected, rtol=1e-7, atol=0)
    assert expected > 0
    # evaluation integrates no regulariser: the loss term is zero
    model.eval()
    with torch.no_grad():
        model(x)
    assert float(model.regularization_loss()) == 0.0




# ---- per-solve state -------------------------------------------------------------------------------


def _two_solve_grads(adjoint: bool, together: bool):
    """Gradients of L1(block(x1)) + L2(block(x2)) for a STEER block (a random end time per solve) with
    Hutchinson noise (drawn per solve): both solves before one backward (``together``), or each
    solve differentiated before the next one starts. Each solve's draws come from its own seed."""
    net = _net(2, scale=1.5)
    block = CNFBlock(net, Hutchinson("rademacher"), SolverConfig(atol=1e-10, rtol=1e-10, gradient="adjoint" if adjoint else "auto"),
                     end_time=RandomEndTime(0.6, half_width=0.3)).to(DTYPE)
    g = torch.Generator().manual_seed(5)
    x1 = torch.randn(5, 2, generator=g, dtype=DTYPE).requires_grad_(True)
    x2 = (2 * torch.randn(5, 2, generator=g, dtype=DTYPE)).requires_grad_(True)
    params = list(net.parameters())
    end_times = []

    def loss(x, seed, weight):
        torch.manual_seed(seed)
        z, logdet = block(x)
        end_times.append(float(block.end_time_policy.last_sample))
        return weight * (z.pow(2).sum() - logdet.sum())

    if together:
        total = loss(x1, 1, 1.0) + loss(x2, 2, 0.3)
        grads = torch.autograd.grad(total, params + [x1, x2])
        assert abs(end_times[0] - end_times[1]) > 1e-3  # the two solves have their own end time
        return list(grads[:-2]), grads[-2], grads[-1]
    g1 = torch.autograd.grad(loss(x1, 1, 1.0), params + [x1])
    g2 = torch.autograd.grad(loss(x2, 2, 0.3), params + [x2])
    return [a + b for a, b in zip(g1[:-1], g2[:-1])], g1[-1], g2[-1]


def test_two_adjoint_solves_before_backward_each_get_their_own_gradient():
    """A second forward solve of a block before the first one's adjoint backward (different end time,
    noise and input) must not change the first one's gradient: the right-hand side of each solve
    holds its own state. References: each solve differentiated on its own, and direct back-propagation."""
    together = _two_solve_grads(adjoint=True, together=True)
    separate = _two_solve_grads(adjoint=True, together=False)
    direct = _two_solve_grads(adjoint=False, together=True)
    for reference in (separate, direct):
        for a, b in zip(together[0], reference[0]):
            assert (a - b).norm() <= 1e-5 * b.norm() + 1e-10, ((a - b).norm().item(), b.norm().item())
        for a, b in zip(together[1:], reference[1:]):
            assert (a - b).norm() <= 1e-5 * b.norm() + 1e-10, ((a - b).norm().item(), b.norm().item())
