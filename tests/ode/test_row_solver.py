"""The per-row solver against closed forms, torchdiffeq's dopri5 and one-row solves."""
import math

import torch
from torchdiffeq import odeint

from fastcnf.ode.fast_solvers import BOSH3, DOPRI5
from fastcnf.ode.row_solver import solve_rows


def _decay(t, y):
    """dz/dt = -c z per row, d logp/dt = -D c, dc/dt = 0: z(t) = z0 exp(-c t), logp(t) = -D c t (the
    rate rides in the state, as the solver passes the rows still moving only)."""
    z, _, c = y
    return -c[:, None] * z, -z.shape[1] * c, torch.zeros_like(c)


def test_each_row_matches_the_closed_form_and_stiff_rows_take_more_steps():
    torch.manual_seed(0)
    c = torch.tensor([0.1, 1.0, 5.0, 30.0], dtype=torch.float64)
    z0 = torch.randn(4, 3, dtype=torch.float64)
    zero = torch.zeros(4, dtype=torch.float64)
    (z, lp, _), evals = solve_rows(_decay, (z0, zero, c), 0.0, 2.0, DOPRI5, 1e-9, 1e-9)
    torch.testing.assert_close(z, z0 * torch.exp(-2 * c)[:, None], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(lp, -3 * 2 * c, rtol=1e-7, atol=1e-9)
    counts = [solve_rows(_decay, (z0[i:i + 1], zero[i:i + 1], c[i:i + 1]), 0.0, 2.0, DOPRI5, 1e-9, 1e-9)[1]
              for i in range(4)]
    assert counts == sorted(counts) and counts[0] < counts[-1]
    assert evals < 4 * counts[-1]  # easy rows left the batch early


def _nonlinear(y_t, y):
    z, _ = y
    t = y_t[:, None]
    f = torch.tanh(z @ torch.tensor([[0.5, -1.0], [1.2, 0.3]], dtype=z.dtype)) * torch.cos(3 * t) - 0.2 * z
    return f, (z ** 2).sum(1) * torch.sin(y_t)


def test_rows_equal_one_row_solves_and_torchdiffeq():
    torch.manual_seed(1)
    z0 = 2 * torch.randn(6, 2, dtype=torch.float64)
    l0 = torch.zeros(6, dtype=torch.float64)
    for tab, method in ((DOPRI5, "dopri5"), (BOSH3, "bosh3")):
        (z, lp), _ = solve_rows(_nonlinear, (z0, l0), 1.0, 0.0, tab, 1e-6, 1e-6)  # backwards in time
        for i in range(6):
            (zi, li), _ = solve_rows(_nonlinear, (z0[i:i + 1], l0[i:i + 1]), 1.0, 0.0, tab, 1e-6, 1e-6)
            torch.testing.assert_close(zi[0], z[i], rtol=0, atol=1e-13)
            torch.testing.assert_close(li[0], lp[i], rtol=0, atol=1e-13)

            def g(t, y):
                f, dl = _nonlinear(t.reshape(1).expand(1), y)
                return f, dl

            zr, lr = odeint(g, (z0[i:i + 1], l0[i:i + 1]), torch.tensor([1.0, 0.0], dtype=torch.float64),
                            method="dopri5", rtol=1e-11, atol=1e-11)
            assert (zi - zr[-1]).abs().max() < 5e-5 and (li - lr[-1]).abs().max() < 5e-5


def test_an_empty_batch_and_a_zero_span_return_the_input():
    z = torch.randn(3, 2, dtype=torch.float64)
    l0 = torch.zeros(3, dtype=torch.float64)
    (out, _), n = solve_rows(_nonlinear, (z, l0), 0.5, 0.5, DOPRI5, 1e-6, 1e-6)
    assert n == 0 and torch.equal(out, z)
    assert solve_rows(_nonlinear, (z[:0], l0[:0]), 0.0, 1.0, DOPRI5, 1e-6, 1e-6)[1] == 0
    assert math.isfinite(float(solve_rows(_nonlinear, (z, l0), 0.0, 1.0, DOPRI5, 1e-3, 1e-3)[0][1].sum()))
