"""LatentODE mathematics: KL and likelihood against torch.distributions, the time-reversed encoder,
the partitioned latent's supervised head, the ODE solve, and clear errors on bad sequences."""
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from fastcnf.models.latent_ode import LatentODE, gaussian_kl, gaussian_log_likelihood
from fastcnf.ode.solve import SolverConfig

torch.manual_seed(0)


def _batch(b=4, t=8):
    return torch.randn(b, t, 2, dtype=torch.float64), torch.linspace(0.0, 1.0, t, dtype=torch.float64)


def test_gaussian_kl_matches_torch_distributions():
    mq, mp = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    lq, lp = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    ref = kl_divergence(Normal(mq, (0.5 * lq).exp()), Normal(mp, (0.5 * lp).exp())).sum(-1)
    assert torch.allclose(gaussian_kl(mq, lq, mp, lp), ref, atol=1e-12)


def test_gaussian_log_likelihood_matches_torch_distributions():
    x, m = torch.randn(3, 7, 2, dtype=torch.float64), torch.randn(3, 7, 2, dtype=torch.float64)
    ref = Normal(m, 0.3).log_prob(x).sum(dim=(1, 2))
    assert torch.allclose(gaussian_log_likelihood(x, m, 0.3), ref, atol=1e-12)


@pytest.mark.parametrize("supervised_dim", [0, 3])
def test_elbo_kl_term_is_kl_to_the_right_prior(supervised_dim):
    model = LatentODE(supervised_dim=supervised_dim).double()
    x, t = _batch()
    labels = torch.randn(4, 3, dtype=torch.float64)
    out = model(x, t, labels=labels if supervised_dim else None)
    q = Normal(out["mean"], (0.5 * out["logvar"]).exp())
    p_mean, p_std = torch.zeros(4, 5, dtype=torch.float64), torch.ones(4, 5, dtype=torch.float64)
    if supervised_dim:  # p(z_y | y) = N(q_phi(y)), p(z_u) = N(0, I)
        m_y, lv_y = model.condition(labels).chunk(2, dim=-1)
        p_mean = torch.cat([m_y, p_mean[:, 3:]], -1)
        p_std = torch.cat([(0.5 * lv_y).exp(), p_std[:, 3:]], -1)
    ref = kl_divergence(q, Normal(p_mean, p_std)).sum(-1)
    assert torch.allclose(out["kl"], ref, atol=1e-10)
    ll = Normal(out["x_mean"], 0.3).log_prob(x).sum(dim=(1, 2))
    assert torch.allclose(out["elbo"], ll - ref, atol=1e-8)


def test_encoder_consumes_the_sequence_time_reversed():
    model = LatentODE().double()
    x, t = _batch(t=6)
    enc = model.encoder
    h = torch.zeros(4, enc.hidden, dtype=torch.float64)
    for i in reversed(range(6)):  # last observation first, x_t0 last
        h = torch.tanh(enc.i2h(torch.cat([x[:, i], h], -1)))
    mean, logvar = model.encode(x, t)
    ref_mean, ref_logvar = enc.h2o(h).chunk(2, -1)
    assert torch.allclose(mean, ref_mean) and torch.allclose(logvar, ref_logvar)
    # reading forwards would give another posterior: the order matters
    assert not torch.allclose(model.encode(x.flip(1), t)[0], mean)


def test_partitioned_supervised_head_sees_only_z_y():
    model = LatentODE(supervised_dim=3).double()
    z0 = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    pred = model.predict_labels(z0)
    grad, = torch.autograd.grad(pred.sum(), z0)
    assert torch.all(grad[:, 3:] == 0) and torch.any(grad[:, :3] != 0)
    z_other = z0.detach().clone()
    z_other[:, 3:] = torch.randn(5, 2, dtype=torch.float64) * 10
    assert torch.allclose(model.predict_labels(z_other), pred)
    x, t = _batch()
    out = model(x, t, labels=torch.zeros(4, 3, dtype=torch.float64))
    assert torch.allclose(out["label_pred"], model.predict(out["z0"][:, :3]))


def test_trajectory_solves_the_latent_ode_through_the_solving_layer():
    model = LatentODE(solver=SolverConfig(method="dopri5", atol=1e-8, rtol=1e-8)).double()
    last = model.dynamics.net[-1]
    with torch.no_grad():  # f(z) = A z with A = W2 ELU(W1 z) made linear: zero W1, so f = b2
        model.dynamics.net[0].weight.zero_()
        model.dynamics.net[0].bias.zero_()
        last.bias.copy_(torch.arange(5, dtype=torch.float64))
    z0 = torch.randn(3, 5, dtype=torch.float64)
    t = torch.tensor([0.0, 0.3, 1.1, 2.0], dtype=torch.float64)
    zs = model.trajectory(z0, t)
    ref = z0[:, None, :] + t[None, :, None] * last.bias[None, None, :]
    assert zs.shape == (3, 4, 5) and torch.allclose(zs, ref, atol=1e-8)
    assert model.nfe_last()[0] > 0


def test_unequal_sequence_lengths_are_a_clear_error():
    model = LatentODE()
    with pytest.raises(ValueError, match="sequence length 8 does not match the 7 time stamps"):
        model.encode(torch.randn(2, 8, 2), torch.linspace(0, 1, 7))
    with pytest.raises(ValueError, match="equal-length"):
        model.encode([torch.randn(8, 2), torch.randn(7, 2)], torch.linspace(0, 1, 8))


def test_non_increasing_time_stamps_are_a_clear_error():
    model = LatentODE()
    t = torch.tensor([0.0, 0.1, 0.1, 0.3])
    with pytest.raises(ValueError, match=r"strictly increasing; times\[2\]"):
        model(torch.randn(2, 4, 2), t)
    with pytest.raises(ValueError, match="strictly increasing"):
        model.encode(torch.randn(2, 4, 2), t.flip(0))


def test_partitioned_model_requires_labels():
    model = LatentODE(supervised_dim=3)
    with pytest.raises(ValueError, match="needs labels of shape"):
        model(torch.randn(2, 4, 2), torch.linspace(0, 1, 4))
    with pytest.raises(ValueError, match="supervised_dim"):
        LatentODE(supervised_dim=5)
