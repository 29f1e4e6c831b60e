"""Evaluation on the test split: NLL (nats per example), bits/dim, NFE, and for class-conditional
models the conditional and marginal NLL and the classification error.

Evaluation runs in eval mode, so each CNF block solves at its evaluation tolerance (``eval.atol``,
1e-5 as in Nguyen et al. 2019, "InfoCNF", §4.2), with dequantisation and Hutchinson noise drawn
from ``eval.seed``, so re-evaluating a run gives the same numbers. It takes a model and data, never
a trainer.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from fastcnf.cnf.divergence import ExactTrace
from fastcnf.config import EvalConfig
from fastcnf.data.base import DataBundle, DataSplit, dequantize
from fastcnf.data.batcher import model_scale
from fastcnf.models.flow_model import bits_per_dim_from_log_prob
from fastcnf.ode.budget import set_status

__all__ = ["evaluate_density", "test_batches", "fork_rng", "tolerance_metrics", "sample_accuracy"]


class fork_rng:
    """Run a block with the global torch RNG seeded, restoring the training RNG afterwards
    (evaluation must not perturb training: resumed runs equal uninterrupted ones)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self):
        self.state = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        torch.manual_seed(self.seed)
        return self

    def __exit__(self, *exc):
        torch.set_rng_state(self.state)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        return False


def test_batches(split: DataSplit, max_examples: int, batch_size: int) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Consecutive batches of the first ``max_examples`` examples of ``split`` (0: all of them);
    the last batch is cut so that exactly that many examples are seen."""
    n = len(split) if max_examples <= 0 else min(max_examples, len(split))
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        yield split.x[start:stop], (None if split.y is None else split.y[start:stop])


def _finite_or_none(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


@torch.no_grad()
def evaluate_density(model: nn.Module, bundle: DataBundle, eval_cfg: EvalConfig,
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Test metrics of a :class:`~fastcnf.models.FlowModel` on ``bundle.test``.

    Returns ``test_nll_nats`` (per example; the conditional NLL ``-log p(x | y)`` for conditional
    models), ``test_bits_per_dim`` (images, else None), ``test_examples``, ``eval_nfe_forward``
    (per batch), ``eval_tol`` and ``eval_probes``; with ``eval.probes > 1`` and a Hutchinson
    estimator each example's log-density is the mean over that many independent probes, and
    ``test_nll_stderr_nats`` (``test_bits_per_dim_stderr``) is the standard error of the mean test
    NLL over the probes; for a class-conditional prior also ``test_error``,
    ``test_nll_conditional_nats``, ``test_nll_marginal_nats`` (``-log sum_y p(x | y) p(y)``) and,
    for images, ``test_bits_per_dim_conditional`` / ``_marginal``; for learned tolerances the
    gates' mean tolerance on the test set (:func:`tolerance_metrics`).
    """
    was_training = model.training
    model.eval()
    prior = model.prior
    conditional = getattr(prior, "conditional", False)
    policy = getattr(model, "tolerance_policy", None)
    if policy is not None:
        policy.eval_records = []
    sums = {"cond": 0.0, "marg": 0.0, "errors": 0.0}
    count, nfe_f, batches = 0, 0, 0
    # several Hutchinson probes per example only where the estimate is stochastic
    stochastic = any(not isinstance(b.divergence, ExactTrace) for b in model.cnf_blocks()) \
        if hasattr(model, "cnf_blocks") else False
    probes = eval_cfg.probes if stochastic else 1
    probe_sums = torch.zeros(probes, dtype=torch.float64)
    # tables trained standardised: log p(x) = log p(u) + log |du/dx| (nats in the data's own units)
    log_jac = bundle.standardizer.log_abs_det if bundle.standardizer is not None else 0.0
    with fork_rng(eval_cfg.seed):
        gen = torch.Generator(device="cpu").manual_seed(eval_cfg.seed)
        n_batches = -(-(len(bundle.test) if eval_cfg.max_examples <= 0 else min(eval_cfg.max_examples,
                                                                             len(bundle.test))) // eval_cfg.batch_size)
        for xb, yb in test_batches(bundle.test, eval_cfg.max_examples, eval_cfg.batch_size):
            set_status(f"test batch {batches + 1}/{n_batches}")  # shown by an evaluation's progress lines
            x = dequantize(xb, bundle.levels, generator=gen) if bundle.is_image else model_scale(bundle, xb)
            x = x.to(device, dtype)
            b = x.shape[0]
            labels = model.check_label(yb, b) if yb is not None else None
            if probes > 1:  # each example `probes` times: independent Hutchinson probes in one solve
                x = x.repeat(probes, *([1] * (x.dim() - 1)))
                labels = None if labels is None else labels.repeat(probes)
            z, logdet = model(x)
            lp = (prior.log_prob(z, labels) + logdet).double().reshape(probes, b) + log_jac
            probe_sums += lp.sum(1).cpu()  # the sums stay on the CPU whatever the model's device
            sums["cond"] += float(lp.mean(0).sum())
            if conditional and labels is not None:
                marg = (prior.marginal_log_prob(z) + logdet).double().reshape(probes, b).mean(0) + log_jac
                sums["marg"] += float(marg.sum())
                scores = prior.classify(z).double().reshape(probes, b, -1).mean(0)
                sums["errors"] += float((scores.argmax(1) != labels[:b]).sum())
            count += b
            nfe_f += model.nfe_last()[0]
            batches += 1
    model.train(was_training)
    n = max(count, 1)
    mean_lp = sums["cond"] / n

    def bpd(lp: float) -> float | None:
        if not bundle.is_image:
            return None
        return float(bits_per_dim_from_log_prob(torch.tensor(lp), bundle.dim, bundle.levels))

    metrics: dict[str, Any] = {"test_nll_nats": -mean_lp, "test_bits_per_dim": bpd(mean_lp),
                               "test_examples": count, "eval_nfe_forward": nfe_f / max(batches, 1),
                               "eval_tol": eval_cfg.atol, "eval_probes": probes}
    if probes > 1:  # standard error of the Hutchinson estimate of the mean test NLL (and bits/dim)
        stderr = float((probe_sums / n).std(unbiased=True)) / math.sqrt(probes)
        metrics["test_nll_stderr_nats"] = stderr
        if bundle.is_image:
            metrics["test_bits_per_dim_stderr"] = stderr / (bundle.dim * math.log(2.0))
    if conditional and bundle.test.y is not None:
        marg = sums["marg"] / n
        metrics.update(test_error=sums["errors"] / n, test_nll_conditional_nats=-mean_lp,
                       test_nll_marginal_nats=-marg)
        if bundle.is_image:
            metrics.update(test_bits_per_dim_conditional=bpd(mean_lp), test_bits_per_dim_marginal=bpd(marg))
    if policy is not None:
        metrics.update(tolerance_metrics(policy))
    if conditional and bundle.train.y is not None and eval_cfg.sample_accuracy_per_class > 0:
        with fork_rng(eval_cfg.seed + 1):
            metrics["sample_accuracy"] = sample_accuracy(model, bundle, eval_cfg.sample_accuracy_per_class,
                                                         eval_cfg.batch_size)
    return _finite_or_none(metrics)


@torch.no_grad()
def sample_accuracy(model: nn.Module, bundle: DataBundle, per_class: int, batch_size: int = 1000) -> float:
    """Share of class-conditional samples that an independent classifier assigns to the label they
    were drawn for: ``per_class`` samples of every label, classified by a logistic regression
    (scikit-learn) fitted on the training split (images in the model's [0, 1) scale)."""
    from sklearn.linear_model import LogisticRegression

    x_train = (bundle.train.x if bundle.is_image else model_scale(bundle, bundle.train.x)).double()
    if bundle.is_image:
        x_train = (x_train + 0.5) / bundle.levels
    clf = LogisticRegression(max_iter=2000).fit(x_train.reshape(len(x_train), -1).numpy(), bundle.train.y.numpy())
    was_training = model.training
    model.eval()
    correct = total = 0
    labels = torch.arange(model.prior.num_classes).repeat_interleave(per_class)
    for y in labels.split(batch_size):
        x = model.sample(len(y), y).double().cpu()
        correct += int((clf.predict(x.reshape(len(x), -1).numpy()) == y.numpy()).sum())
        total += len(y)
    model.train(was_training)
    return correct / max(total, 1)


def tolerance_metrics(policy) -> dict[str, Any]:
    """Per block: mean and spread of the gates' log10 tolerance over the evaluation batches and the
    tolerance actually used (``10**mu`` clamped to [min_tol, max_tol]); InfoCNF Figure 2b."""
    out: dict[str, Any] = {}
    for i, name in enumerate(policy.names):
        mus = [mu for j, mu, _ in policy.eval_records if j == i]
        sig = [s for j, _, s in policy.eval_records if j == i]
        if mus:
            out[name] = {"test_log10_tol_mean": float(np.mean(mus)), "test_log10_tol_sigma": float(np.mean(sig)),
                         "test_mean_tol": policy.clamp(10 ** min(float(np.mean(mus)), 0.0)), "batches": len(mus)}
    return {"tolerances": out, "tolerance_eval": policy.eval_mode}
