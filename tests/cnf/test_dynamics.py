"""The dynamics networks' fused exact trace (fastcnf.cnf.dynamics, ``ConcatSquashMLP.trace_forward``):
values, first and second derivatives equal the autograd reference, and so do a CNF's parameter
gradients under every way of back-propagating (including two solves before one adjoint backward)."""
from __future__ import annotations

import pytest
import torch

from fastcnf.cnf import CNFBlock, ConcatSquashConvNet, ConcatSquashMLP, ExactTrace, FixedEndTime
from fastcnf.flows import SequentialFlow
from fastcnf.models import FlowModel
from fastcnf.ode import SolverConfig

DTYPE = torch.float64


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
    block = CNFBlock(net, ExactTrace(), SolverConfig(atol=1e-8, rtol=1e-8, gradient="adjoint" if adjoint else "auto"),
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
    fused = _block_grads(True, losses, **mode)
    reference = _block_grads(False, losses, **mode)
    assert len(fused) == len(reference) > 0
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_per_example_times_equal_one_call_per_example(kind):
    """Flow-matching batches evaluate each example at its own time in one call: row i equals the
    network called on example i alone at time t_i."""
    torch.manual_seed(0)
    if kind == "mlp":
        net, x = ConcatSquashMLP(3, (8, 8)).double(), torch.randn(5, 3, dtype=torch.float64)
    else:
        net, x = ConcatSquashConvNet(2, (4,)).double(), torch.randn(5, 2, 4, 4, dtype=torch.float64)
    t = torch.rand(5, dtype=torch.float64)
    batched = net(t, x)
    rows = torch.cat([net(t[i], x[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(batched, rows, rtol=1e-12, atol=1e-12)
