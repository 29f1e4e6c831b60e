"""REINFORCE for learned tolerances (002 §3, eq. 6-7): the estimator is unbiased, the returns
follow eq. 7, and a gate rewarded by -NFE alone learns to loosen its tolerance."""
from __future__ import annotations

import math

import torch

from fastcnf.cnf import CNFBlock, ConcatSquashMLP, ExactTrace
from fastcnf.ode import SolverConfig
from fastcnf.ode.tolerances import (LearnedTolerance, MovingAverageBaseline, cumulative_returns,
                                    reinforce_loss)


def test_cumulative_returns_follow_eq7():
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
    baseline = MovingAverageBaseline(0.9)
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
    tolerance must rise (002 §3: fewer function evaluations)."""
    torch.manual_seed(0)
    block = CNFBlock(ConcatSquashMLP(1, (8,)), ExactTrace(), SolverConfig(atol=1e-6, rtol=1e-6), end_time=1.0)
    policy = LearnedTolerance([block], hidden=4, init_log10_tol=-6.0, init_std=0.5, max_tol=1e-1)
    policy.attach([block])
    opt = torch.optim.Adam(policy.parameters(), lr=0.15)
    baseline = MovingAverageBaseline(0.8)
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
