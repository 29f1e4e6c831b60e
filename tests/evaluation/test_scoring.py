"""Fixed-step scoring (``score_rows(steps=N, method=M)``) against closed forms and the adaptive solve."""
import pytest
import torch

from fastcnf.cnf import CNFBlock, ExactTrace
from fastcnf.evaluation.scoring import score_rows
from fastcnf.flows import SequentialFlow
from fastcnf.models import FlowModel
from fastcnf.ode import SolverConfig
from tests.reference_models import LinearField

#: the stability polynomial R(M) of each method: one step of dz/ds = A z maps z to R(h A) z
POLYNOMIAL = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}


def _linear_model(a: torch.Tensor, end_time: float) -> FlowModel:
    block = CNFBlock(LinearField(a), ExactTrace(), SolverConfig(method="dopri5", atol=1e-11, rtol=1e-11),
                     end_time=end_time)
    return FlowModel(SequentialFlow([block], input_shape=(a.shape[0],))).double()


@pytest.mark.parametrize("method,steps", [("rk4", 3), ("rk4", 7), ("midpoint", 5), ("heun", 4), ("euler", 6)])
def test_fixed_step_score_of_a_linear_ode_is_its_closed_form(method, steps):
    # dz/dt = A z on [0, T]: N steps of an explicit Runge-Kutta method map x to R(T A / N)^N x with R the
    # method's Taylor polynomial of exp (order p), and add exactly T tr(A) to the log-density (the
    # trace is constant); log p(x) = log N(z_N; 0, I) + T tr(A)
    torch.manual_seed(0)
    a = 0.6 * torch.randn(3, 3, dtype=torch.float64)
    end_time = 1.3
    x = torch.randn(11, 3, dtype=torch.float64)
    m = end_time / steps * a
    r = torch.eye(3, dtype=torch.float64)
    term = torch.eye(3, dtype=torch.float64)
    for k in range(1, POLYNOMIAL[method] + 1):
        term = term @ m / k
        r = r + term
    z = x @ torch.linalg.matrix_power(r, steps).T
    expected = -0.5 * (z ** 2).sum(1) - 1.5 * torch.log(torch.tensor(2 * torch.pi, dtype=torch.float64)) \
        + end_time * torch.trace(a)
    res = score_rows(_linear_model(a, end_time), x, dtype=torch.float64, batch_size=4, steps=steps, method=method)
    torch.testing.assert_close(torch.from_numpy(res.log_prob), expected, rtol=1e-12, atol=1e-12)
    assert res.nfe == steps * {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}[method]


def test_fixed_step_score_converges_to_the_adaptive_solve_at_the_methods_order():
    # a concat-squash network (the fused exact-trace kernel): RK4's error falls ~16x per halved step
    torch.manual_seed(1)
    from fastcnf.cnf import ConcatSquashMLP

    block = CNFBlock(ConcatSquashMLP(3, (16, 16), "tanh"), ExactTrace(),
                     SolverConfig(method="dopri5", atol=1e-12, rtol=1e-12), end_time=1.0)
    model = FlowModel(SequentialFlow([block], input_shape=(3,))).double()
    x = 1.5 * torch.randn(20, 3, dtype=torch.float64)
    ref = score_rows(model, x, dtype=torch.float64).log_prob
    errs = [abs(score_rows(model, x, dtype=torch.float64, steps=n, method="rk4").log_prob - ref).max()
            for n in (4, 8, 16)]
    assert errs[2] < 1e-5
    for coarse, fine in zip(errs, errs[1:]):
        assert 8 < coarse / fine < 32
