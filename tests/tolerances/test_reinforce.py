"""REINFORCE for learned tolerances (Nguyen et al. 2019, "InfoCNF", §3, eq. 6-7): the estimator is unbiased, the returns
follow eq. 7, and a gate rewarded by -NFE alone learns to loosen its tolerance."""
from __future__ import annotations

import math

import torch

from fastcnf.cnf import CNFBlock, ConcatSquashMLP, ExactTrace
from fastcnf.tolerances.reinforce import ReturnBaseline, cumulative_returns, reinforce_loss


def _moving_average(momentum: float):
    """The moving average of the returns ``b <- m b + (1 - m) r``: a ReturnBaseline with no loss part."""
    baseline = ReturnBaseline(momentum)
    return lambda returns: baseline(0.0, returns)
from fastcnf.tolerances.gates import LearnedTolerance
from fastcnf.ode import SolverConfig


def test_cumulative_returns_follow_infocnf_eq7():
    # r_i = -[L - alpha/N sum_{j>=i} R_j], R_j = -NFE_j
    r = cumulative_returns(2.0, [10, 20, 30], alpha=0.3)
    n = 3
    expected = [-(2.0 + 0.3 / n * s) for s in (60, 50, 30)]
    assert torch.allclose(r, torch.tensor(expected, dtype=torch.float64))


def test_reinforce_gradient_matches_analytic_gradient_of_expected_reward():
    """Two blocks with independent Gaussian policies g_i ~ N(mu_i, s_i^2) and "NFE" (g_i - c_i)^2.
    With alpha = N and no loss, J = -E[sum R_i] = sum (mu_i - c_i)^2 + s_i^2, so
    dJ/dmu_i = 2 (mu_i - c_i), dJ/ds_i = 2 s_i. The mean of the surrogate's gradient over many
    draws must agree within 5 standard errors (with the moving-average baseline, which must not bias it)."""
    gen = torch.Generator().manual_seed(0)
    mu = torch.tensor([0.3, -0.5], dtype=torch.float64, requires_grad=True)
    log_s = torch.tensor([math.log(0.8), math.log(0.5)], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([1.0, 0.5], dtype=torch.float64)
    baseline = _moving_average(0.9)
    grads = []
    for _ in range(1500):
        s = log_s.exp()
        g = (mu + s * torch.randn(2, generator=gen, dtype=torch.float64)).detach()
        dist = torch.distributions.Normal(mu, s)
        lps = [dist.log_prob(g)[i] for i in range(2)]
        returns = cumulative_returns(0.0, ((g - c) ** 2).tolist(), alpha=2.0)
        loss = reinforce_loss(lps, returns, baseline(returns))
        gm, gs = torch.autograd.grad(loss, (mu, log_s))
        grads.append(torch.cat([gm, gs / s.detach()]))  # chain rule: dJ/ds = dJ/dlog s / s
    grads = torch.stack(grads)
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(len(grads))
    s = log_s.exp().detach()
    analytic = torch.cat([2 * (mu.detach() - c), 2 * s])
    assert ((mean - analytic).abs() < 5 * se).all(), (mean, analytic, se)
    assert (se < 0.25).all()  # enough draws for the test to have power


def test_gate_rewarded_by_minus_nfe_learns_to_raise_tolerance():
    """No loss term: the only reward is -NFE of a real dopri5 solve, so the gate's mean
    tolerance must rise (InfoCNF §3: fewer function evaluations)."""
    torch.manual_seed(0)
    block = CNFBlock(ConcatSquashMLP(1, (8,)), ExactTrace(), SolverConfig(atol=1e-6, rtol=1e-6), end_time=1.0)
    policy = LearnedTolerance([block], hidden=4, init_log10_tol=-6.0, init_std=0.5, max_tol=1e-1)
    policy.attach([block])
    opt = torch.optim.Adam(policy.parameters(), lr=0.15)
    baseline = _moving_average(0.8)
    x = torch.randn(64, 1) * 2
    nfes = []
    for _ in range(30):
        with torch.no_grad():
            block(x)
        (i, log_prob, tol, mu, sigma), = policy.records
        policy.records = []
        nfe = block.nfe.forward
        nfes.append(nfe)
        returns = cumulative_returns(0.0, [nfe], alpha=1.0)
        opt.zero_grad()
        reinforce_loss([log_prob], returns, baseline(returns)).backward()
        opt.step()
    mu_final = float(policy.gates[0](x)[0].detach())
    assert mu_final > -6.0 + 1.0, mu_final
    assert sum(nfes[-5:]) < sum(nfes[:5])


def test_return_baseline_splits_loss_and_nfe_parts():
    """Equal momenta: the split baseline is the moving average of the whole return r_i; loss
    momentum 0: its loss part is minus the previous step's loss."""
    gen = torch.Generator().manual_seed(1)
    single, split, prev = _moving_average(0.8), ReturnBaseline(0.8), ReturnBaseline(0.8, loss_momentum=0.0)
    nfe_only = _moving_average(0.8)
    last_loss = None
    for t in range(20):
        loss = 10.0 - 0.3 * t + float(torch.randn((), generator=gen))
        nfe = (torch.randint(10, 60, (3,), generator=gen)).tolist()
        nfe_part = cumulative_returns(0.0, nfe, alpha=0.5)
        returns = cumulative_returns(loss, nfe, alpha=0.5)
        torch.testing.assert_close(returns, nfe_part - loss)
        torch.testing.assert_close(split(loss, nfe_part), single(returns))
        b_prev, b_nfe = prev(loss, nfe_part), nfe_only(nfe_part)
        expected_loss_part = -(loss if last_loss is None else last_loss)
        torch.testing.assert_close(b_prev - b_nfe, torch.full((3,), expected_loss_part, dtype=torch.float64))
        last_loss = loss
    state = prev.state_dict()
    fresh = ReturnBaseline(0.8, loss_momentum=0.0)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(1.0, nfe_part), prev(1.0, nfe_part))


def test_reinforce_with_trending_loss_and_split_baseline_is_unbiased():
    """A loss that falls over training (action-independent) plus a quadratic "NFE": with the
    split baseline (loss part from the previous step) the mean REINFORCE gradient still matches
    the analytic gradient of the expected NFE reward."""
    gen = torch.Generator().manual_seed(2)
    mu = torch.tensor([0.2], dtype=torch.float64, requires_grad=True)
    s = torch.tensor([0.7], dtype=torch.float64)
    c = 1.0
    baseline = ReturnBaseline(0.8, loss_momentum=0.0)
    grads = []
    for t in range(1500):
        g = (mu + s * torch.randn(1, generator=gen, dtype=torch.float64)).detach()
        lp = torch.distributions.Normal(mu, s).log_prob(g)[0]
        loss = 8.0 * math.exp(-t / 300) + 0.1 * float(torch.randn((), generator=gen, dtype=torch.float64))
        nfe_part = cumulative_returns(0.0, ((g - c) ** 2).tolist(), alpha=1.0)
        (grad,) = torch.autograd.grad(reinforce_loss([lp], nfe_part - loss, baseline(loss, nfe_part)), (mu,))
        grads.append(grad)
    grads = torch.cat(grads)
    mean, se = grads.mean(), grads.std() / math.sqrt(len(grads))
    analytic = 2 * (mu.detach() - c)
    assert abs(float(mean - analytic)) < 5 * float(se), (mean, analytic, se)
    assert float(se) < 0.2
