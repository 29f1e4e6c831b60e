"""The conditioning hook: loss term of 002 eq. 4 and the evaluation metrics."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from fastcnf.conditioning import ClassConditionalGaussian
from fastcnf.config import config_from_dict
from fastcnf.data.base import DataBundle, DataSplit
from fastcnf.models.flow_model import bits_per_dim_from_log_prob
from fastcnf.training.conditioning import ConditioningHook, build_conditioning_hook
from fastcnf.training.hooks import HOOK_BUILDERS, StepContext


def _trainer(prior, is_image: bool):
    shape = (1, 2, 3) if is_image else (6,)
    x = torch.zeros(4, *shape, dtype=torch.uint8 if is_image else torch.float32)
    bundle = DataBundle(name="fake", train=DataSplit(x, torch.arange(4) % 3), test=DataSplit(x, torch.arange(4) % 3),
                        shape=shape, num_classes=3, levels=17 if is_image else None, split="fake")
    cfg = config_from_dict({"conditioning": {"kind": "infocnf", "beta": 0.7}})
    return SimpleNamespace(model=SimpleNamespace(prior=prior), bundle=bundle, cfg=cfg)


def _prior() -> ClassConditionalGaussian:
    prior = ClassConditionalGaussian(6, 3, 3, 3).double().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in prior.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return prior


def test_hook_is_registered_and_off_without_conditioning():
    assert build_conditioning_hook in HOOK_BUILDERS
    assert build_conditioning_hook(config_from_dict({}), None) is None
    hook = build_conditioning_hook(config_from_dict({"conditioning": {"kind": "ccnf", "beta": 0.3}}), None)
    assert isinstance(hook, ConditioningHook) and hook.beta == 0.3


def test_loss_term_is_beta_times_cross_entropy():
    prior = _prior()
    trainer = _trainer(prior, is_image=False)
    z = torch.randn(5, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2, 1])
    terms = ConditioningHook(0.7).loss_terms(trainer, StepContext(z=z, labels=y))
    logp = torch.log_softmax(prior.logits(z), 1)
    expected = -0.7 * logp[torch.arange(5), y].mean()
    assert torch.allclose(terms["cross_entropy"], expected, atol=1e-12)


@pytest.mark.parametrize("is_image", [False, True])
def test_eval_metrics_are_error_conditional_and_marginal_nll(is_image):
    prior = _prior()
    trainer = _trainer(prior, is_image)
    hook = ConditioningHook(1.0)
    hook.eval_begin(trainer)
    g = torch.Generator().manual_seed(1)
    zs, lds, ys = [], [], []
    for _ in range(3):  # three evaluation batches
        z = torch.randn(7, 6, generator=g, dtype=torch.float64)
        logdet = torch.randn(7, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (7,), generator=g)
        hook.eval_batch(trainer, StepContext(z=z, logdet=logdet, labels=y))
        zs.append(z), lds.append(logdet), ys.append(y)
    z, logdet, y = torch.cat(zs), torch.cat(lds), torch.cat(ys)
    m = hook.eval_metrics(trainer)
    with torch.no_grad():
        cond = prior.log_prob(z, y) + logdet
        per_class = torch.stack([prior.log_prob(z, torch.full_like(y, k)) for k in range(3)], 1)
        marg = torch.logsumexp(per_class + prior.label_log_prior, 1) + logdet
        err = float((prior.logits(z).argmax(1) != y).double().mean())
    assert math.isclose(m["test_error"], err)
    assert math.isclose(m["test_nll_conditional_nats"], -float(cond.mean()), rel_tol=1e-10)
    assert math.isclose(m["test_nll_marginal_nats"], -float(marg.mean()), rel_tol=1e-10)
    assert torch.allclose(prior.label_log_prior, torch.full((3,), -math.log(3), dtype=torch.float64), atol=1e-7)
    # the marginal is never more likely than the best class, and at least p(y) times the true one
    assert -float(cond.mean()) - math.log(3) <= m["test_nll_marginal_nats"] + 1e-9
    if is_image:
        expected = float(bits_per_dim_from_log_prob(marg.mean(), 6, 17))
        assert math.isclose(m["test_bits_per_dim_marginal"], expected, rel_tol=1e-6)
    else:
        assert "test_bits_per_dim_marginal" not in m
