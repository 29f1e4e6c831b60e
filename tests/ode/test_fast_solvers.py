"""The speed work of issue 8: the lean dopri5/bosh3 solvers and the fused exact trace.

The lean solvers must take torchdiffeq's steps (same NFE) and return its solutions and
gradients; the fused trace of the concat-squash MLP must equal the autograd reference in value,
first and second derivatives, however the backward passes are arranged.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchdiffeq import odeint

from fastcnf.cnf import CNFBlock, ConcatSquashMLP, ExactTrace, FixedEndTime
from fastcnf.flows import SequentialFlow
from fastcnf.models import FlowModel
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


def test_solver_backend_is_validated():
    assert SolverConfig().backend == "fastcnf"
    with pytest.raises(ValueError, match="unknown solver backend 'scipy'"):
        SolverConfig(backend="scipy")


# ---- the fused exact trace -------------------------------------------------------------------------


def _mlp(dim, hidden, activation, seed=0, scale=1.7):
    torch.manual_seed(seed)
    net = ConcatSquashMLP(dim, hidden, activation=activation).to(DTYPE)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return net


@pytest.mark.parametrize("activation", ["tanh", "softplus", "relu", "elu", "swish"])
@pytest.mark.parametrize("dim,hidden", [(2, (16, 16, 16)), (3, (8,)), (1, (6, 5))])
def test_fused_trace_equals_the_autograd_reference_with_first_and_second_derivatives(activation, dim, hidden):
    net = _mlp(dim, hidden, activation)
    z = torch.randn(9, dim, dtype=DTYPE, requires_grad=True)
    t = torch.tensor(0.37, dtype=DTYPE, requires_grad=True)
    params = list(net.parameters())
    g_f, g_tr = torch.randn(9, dim, dtype=DTYPE), torch.randn(9, dtype=DTYPE)
    results = []
    for fn in (net.trace_forward, net._trace_forward_autograd):
        f, tr = fn(t, z)
        first = torch.autograd.grad((f, tr), [t, z, *params], (g_f, g_tr), create_graph=True)
        # a second derivative through the vector-Jacobian product in z (Jacobian-Frobenius regulariser)
        second = torch.autograd.grad((first[1] * z.detach()).sum(), [t, *params], allow_unused=True)
        results.append((f, tr, first, second))
    (f1, tr1, d1, s1), (f2, tr2, d2, s2) = results
    torch.testing.assert_close(f1, f2)
    torch.testing.assert_close(tr1, tr2)
    for a, b in zip(d1, d2):
        torch.testing.assert_close(a, b)
    for a, b in zip(s1, s2):
        if a is None or b is None:
            assert (a is None or a.abs().max() == 0) and (b is None or b.abs().max() == 0)
        else:
            torch.testing.assert_close(a, b)


def _block_grads(fused: bool, losses, adjoint=False, learnable=False):
    net = _mlp(2, (16, 16), "tanh", scale=1.5)
    if not fused:
        net.trace_forward = net._trace_forward_autograd
    block = CNFBlock(net, ExactTrace(), SolverConfig(atol=1e-8, rtol=1e-8, adjoint=adjoint),
                     end_time=FixedEndTime(0.7, learnable=learnable)).to(DTYPE)
    model = FlowModel(SequentialFlow([block], (2,))).to(DTYPE)
    losses(model)
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _x(seed=7):
    return torch.randn(7, 2, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def _train_loss(model):
    (-model.log_prob(_x()).mean()).backward()


def _partial_then_full(model):
    x = _x().requires_grad_(True)
    torch.autograd.grad(model.log_prob(x).sum(), x)  # reaches the evaluations but not the parameters
    _train_loss(model)


def _accumulate(model):
    _train_loss(model)
    (-model.log_prob(_x(8)).mean()).backward()


def _retained_graph_twice(model):
    loss = -model.log_prob(_x()).mean()
    loss.backward(retain_graph=True)
    loss.backward()


def _two_solves(model):
    z, logdet = model(_x())
    x_back = model.decode(z * 0.9)
    (z.pow(2).sum() - logdet.sum() + x_back.sum()).backward()


@pytest.mark.parametrize("losses", [_train_loss, _partial_then_full, _accumulate, _retained_graph_twice, _two_solves],
                         ids=["one-backward", "partial-then-full", "accumulation", "retained-graph", "two-solves"])
@pytest.mark.parametrize("mode", [dict(), dict(adjoint=True), dict(learnable=True)], ids=["direct", "adjoint", "learned-T"])
def test_fused_trace_parameter_gradients_equal_the_reference_in_a_cnf(losses, mode):
    if losses is _two_solves and mode.get("adjoint"):
        pytest.skip("the block's adjoint backward reads its latest solve's settings (reported separately)")
    fused = _block_grads(True, losses, **mode)
    reference = _block_grads(False, losses, **mode)
    assert len(fused) == len(reference) > 0
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
