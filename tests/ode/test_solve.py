"""The solving layer (issue 3, item 1): solutions, NFE accounting per block and per pass, the NFE cap."""
from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from fastcnf.cnf import CNFBlock, ConcatSquashMLP, ExactTrace, Hutchinson
from fastcnf.flows import SequentialFlow
from fastcnf.models import FlowModel
from fastcnf.ode import NFECounter, SolverBudgetExceeded, SolverConfig, solve

DTYPE = torch.float64


class _Decay(nn.Module):
    """dy/dt = -k y, y(t) = y0 exp(-k t)."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.tensor(k, dtype=DTYPE))

    def forward(self, t, y):
        return -self.k * y


@pytest.mark.parametrize("method,kwargs,tol", [
    ("dopri5", dict(atol=1e-10, rtol=1e-10), 1e-8),
    # torchdiffeq's bosh3 reads the end point off a low-order interpolant: global error >> tolerance
    ("bosh3", dict(atol=1e-9, rtol=1e-9), 1e-5),
    ("rk4", dict(step_size=0.01), 1e-9),
    ("euler", dict(step_size=0.001), 2e-3),
])
@pytest.mark.parametrize("adjoint", [False, True], ids=["direct", "adjoint"])
def test_solve_integrates_exponential_decay_and_its_gradient(method, kwargs, tol, adjoint):
    func = _Decay(1.3)
    y0 = torch.tensor([1.0, -2.0], dtype=DTYPE, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=DTYPE)
    y1 = solve(func, y0, t, SolverConfig(method=method, gradient="adjoint" if adjoint else "direct", **kwargs), NFECounter())[-1]
    torch.testing.assert_close(y1, y0.detach() * math.exp(-1.3), rtol=tol, atol=0)
    # d y1 / d k = -t y0 exp(-k t), d y1 / d y0 = exp(-k t)
    gk, gy0 = torch.autograd.grad(y1.sum(), (func.k, y0))
    torch.testing.assert_close(gk, -(y0.detach().sum()) * math.exp(-1.3), rtol=tol, atol=0)
    torch.testing.assert_close(gy0, torch.full((2,), math.exp(-1.3), dtype=DTYPE), rtol=tol, atol=0)


class CountingNet(nn.Module):
    """Wraps a dynamics net; counts its evaluations and the backward passes through its output."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.calls = 0
        self.backward_calls = 0
        self.times: list[float] = []

    def _count_backward(self, grad):
        self.backward_calls += 1

    def forward(self, t, z):
        self.calls += 1
        self.times.append(float(t.detach()))
        out = self.net(t, z)
        if out.requires_grad:
            out.register_hook(self._count_backward)
        return out

    def reset(self) -> None:
        self.calls = 0
        self.backward_calls = 0
        self.times = []


def _counting_block(estimator=None, name="cnf", seed=0, **solver) -> tuple[CNFBlock, CountingNet]:
    torch.manual_seed(seed)
    net = CountingNet(ConcatSquashMLP(2, (16, 16)).to(DTYPE))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(2.0)
    cfg = dict(atol=1e-6, rtol=1e-6, gradient="direct")  # NFE == calls: no auto probe
    cfg.update(solver)
    block = CNFBlock(net, estimator or ExactTrace("vmap"), SolverConfig(**cfg), end_time=0.8, name=name)
    return block.to(DTYPE), net


def _loss(block, x):
    z, logdet = block(x)
    return (0.5 * z.pow(2).sum(1) - logdet).mean()


@pytest.mark.parametrize("estimator", [ExactTrace("vmap"), Hutchinson("gaussian")], ids=["exact", "hutchinson"])
def test_nfe_counts_equal_dynamics_calls_with_direct_backpropagation(estimator):
    block, net = _counting_block(estimator)
    x = torch.randn(5, 2, dtype=DTYPE)
    loss = _loss(block, x)
    assert block.nfe.forward == net.calls > 6
    assert block.nfe.backward == 0
    calls = net.calls
    net.backward_calls = 0  # the divergence's own vector-Jacobian products passed through the hook
    loss.backward()
    assert net.calls == calls  # direct back-propagation does not re-evaluate the dynamics
    assert block.nfe.backward == net.backward_calls > 6
    assert block.nfe.forward == calls


@pytest.mark.parametrize("estimator", [ExactTrace("vmap"), Hutchinson("rademacher")], ids=["exact", "hutchinson"])
def test_nfe_counts_equal_dynamics_calls_with_the_adjoint(estimator):
    block, net = _counting_block(estimator, gradient="adjoint")
    x = torch.randn(5, 2, dtype=DTYPE)
    loss = _loss(block, x)
    assert block.nfe.forward == net.calls > 6
    forward_calls = net.calls
    loss.backward()
    assert block.nfe.backward == net.calls - forward_calls > 6
    assert block.nfe.forward == forward_calls


def test_nfe_of_fixed_step_methods_is_steps_times_stages_whatever_the_end_time():
    for method, stages in (("rk4", 4), ("euler", 1), ("midpoint", 2)):
        for end_time in (0.3, 2.0):
            block, net = _counting_block(method=method, step_size=0.125)
            block.end_time_policy.end_time.data.fill_(end_time)
            with torch.no_grad():
                block(torch.randn(3, 2, dtype=DTYPE))
            assert block.nfe.forward == net.calls == 8 * stages, (method, end_time)


def test_nfe_running_mean_is_the_mean_over_solves():
    block, net = _counting_block()
    records = []
    for i, (batch, tol) in enumerate([(4, 1e-4), (6, 1e-7), (3, 1e-5)]):
        block.solver = SolverConfig(atol=tol, rtol=tol)
        loss = _loss(block, torch.randn(batch, 2, dtype=DTYPE) * (1 + i))
        if i < 2:  # the last solve has no backward pass
            loss.backward()
        records.append(block.nfe.record())
        n = len(records)
        assert block.nfe.mean_forward == pytest.approx(sum(r["forward"] for r in records) / n)
        assert block.nfe.mean_backward == pytest.approx(sum(r["backward"] for r in records) / n)
    assert len({r["forward"] for r in records}) > 1  # the solves differ, so the mean is informative
    block.nfe.reset()
    assert (block.nfe.mean_forward, block.nfe.mean_backward) == (0, 0)


def test_model_exposes_the_last_nfe_record_and_running_mean_per_block():
    b1, n1 = _counting_block(name="first", seed=1)
    b2, n2 = _counting_block(name="second", seed=2, gradient="adjoint")
    model = FlowModel(SequentialFlow([b1, b2], (2,))).to(DTYPE)
    history = []
    for _ in range(2):
        n1.reset(), n2.reset()
        loss = -model.log_prob(torch.randn(4, 2, dtype=DTYPE)).mean()
        n1.backward_calls = 0
        fwd2 = n2.calls
        loss.backward()
        record = model.nfe_record()
        assert record == {
            "first": {"forward": n1.calls, "backward": n1.backward_calls},
            "second": {"forward": fwd2, "backward": n2.calls - fwd2},
        }
        assert model.nfe_last() == (n1.calls + fwd2, n1.backward_calls + n2.calls - fwd2)
        history.append(record)
    mean = model.nfe_mean()
    for name in ("first", "second"):
        for phase in ("forward", "backward"):
            assert mean[name][phase] == pytest.approx((history[0][name][phase] + history[1][name][phase]) / 2)
    model.reset_nfe()
    assert model.nfe_mean()["first"]["forward"] == 0


_CAP_MESSAGE = re.compile(r"at time t=(?P<t>[-0-9.e+]+) .* last step size (?P<dt>[-0-9.e+naninf]+)")

# dopri5 (after two evaluations that choose the first step) evaluates the dynamics six times per
# attempted step [t0, t0 + h], at t0 + c h for c = 1/5, 3/10, 4/5, 8/9, 1, 1.
_DOPRI5_C = (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)


def _dopri5_steps(times: list[float]) -> list[tuple[float, float]]:
    """(t0, h) of every step attempted, read off the evaluation times of an uncapped solve."""
    steps = []
    for k in range(2, len(times) - 5, 6):
        stages = times[k:k + 6]
        h = (stages[4] - stages[0]) / (_DOPRI5_C[4] - _DOPRI5_C[0])
        t0 = stages[0] - _DOPRI5_C[0] * h
        assert stages == pytest.approx([t0 + c * h for c in _DOPRI5_C], abs=1e-12)
        steps.append((t0, h))
    return steps


def _capped_solve(adjoint: bool, backend: str = "fastcnf", max_nfe: int = 20):
    """The same solve twice: uncapped (recording its steps) and capped at ``max_nfe``."""
    x = torch.randn(4, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    free, free_net = _counting_block(name="scale0.cnf1", atol=1e-10, rtol=1e-10, backend=backend)
    with torch.no_grad():
        free(x)
    end_time = float(free.end_time.detach())
    steps = _dopri5_steps([t / end_time for t in free_net.times])
    block, net = _counting_block(name="scale0.cnf1", max_nfe=max_nfe, atol=1e-10, rtol=1e-10, gradient="adjoint" if adjoint else "direct",
                                 backend=backend)
    with pytest.raises(SolverBudgetExceeded) as info:
        _loss(block, x)
    return str(info.value), net, steps


@pytest.mark.parametrize("adjoint", [False, True], ids=["direct", "adjoint"])
def test_nfe_cap_raises_naming_the_block_and_the_time_reached(adjoint):
    message, net, steps = _capped_solve(adjoint)
    assert "scale0.cnf1" in message and "forward solve exceeded max_nfe=20" in message
    assert net.calls == 20  # the 21st evaluation is refused before the dynamics run
    m = _CAP_MESSAGE.search(message)
    assert m, message
    # evaluation 21 is the first stage of the fourth step: the time lies in that step (rescaled time)
    t0, h = steps[3]
    assert t0 * (1 - 1e-5) <= float(m["t"]) <= (t0 + h) * (1 + 1e-5), (message, t0, h)
    assert math.isfinite(float(m["dt"])) and float(m["dt"]) != 0


@pytest.mark.parametrize("adjoint,backend", [
    (False, "fastcnf"),
    (False, "torchdiffeq"),
    (True, "fastcnf"),  # the adjoint always solves with torchdiffeq
], ids=["lean", "torchdiffeq", "adjoint"])
def test_nfe_cap_reports_the_solvers_step_size(adjoint, backend):
    message, _, steps = _capped_solve(adjoint, backend)
    m = _CAP_MESSAGE.search(message)
    t0, h = steps[3]  # the step whose first stage the cap refused
    assert float(m["dt"]) == pytest.approx(h, rel=2e-3), (message, t0, h)
    assert t0 * (1 - 1e-5) <= float(m["t"]) <= (t0 + h) * (1 + 1e-5), (message, t0, h)


def test_nfe_cap_applies_to_the_adjoint_backward_solve():
    block, net = _counting_block(gradient="adjoint", name="blk")
    x = torch.randn(4, 2, dtype=DTYPE)
    _loss(block, x).backward()
    forward, backward = block.nfe.forward, block.nfe.backward
    assert backward > forward  # the augmented backward solve is the costlier one here
    block.solver = SolverConfig(atol=1e-6, rtol=1e-6, gradient="adjoint", max_nfe=forward)
    loss = _loss(block, x)  # the forward solve fits exactly under the cap
    assert block.nfe.forward == forward
    with pytest.raises(SolverBudgetExceeded, match=rf"blk: backward solve exceeded max_nfe={forward} at time t="):
        loss.backward()


def test_nfe_cap_zero_disables_the_cap():
    block, net = _counting_block(max_nfe=0, atol=1e-9, rtol=1e-9)
    with torch.no_grad():
        block(torch.randn(3, 2, dtype=DTYPE))
    assert block.nfe.forward > 50
