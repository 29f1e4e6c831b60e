"""The fused solve (one autograd node, hand-written discrete adjoint) against the unfused path."""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from fastcnf.cnf import CNFBlock, ConcatSquashMLP, ExactTrace
from fastcnf.endtime.policy import LearnedEndTime
from fastcnf.cnf.fused import fused_applicable
from fastcnf.ode import SolverBudgetExceeded, SolverConfig

D = torch.float64


def _pair(method: str, learn_t: bool, hidden=(16, 16), dim=2, atol=1e-7):
    torch.manual_seed(3)
    end = LearnedEndTime(0.7) if learn_t else 0.7
    fused = CNFBlock(ConcatSquashMLP(dim, hidden, "tanh"), ExactTrace(), SolverConfig(method=method, atol=atol,
                                                                                       rtol=atol),
                     end_time=end).to(D)
    plain = copy.deepcopy(fused)
    plain.solver = replace(plain.solver, gradient="direct")
    return fused, plain


def _grads(block, x, weights):
    x = x.detach().clone().requires_grad_(True)
    z, logdet = block(x)
    loss = (z * weights[0]).sum() + (logdet * weights[1]).sum()
    loss.backward()
    return z.detach(), logdet.detach(), x.grad, [p.grad.clone() for p in block.parameters() if p.requires_grad]


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
@pytest.mark.parametrize("learn_t", [False, True])
@pytest.mark.parametrize("dim", [1, 3])
def test_fused_equals_unfused_solution_nfe_and_gradients(method, learn_t, dim):
    fused, plain = _pair(method, learn_t, dim=dim)
    assert fused_applicable(fused, fused.solver, (torch.zeros(2, dim, dtype=D), torch.zeros(2, dtype=D)), True)
    x = torch.randn(9, dim, dtype=D)
    w = (torch.randn(9, dim, dtype=D), torch.randn(9, dtype=D))
    a, b = _grads(fused, x, w), _grads(plain, x, w)
    assert fused.nfe.record() == plain.nfe.record()
    for u, v in zip(a[:3], b[:3]):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)
    for u, v in zip(a[3], b[3]):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-12)


def test_fused_inverse_with_logdet_matches_unfused():
    fused, plain = _pair("dopri5", True)
    z = torch.randn(6, 2, dtype=D, requires_grad=True)
    outs = []
    for block in (fused, plain):
        x, logdet = block.inverse(z, with_logdet=True)
        outs.append((x, logdet, *torch.autograd.grad(x.square().sum() + logdet.sum(), [z, block.end_time_policy.end_time])))
    for u, v in zip(*outs):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)


def test_fused_gradient_matches_finite_differences():
    """dL/dT and dL/dW of the fused solve against central differences of the solved loss."""
    fused, _ = _pair("dopri5", True, hidden=(8,), atol=1e-10)
    x = torch.randn(5, 2, dtype=D)

    def loss():
        z, logdet = fused(x)
        return (z.square().sum() - logdet.sum())

    fused.zero_grad()
    loss().backward()
    weight = fused.net.layers[0].layer.weight
    raw = fused.end_time_policy.end_time
    for param, index in ((weight, (3, 1)), (raw, ())):
        analytic = param.grad[index].item()
        eps = 1e-6
        with torch.no_grad():
            param[index] += eps
            up = loss().item()
            param[index] -= 2 * eps
            down = loss().item()
            param[index] += eps
        assert abs((up - down) / (2 * eps) - analytic) < 1e-5 * max(1.0, abs(analytic))


def test_fused_refuses_double_backward_and_unfused_allows_it():
    fused, plain = _pair("dopri5", False)
    x = torch.randn(4, 2, dtype=D, requires_grad=True)
    _, logdet = fused(x)
    with pytest.raises(RuntimeError, match="solver.gradient=direct"):
        g = torch.autograd.grad(logdet.sum(), x, create_graph=True)[0]
        g.sum().backward()
    _, logdet = plain(x)
    g = torch.autograd.grad(logdet.sum(), x, create_graph=True)[0]
    g.sum().backward()
    assert x.grad is not None


def test_fused_nfe_cap_names_the_block():
    fused, _ = _pair("dopri5", False)
    fused.solver = replace(fused.solver, max_nfe=5)
    with pytest.raises(SolverBudgetExceeded, match="cnf: forward solve exceeded max_nfe=5"):
        fused(torch.randn(4, 2, dtype=D))


def test_fused_not_used_where_it_does_not_apply():
    fused, _ = _pair("dopri5", False)
    state = (torch.zeros(2, 2, dtype=D), torch.zeros(2, dtype=D))
    assert not fused_applicable(fused, replace(fused.solver, backend="torchdiffeq"), state, True)
    assert not fused_applicable(fused, replace(fused.solver, method="rk4"), state, True)
    assert not fused_applicable(fused, fused.solver, state, False)  # sampling without the log-density
    assert not fused_applicable(fused, fused.solver, (*state, state[1]), True)  # regulariser states
