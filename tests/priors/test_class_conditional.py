"""The priors (fastcnf.priors): the class-conditional Gaussians of CCNF / InfoCNF (Nguyen et al. 2019,
"InfoCNF", §2.2, eq. 3-5) against torch.distributions and brute force, and their label checks."""
from __future__ import annotations

import math

import pytest
import torch

from fastcnf.methods import config_from_dict
from fastcnf.methods import build_model
from fastcnf.models.flow_model import InputError
from fastcnf.priors import ClassConditionalGaussian, LabelError, StandardNormal
from reference_models import labelled_vectors


def _cfg(kind: str, **cond):
    return config_from_dict({
        "dtype": "float64",
        "model": {"arch": "mlp", "hidden_dims": [8], "divergence": "exact", "end_time": 0.5},
        "solver": {"atol": 1e-8, "rtol": 1e-8},
        "conditioning": {"kind": kind, **cond},
    })


def _model(kind: str, seed: int = 0, **cond):
    torch.manual_seed(seed)
    return build_model(_cfg(kind, **cond), labelled_vectors()).double()


def _randomise_heads(prior: ClassConditionalGaussian, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(prior.encoder.parameters()) + list(prior.classifier.parameters()):
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("kind", ["ccnf", "infocnf"])
def test_zero_initialised_heads_give_the_unconditional_log_density(kind):
    cond, plain = _model(kind), _model("none")
    assert isinstance(cond.prior, ClassConditionalGaussian) and isinstance(plain.prior, StandardNormal)
    x = labelled_vectors().train.x.double()
    y = labelled_vectors().train.y
    lp_plain = plain.log_prob(x)
    assert torch.equal(cond.log_prob(x, y), lp_plain)
    # the marginal also equals it: every class has the same N(0, I) prior
    assert torch.allclose(cond.prior.marginal_log_prob(cond.encode(x)) + cond(x)[1], lp_plain, atol=1e-12)
    assert torch.equal(cond.prior.logits(cond.encode(x)), torch.zeros(x.shape[0], 3, dtype=x.dtype))


@pytest.mark.parametrize("kind,start,size", [("ccnf", 0, 6), ("infocnf", 2, 2)])
def test_class_conditional_log_density_matches_torch_distributions(kind, start, size):
    prior = ClassConditionalGaussian(6, 3, start, size).double()
    _randomise_heads(prior)
    z = torch.randn(10, 6, dtype=torch.float64)
    y = torch.arange(10) % 3
    mu, log_sigma = prior.class_params(y)
    ref = torch.distributions.Independent(torch.distributions.Normal(mu, log_sigma.exp()), 1)
    rest = torch.cat([z[:, :start], z[:, start + size:]], 1)
    expected = ref.log_prob(z[:, start:start + size]) + torch.distributions.Normal(0.0, 1.0).log_prob(rest).sum(1)
    assert torch.allclose(prior.log_prob(z, y), expected, atol=1e-12)


@pytest.mark.parametrize("label_prior", [None, torch.tensor([0.2, 0.3, 0.5]).log()])
def test_marginal_is_logsumexp_of_conditionals_plus_log_label_prior(label_prior):
    prior = ClassConditionalGaussian(5, 3, 1, 3, label_log_prior=label_prior).double()
    _randomise_heads(prior)
    z = torch.randn(7, 5, dtype=torch.float64)
    log_py = prior.label_log_prior.double()
    # brute force: p(z) = sum_k p(z | k) p(k), one class at a time, summed in probability space
    brute = sum(torch.exp(prior.log_prob(z, torch.full((7,), k)) + log_py[k]) for k in range(3)).log()
    assert torch.allclose(prior.marginal_log_prob(z), brute, atol=1e-10)
    assert torch.allclose(prior.log_prob(z, None), brute, atol=1e-10)
    assert math.isclose(float(log_py.exp().sum()), 1.0, abs_tol=1e-6)


def test_sampling_with_a_label_gives_that_class_gaussian_on_the_supervised_code():
    prior = ClassConditionalGaussian(8, 4, 4, 3).double()
    _randomise_heads(prior, seed=3)
    n = 40000
    g = torch.Generator().manual_seed(0)
    z = prior.sample(n, torch.full((n,), 2), generator=g, dtype=torch.float64)
    mu, log_sigma = prior.class_params(torch.tensor([2]))
    z_c, z_rest = prior.split(z)
    se = log_sigma.exp()[0] / math.sqrt(n)
    assert ((z_c.mean(0) - mu[0]).abs() < 5 * se).all()
    assert torch.allclose(z_c.std(0), log_sigma.exp()[0], rtol=0.03)
    assert (z_rest.mean(0).abs() < 5 / math.sqrt(n)).all()
    assert torch.allclose(z_rest.std(0), torch.ones(5, dtype=torch.float64), rtol=0.03)


def test_classifier_gradients_reach_the_dynamics():
    model = _model("infocnf")
    _randomise_heads(model.prior)
    model.eval()  # no dropout: a deterministic function of the dynamics' parameters
    x = labelled_vectors().train.x.double()
    y = labelled_vectors().train.y
    dyn = [p for b in model.cnf_blocks() for p in b.parameters() if p.requires_grad]

    def ce() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model.prior.logits(model(x)[0]), y)

    grads = torch.autograd.grad(ce(), dyn)
    norm2 = sum(float((g * g).sum()) for g in grads)
    assert norm2 > 1e-8
    # directional derivative along the gradient matches a central finite difference
    eps = 1e-5
    with torch.no_grad():
        for p, g in zip(dyn, grads):
            p.add_(eps * g)
        up = float(ce())
        for p, g in zip(dyn, grads):
            p.sub_(2 * eps * g)
        down = float(ce())
        for p, g in zip(dyn, grads):
            p.add_(eps * g)
    assert math.isclose((up - down) / (2 * eps), norm2, rel_tol=1e-3)


def test_unknown_or_out_of_range_label_is_a_clear_error():
    model = _model("ccnf")
    x = labelled_vectors().train.x.double()[:3]
    with pytest.raises(InputError, match="unknown label 3"):
        model.log_prob(x, torch.tensor([0, 1, 3]))
    with pytest.raises(InputError, match="unknown label -1"):
        model.sample(2, torch.tensor([-1, 0]))
    with pytest.raises(LabelError, match="labels must be in 0..2"):
        model.prior.sample(2, torch.tensor([5, 0]))
    with pytest.raises(LabelError, match="integers"):
        model.prior.log_prob(x, torch.tensor([0.0, 1.0, 2.0]))
