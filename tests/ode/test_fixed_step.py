"""Fixed-step samplers against closed forms: the linear ODE's exact per-step growth factors, the
order of each method, the NFE of N steps, and the pinning of a model's blocks."""
from __future__ import annotations

import math

import pytest
import torch

from fastcnf.cnf import CNFBlock, ConcatSquashMLP
from fastcnf.config import ConfigError, SolverConfig
from fastcnf.flows import SequentialFlow
from fastcnf.models import FlowModel
from fastcnf.ode.fixed_step import EVALUATIONS_PER_STEP, fixed_step_solver, fixed_steps
from fastcnf.ode.solve import NFECounter, solve


def _solve(func, y0, method, steps, t0=0.0, t1=1.0):
    cfg = fixed_step_solver(SolverConfig(), method, steps)
    counter = NFECounter()
    t = torch.tensor([t0, t1], dtype=torch.float64)
    out = solve(func, y0, t, cfg, counter)
    return out[-1], counter.forward


def _taylor(x: float, order: int) -> float:
    return sum(x ** k / math.factorial(k) for k in range(order + 1))


# the stability polynomial of every s-stage explicit Runge-Kutta method of order s <= 4 is the
# Taylor polynomial of exp of that order: on dz/dt = a z one step multiplies z by it exactly
@pytest.mark.parametrize("method,order", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
@pytest.mark.parametrize("steps", [1, 3, 7])
def test_linear_ode_gives_the_taylor_growth_factor_per_step(method, order, steps):
    a = -1.7
    y0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    y1, nfe = _solve(lambda t, z: a * z, y0, method, steps)
    factor = _taylor(a / steps, order) ** steps
    torch.testing.assert_close(y1, y0 * factor, rtol=1e-13, atol=0)
    assert nfe == steps * EVALUATIONS_PER_STEP[method]


def test_backward_in_time_euler_uses_the_negative_step():
    a, steps = 0.8, 4
    y1 = torch.tensor([2.0], dtype=torch.float64)
    y0, nfe = _solve(lambda t, z: a * z, y1, "euler", steps, t0=1.0, t1=0.0)
    torch.testing.assert_close(y0, y1 * (1 - a / steps) ** steps, rtol=1e-13, atol=0)
    assert nfe == steps


@pytest.mark.parametrize("method,order", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
def test_global_error_shrinks_with_the_methods_order(method, order):
    # dz/dt = cos(t) z, z(0) = 1: z(t) = exp(sin t) (time-dependent, so the order is not a linear-ODE accident)
    func = lambda t, z: torch.cos(t) * z  # noqa: E731
    exact = math.exp(math.sin(2.0))
    errs = [abs(float(_solve(func, torch.ones(1, dtype=torch.float64), method, n, 0.0, 2.0)[0]) - exact)
            for n in (64, 128)]
    assert math.log2(errs[0] / errs[1]) == pytest.approx(order, abs=0.15)


def test_one_third_step_size_takes_exactly_three_steps():
    _, nfe = _solve(lambda t, z: -z, torch.ones(1, dtype=torch.float64), "euler", 3)
    assert nfe == 3


def test_bad_method_or_steps_is_a_config_error():
    with pytest.raises(ConfigError, match="fixed-step method"):
        fixed_step_solver(SolverConfig(), "dopri5", 4)
    with pytest.raises(ConfigError, match="steps"):
        fixed_step_solver(SolverConfig(), "euler", 0)


def _model():
    torch.manual_seed(0)
    return FlowModel(SequentialFlow([CNFBlock(ConcatSquashMLP(2, (16,)), end_time=1.0)], input_shape=(2,))).double()


def test_sample_with_steps_reports_nfe_and_restores_the_adaptive_solver():
    model = _model()
    block = model.cnf_blocks()[0]
    block.solver = SolverConfig(atol=1e-10, rtol=1e-10)
    gen = torch.Generator().manual_seed(1)
    x = model.sample(32, generator=gen, steps=5, method="midpoint")
    assert model.nfe_last()[0] == 10 and x.shape == (32, 2)
    assert block.pinned_solver is None and block.current_solver().method == "dopri5"
    # many RK4 steps approach the adaptive solution
    x_rk4 = model.sample(32, generator=torch.Generator().manual_seed(1), steps=64, method="rk4")
    x_ada = model.sample(32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x_rk4, x_ada, rtol=0, atol=1e-6)


def test_one_euler_step_of_a_sample_is_the_explicit_formula():
    model = _model()
    block = model.cnf_blocks()[0]
    z = torch.randn(8, 2, dtype=torch.float64)
    with fixed_steps(model, "euler", 1) as nfe:
        x = model.decode(z)
    # dz/ds = T f(sT, z) from s = 1 to s = 0 in one step: x = z - T f(T, z)
    t_end = block.end_time
    with torch.no_grad():
        expected = z - t_end * block.net(t_end, z)
    torch.testing.assert_close(x, expected)
    assert nfe == 1


def test_cli_offers_every_fixed_step_method():
    from fastcnf.cli import _FIXED_STEP_METHODS

    assert set(_FIXED_STEP_METHODS) == set(EVALUATIONS_PER_STEP)


def test_fixed_steps_refuses_a_model_without_cnf_blocks():
    with pytest.raises(ConfigError, match="CNF blocks"):
        with fixed_steps(torch.nn.Linear(2, 2), "euler", 1):
            pass
