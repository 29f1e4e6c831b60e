"""The lean dopri5/bosh3 solvers (fastcnf.ode.fast_solvers) take torchdiffeq's steps (same NFE) and
return its solutions and gradients. (The fused exact trace is tested in tests/cnf/test_dynamics.py.)"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchdiffeq import odeint

from fastcnf.cnf import CNFBlock, ConcatSquashMLP, ExactTrace
from fastcnf.ode import NFECounter, SolverConfig, solve
from fastcnf.ode.fast_solvers import LEAN_METHODS

DTYPE = torch.float64


class _Field(nn.Module):
    """A smooth non-linear, time-dependent field on a tuple state (z, s): dz = tanh(z A + t), ds = |z|^2."""

    def __init__(self, dim: int = 3, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Parameter(torch.randn(dim, dim, generator=g, dtype=DTYPE))
        self.calls = 0

    def forward(self, t, state):
        self.calls += 1
        z, _ = state
        return torch.tanh(z @ self.a + t), z.pow(2).sum(1)


def _solve(field, y0, t, method, backend, tol):
    counter = NFECounter()
    out = solve(field, y0, t, SolverConfig(method=method, atol=tol, rtol=tol, backend=backend), counter)
    return out, counter


@pytest.mark.parametrize("method", list(LEAN_METHODS))
@pytest.mark.parametrize("times", [[0.0, 1.0], [1.0, -0.5], [0.0, 0.2, 0.9, 1.5]], ids=["forward", "reversed", "many"])
def test_lean_solver_takes_torchdiffeqs_steps_and_returns_its_solution(method, times):
    field = _Field()
    z0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    y0 = (z0, torch.zeros(5, dtype=DTYPE))
    t = torch.tensor(times, dtype=DTYPE)
    lean, c_lean = _solve(field, y0, t, method, "fastcnf", 1e-8)
    field.calls = 0
    ref = odeint(field, y0, t, method=method, atol=1e-8, rtol=1e-8)
    assert c_lean.forward == field.calls  # the same number of steps, accepted and rejected
    for a, b in zip(lean, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_lean_solver_matches_torchdiffeq_in_float32_at_ffjord_tolerance():
    torch.manual_seed(0)
    net = ConcatSquashMLP(2, (32, 32))
    make = lambda backend: CNFBlock(net, ExactTrace(), SolverConfig(atol=1e-5, rtol=1e-5, backend=backend),
                                    end_time=0.5)
    x = torch.randn(64, 2)
    with torch.no_grad():
        fast, ref = make("fastcnf"), make("torchdiffeq")
        (z1, l1), (z2, l2) = fast(x), ref(x)
    assert fast.nfe.forward == ref.nfe.forward
    torch.testing.assert_close(z1, z2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", list(LEAN_METHODS))
def test_lean_solver_gradients_equal_torchdiffeqs(method):
    field = _Field(seed=2)
    z0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(3), dtype=DTYPE).requires_grad_(True)
    t = torch.tensor([0.0, 0.8], dtype=DTYPE)
    grads = []
    for backend in ("fastcnf", "torchdiffeq"):
        z, s = _solve(field, (z0, torch.zeros(4, dtype=DTYPE)), t, method, backend, 1e-10)[0]
        loss = (z[-1] ** 3).sum() + s[-1].sum()
        grads.append(torch.autograd.grad(loss, (field.a, z0)))
    # torchdiffeq also differentiates through its choice of the first step (an O(tolerance) term)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_lean_solver_counts_the_evaluations_its_solution_depends_on_as_backward():
    hooks = []
    field = _Field(seed=4)

    def forward(t, state):
        out = _Field.forward(field, t, state)
        out[0].register_hook(lambda g: hooks.append(1))
        return out

    field.forward = forward
    z0 = torch.randn(6, 3, generator=torch.Generator().manual_seed(5), dtype=DTYPE).requires_grad_(True)
    (z, s), counter = _solve(field, (z0, torch.zeros(6, dtype=DTYPE)), torch.tensor([0.0, 1.0], dtype=DTYPE),
                             "dopri5", "fastcnf", 1e-7)
    assert counter.backward == 0
    (z[-1].sum() + s[-1].sum()).backward()
    assert counter.backward == len(hooks) > 6
    assert counter.backward < counter.forward  # the initial-step probe and rejected steps are not in the graph


def test_lean_solver_raises_on_a_non_finite_state():
    class Blowup(nn.Module):
        def forward(self, t, z):
            return z * float("nan")

    with pytest.raises(FloatingPointError, match="non-finite"):
        solve(Blowup(), torch.ones(3, dtype=DTYPE), torch.tensor([0.0, 1.0], dtype=DTYPE), SolverConfig(), NFECounter())
