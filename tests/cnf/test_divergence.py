"""Divergence estimators (issue 3, item 2): exact trace modes and Hutchinson's estimator.

Every exact mode must equal the trace of a brute-force Jacobian (torch.autograd.functional.jacobian),
value and parameter gradients; Hutchinson's estimate must be unbiased with the variance theory predicts.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fastcnf.cnf import CNFBlock, ConcatSquashMLP, ExactTrace, Hutchinson
from fastcnf.cnf.divergence import DivergenceResult
from fastcnf.ode import SolverConfig

DTYPE = torch.float64


def _net(dim: int = 3, activation: str = "tanh", seed: int = 0, scale: float = 2.0) -> ConcatSquashMLP:
    torch.manual_seed(seed)
    net = ConcatSquashMLP(dim, (16, 16), activation=activation).to(DTYPE)
    with torch.no_grad():  # non-trivial Jacobian: larger weights than the default init
        for p in net.parameters():
            p.mul_(scale)
    return net


def _jacobians(net: nn.Module, t: torch.Tensor, z: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """Per-example Jacobians (B, D, D) of f(t, .) by brute force."""
    return torch.stack([
        torch.autograd.functional.jacobian(lambda v: net(t, v.unsqueeze(0)).squeeze(0), zi,
                                           create_graph=create_graph)
        for zi in z
    ])


def _bruteforce_trace(net, t, z, create_graph=False) -> torch.Tensor:
    return torch.diagonal(_jacobians(net, t, z, create_graph), dim1=1, dim2=2).sum(-1)


def _exact_divergence(mode: str, net, t, z) -> torch.Tensor:
    z = z.detach().requires_grad_(True)
    if mode == "network":
        return net.trace_forward(t, z)[1]
    f = net(t, z)
    return ExactTrace(mode)(f, z, None, net, t).div


EXACT_MODES = ["loop", "vmap", "network"]
ACTIVATIONS = ["tanh", "softplus", "elu", "swish"]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("mode", EXACT_MODES)
def test_exact_trace_equals_bruteforce_jacobian_trace(mode, activation):
    net = _net(activation=activation)
    t = torch.tensor(0.37, dtype=DTYPE)
    z = torch.randn(5, 3, dtype=DTYPE)
    expected = _bruteforce_trace(net, t, z)
    got = _exact_divergence(mode, net, t, z)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert expected.abs().min() > 1e-3  # the check is not vacuous


def test_network_forward_mode_also_returns_the_dynamics():
    net = _net()
    t = torch.tensor(0.6, dtype=DTYPE)
    z = torch.randn(4, 3, dtype=DTYPE)
    f, _ = net.trace_forward(t, z)
    torch.testing.assert_close(f, net(t, z), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", EXACT_MODES)
def test_exact_trace_parameter_gradients_equal_bruteforce(mode):
    net = _net(activation="softplus")
    t = torch.tensor(0.8, dtype=DTYPE)
    z = torch.randn(4, 3, dtype=DTYPE)
    weights = torch.linspace(0.5, 2.0, 4, dtype=DTYPE)  # a loss that weighs examples differently

    params = list(net.parameters())

    def grads(div):  # biases of the output layer do not reach the trace: their gradient is zero
        gs = torch.autograd.grad((div * weights).sum(), params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]

    expected = grads(_bruteforce_trace(net, t, z, create_graph=True))
    got = grads(_exact_divergence(mode, net, t, z))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)
    assert sum(e.abs().sum() for e in expected) > 1e-3


def test_exact_trace_gradient_wrt_input_equals_bruteforce():
    # the adjoint needs d tr(J) / dz; the three modes must agree with the brute-force one
    net = _net()
    t = torch.tensor(0.2, dtype=DTYPE)
    z0 = torch.randn(3, 3, dtype=DTYPE)
    z = z0.clone().requires_grad_(True)
    expected = torch.autograd.grad(_bruteforce_trace(net, t, z, create_graph=True).sum(), z)[0]
    for mode in EXACT_MODES:
        z = z0.clone().requires_grad_(True)
        if mode == "network":
            div = net.trace_forward(t, z)[1]
        else:
            div = ExactTrace(mode)(net(t, z), z, None).div
        got = torch.autograd.grad(div.sum(), z)[0]
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


def test_auto_mode_uses_network_trace_only_when_the_net_has_one():
    est = ExactTrace("auto")
    assert est.uses_network_trace(_net())
    assert not est.uses_network_trace(nn.Linear(3, 3))
    assert not ExactTrace("loop").uses_network_trace(_net())


class _NoDependence(nn.Module):
    """f(t, z) = c(t): no dependence on z at all (not even a graph)."""

    def forward(self, t, z):
        return torch.ones_like(z) * t


@pytest.mark.parametrize("estimator", [ExactTrace("loop"), ExactTrace("vmap"), Hutchinson("gaussian")])
def test_divergence_of_state_independent_dynamics_is_zero(estimator):
    z = torch.randn(4, 3, dtype=DTYPE, requires_grad=True)
    t = torch.tensor(0.5, dtype=DTYPE)
    f = _NoDependence()(t, z)
    noise = estimator.sample_noise(z)
    res = estimator(f, z, noise)
    torch.testing.assert_close(res.div, torch.zeros(4, dtype=DTYPE))


def _hutchinson_draws(noise: str, n: int, seed: int = 0):
    """n independent Hutchinson estimates of tr(J) at one point, and the exact J."""
    net = _net(dim=3, seed=1)
    t = torch.tensor(0.3, dtype=DTYPE)
    z0 = torch.randn(1, 3, dtype=DTYPE)
    jac = _jacobians(net, t, z0)[0]
    z = z0.repeat(n, 1).requires_grad_(True)  # each row gets its own noise draw
    est = Hutchinson(noise, generator=torch.Generator().manual_seed(seed))
    res = est(net(t, z), z, est.sample_noise(z))
    return res, jac


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_hutchinson_estimate_is_unbiased(noise):
    n = 20000
    res, jac = _hutchinson_draws(noise, n)
    draws = res.div.detach()
    exact = torch.trace(jac)
    stderr = draws.std() / n ** 0.5
    assert abs(draws.mean() - exact) < 3 * stderr, (draws.mean().item(), exact.item(), stderr.item())
    assert draws.std() > 1e-2  # the estimator is genuinely stochastic here


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_hutchinson_variance_matches_theory(noise):
    # Var[e^T J e] = 2 ||S||_F^2 (Gaussian), 2 ||S||_F^2 - 2 sum_i J_ii^2 (Rademacher), S = (J + J^T)/2
    n = 40000
    res, jac = _hutchinson_draws(noise, n, seed=3)
    sym = 0.5 * (jac + jac.T)
    var = 2 * sym.pow(2).sum()
    if noise == "rademacher":
        var = var - 2 * torch.diagonal(jac).pow(2).sum()
    torch.testing.assert_close(res.div.detach().var(), var, rtol=0.05, atol=0.0)


def test_hutchinson_noise_has_zero_mean_and_identity_covariance():
    z = torch.zeros(50000, 3, dtype=DTYPE)
    for noise in ("gaussian", "rademacher"):
        e = Hutchinson(noise, generator=torch.Generator().manual_seed(7)).sample_noise(z)
        assert e.dtype == DTYPE and e.shape == z.shape
        if noise == "rademacher":
            assert set(e.unique().tolist()) == {-1.0, 1.0}
        torch.testing.assert_close(e.mean(0), torch.zeros(3, dtype=DTYPE), atol=0.03, rtol=0)
        torch.testing.assert_close(e.T @ e / e.shape[0], torch.eye(3, dtype=DTYPE), atol=0.03, rtol=0)


def test_hutchinson_returns_the_vector_jacobian_product():
    net = _net()
    t = torch.tensor(0.1, dtype=DTYPE)
    z = torch.randn(4, 3, dtype=DTYPE, requires_grad=True)
    est = Hutchinson("gaussian")
    noise = est.sample_noise(z)
    res = est(net(t, z), z, noise)
    jac = _jacobians(net, t, z.detach())
    torch.testing.assert_close(res.eps_jac, torch.einsum("bi,bij->bj", noise, jac), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.div, torch.einsum("bi,bij,bj->b", noise, jac, noise), rtol=1e-10, atol=1e-12)


class _RecordingHutchinson(Hutchinson):
    def __init__(self):
        super().__init__("rademacher")
        self.seen: list[torch.Tensor] = []

    def __call__(self, f, z, noise, net=None, t=None, create_graph=True) -> DivergenceResult:
        self.seen.append(noise.detach().clone())
        return super().__call__(f, z, noise, net, t, create_graph)


def test_hutchinson_noise_is_drawn_once_per_solve():
    est = _RecordingHutchinson()
    block = CNFBlock(_net(), est, SolverConfig(atol=1e-6, rtol=1e-6), end_time=0.5).to(DTYPE)
    x = torch.randn(6, 3, dtype=DTYPE)
    block(x)
    first = est.seen
    assert len(first) > 5
    assert all(torch.equal(e, first[0]) for e in first)
    est.seen = []
    block(x)  # a new solve draws new noise
    assert all(torch.equal(e, est.seen[0]) for e in est.seen)
    assert not torch.equal(est.seen[0], first[0])


def test_unknown_noise_and_mode_names_list_the_accepted_ones():
    with pytest.raises(ValueError, match=r"unknown Hutchinson noise 'uniform'.*gaussian, rademacher"):
        Hutchinson(noise="uniform")
    with pytest.raises(ValueError, match=r"unknown exact-trace mode 'jvp'.*auto, loop, vmap"):
        ExactTrace("jvp")
    assert Hutchinson(noise="rademacher").noise == "rademacher"
