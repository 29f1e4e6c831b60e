"""The conditioning hook (fastcnf.training.conditioning): the loss term of Nguyen et al. 2019,
"InfoCNF", eq. 4 (beta times the classifier's cross-entropy) and its setup checks. The conditional /
marginal NLL and the test error are tested in tests/evaluation/test_metrics.py, the class figure in
tests/evaluation/test_plots.py."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fastcnf.config import ConfigError
from fastcnf.methods import config_from_dict
from fastcnf.priors import ClassConditionalGaussian, StandardNormal
from fastcnf.conditioning.hook import ConditioningHook
from fastcnf.methods import build_hooks
from fastcnf.method import StepContext


def _prior() -> ClassConditionalGaussian:
    prior = ClassConditionalGaussian(6, 3, 3, 3).double().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in prior.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return prior


def test_hook_is_built_only_with_conditioning_and_carries_beta():
    assert not any(isinstance(h, ConditioningHook) for h in build_hooks(config_from_dict({})))
    (hook,) = build_hooks(config_from_dict({"conditioning": {"kind": "ccnf", "beta": 0.3}}))
    assert isinstance(hook, ConditioningHook) and hook.beta == 0.3 and hook.kind == "ccnf"


def test_loss_term_is_beta_times_cross_entropy():
    prior = _prior()
    trainer = SimpleNamespace(model=SimpleNamespace(prior=prior))
    z = torch.randn(5, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2, 1])
    ctx = StepContext(z=z, labels=y)
    terms = ConditioningHook(0.7, "infocnf").loss_terms(trainer, ctx)
    logp = torch.log_softmax(prior.logits(z), 1)
    expected = -0.7 * logp[torch.arange(5), y].mean()
    assert torch.allclose(terms["cross_entropy"], expected, atol=1e-12)
    assert float(ctx["train_error"]) == float((prior.logits(z).argmax(1) != y).double().mean())


def test_hook_needs_the_class_conditional_prior_and_labelled_batches():
    with pytest.raises(ConfigError, match="needs the class-conditional prior"):
        ConditioningHook(1.0, "ccnf").setup(SimpleNamespace(model=SimpleNamespace(prior=StandardNormal(2))))
    trainer = SimpleNamespace(model=SimpleNamespace(prior=_prior()))
    with pytest.raises(ConfigError, match="no labels"):
        ConditioningHook(1.0, "ccnf").loss_terms(trainer, StepContext(z=torch.zeros(2, 6)))
