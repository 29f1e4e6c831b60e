"""Test-split metrics (fastcnf.evaluation.metrics.evaluate_density) against independent references:
``test_nll_nats`` and bits/dim equal a direct ``model.log_prob`` on the dequantised test split
(dequantisation noise drawn from ``eval.seed`` in the same batch order), ``test_examples`` equals
``eval.max_examples`` below, at and above the batch size, and for class-conditional priors the
conditional / marginal NLL and the error equal a brute-force sum over classes."""
from __future__ import annotations

import math

import pytest
import torch

from fastcnf.config import EvalConfig
from fastcnf.methods import load_recipe
from fastcnf.data import load_data
from fastcnf.data.base import DataBundle, DataSplit, dequantize
from fastcnf.evaluation import metrics as eval_metrics
from fastcnf.evaluation.metrics import evaluate_density
from fastcnf.methods import build_model

BATCH = 50
TIGHT_EVAL = ["eval.atol=1e-10", "eval.rtol=1e-10"]


@pytest.fixture(scope="module")
def digits_glow():
    """A small Glow on digits (images with 17 levels; no ODE, so log p is exact and fast)."""
    cfg = load_recipe("digits-glow", ["model.glow.levels=2", "model.glow.steps=1", "model.glow.hidden=8"])
    bundle = load_data(cfg.data, 0)
    torch.manual_seed(0)
    model = build_model(cfg, bundle)
    with torch.no_grad():  # move away from the zero-initialised couplings
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, bundle


def _direct_log_prob(model, bundle, n: int, seed: int) -> torch.Tensor:
    """log p of the first ``n`` test images, dequantised with a generator seeded by ``seed`` and
    drawn batch by batch in test-split order."""
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, n, BATCH):
            x = dequantize(bundle.test.x[start:min(start + BATCH, n)], bundle.levels, generator=gen)
            out.append(model.log_prob(x).double())
    return torch.cat(out)


@pytest.mark.parametrize("max_examples", [30, BATCH, 120], ids=["below-batch", "one-batch", "above-batch"])
def test_nll_and_bits_per_dim_equal_direct_log_prob_on_the_dequantised_test_split(digits_glow, max_examples):
    model, bundle = digits_glow
    eval_cfg = EvalConfig(batch_size=BATCH, max_examples=max_examples, seed=77)
    metrics = evaluate_density(model, bundle, eval_cfg)
    lp = _direct_log_prob(model, bundle, max_examples, seed=77)
    assert metrics["test_examples"] == max_examples == len(lp)
    assert metrics["test_nll_nats"] == pytest.approx(-float(lp.mean()), rel=1e-6)
    bits = (-float(lp.mean()) / bundle.dim + math.log(bundle.levels)) / math.log(2)  # FFJORD §5
    assert metrics["test_bits_per_dim"] == pytest.approx(bits, rel=1e-6)
    # another seed gives other dequantisation noise (the reference really depends on it)
    assert float(_direct_log_prob(model, bundle, max_examples, seed=78).mean()) != pytest.approx(float(lp.mean()),
                                                                                                  rel=1e-9)


def test_max_examples_zero_or_beyond_the_split_evaluates_the_whole_split(digits_glow):
    model, bundle = digits_glow
    n = len(bundle.test)
    for max_examples in (0, n + 7):
        assert evaluate_density(model, bundle, EvalConfig(batch_size=BATCH, max_examples=max_examples))[
            "test_examples"] == n
    assert sum(len(x) for x, _ in eval_metrics.test_batches(bundle.test, 120, BATCH)) == 120


def test_cnf_nll_on_vector_data_equals_direct_log_prob_without_noise():
    # tight evaluation tolerances: the adaptive steps depend on the batch, the reference is one batch
    cfg = load_recipe("toy-ffjord", ["model.hidden_dims=[8]", "data.n_test=40", "dtype=float64", *TIGHT_EVAL])
    bundle = load_data(cfg.data, 0)
    torch.manual_seed(0)
    model = build_model(cfg, bundle).double()
    metrics = evaluate_density(model, bundle, EvalConfig(batch_size=16, max_examples=37), dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        lp = model.log_prob(bundle.test.x[:37].double())
    assert metrics["test_examples"] == 37 and metrics["test_bits_per_dim"] is None
    assert metrics["test_nll_nats"] == pytest.approx(-float(lp.mean()), rel=1e-8)


def _labelled_bundle(image: bool) -> DataBundle:
    g = torch.Generator().manual_seed(0)
    if image:
        x = torch.randint(0, 17, (30, 1, 8, 8), generator=g)
        shape, levels = (1, 8, 8), 17
    else:
        x = torch.randn(30, 4, generator=g)
        shape, levels = (4,), None
    y = torch.arange(30) % 3
    return DataBundle(name="fake", train=DataSplit(x, y), test=DataSplit(x, y), shape=shape, num_classes=3,
                      levels=levels, split="fake")


@pytest.mark.parametrize("image", [False, True], ids=["vectors", "images"])
def test_conditional_metrics_equal_brute_force_sums_over_classes(image):
    bundle = _labelled_bundle(image)
    if image:
        cfg = load_recipe("digits-glow", ["model.glow.levels=1", "model.glow.steps=1", "model.glow.hidden=4",
                                          "conditioning.kind=ccnf", "dtype=float64"])
    else:
        cfg = load_recipe("toy-ffjord", ["model.hidden_dims=[8]", "conditioning.kind=infocnf", "dtype=float64",
                                         *TIGHT_EVAL])
    torch.manual_seed(0)
    model = build_model(cfg, bundle).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in list(model.prior.encoder.parameters()) + list(model.prior.classifier.parameters()):
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    metrics = evaluate_density(model, bundle, EvalConfig(batch_size=8, max_examples=20, seed=5),
                               dtype=torch.float64)
    model.eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        xs = [bundle.test.x[s:min(s + 8, 20)] for s in range(0, 20, 8)]
        x = torch.cat([dequantize(b, 17, generator=gen) if image else b for b in xs]).double()
        y = bundle.test.y[:20]
        per_class = torch.stack([model.log_prob(x, torch.full_like(y, k)) for k in range(3)], 1)
        cond = per_class[torch.arange(20), y]
        # p(x) = sum_k p(x | k) p(k) with the uniform label prior, summed in probability space
        marg = (per_class.exp() / 3).sum(1).log() if not image else torch.logsumexp(per_class - math.log(3), 1)
        error = float((model.prior.logits(model.encode(x)).argmax(1) != y).double().mean())
    assert metrics["test_examples"] == 20
    rel = 1e-6 if image else 1e-8
    assert metrics["test_nll_conditional_nats"] == pytest.approx(-float(cond.mean()), rel=rel)
    assert metrics["test_nll_nats"] == metrics["test_nll_conditional_nats"]
    assert metrics["test_nll_marginal_nats"] == pytest.approx(-float(marg.mean()), rel=rel)
    assert metrics["test_error"] == pytest.approx(error)
    assert 0 < error < 1
    if image:
        bits = (-float(marg.mean()) / 64 + math.log(17)) / math.log(2)
        assert metrics["test_bits_per_dim_marginal"] == pytest.approx(bits, rel=rel)
    else:
        assert "test_bits_per_dim_marginal" not in metrics


def test_evaluation_restores_training_mode_and_the_global_rng(digits_glow):
    model, bundle = digits_glow
    model.train()
    state = torch.get_rng_state()
    evaluate_density(model, bundle, EvalConfig(batch_size=BATCH, max_examples=10))
    assert model.training and torch.equal(state, torch.get_rng_state())
