"""The CCNF / InfoCNF training hook: cross-entropy loss term, classification and marginal metrics,
class-conditional sample grids (002 §2.2 eq. 4; §4.2).

The density task already trains ``-log p(x | y)`` through the conditional prior
(:mod:`fastcnf.conditioning`); this hook adds ``beta * CE(q_theta(z_c), y)`` (002 eq. 4) and, on the
test split, reports

* ``test_nll_conditional_nats``: ``-log p(x | y)`` per example (the same value as the base
  ``test_nll_nats``, which stays the conditional NLL for conditional models),
* ``test_nll_marginal_nats``: ``-log sum_y p(x | y) p(y)``,
* ``test_bits_per_dim_conditional`` / ``test_bits_per_dim_marginal`` (images),
* ``test_error``: the fraction of test examples whose classifier argmax differs from the label.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fastcnf.conditioning import ClassConditionalGaussian
from fastcnf.models.flow_model import bits_per_dim_from_log_prob
from fastcnf.training.hooks import HOOK_BUILDERS, Hook, StepContext

__all__ = ["ConditioningHook", "build_conditioning_hook"]


class ConditioningHook(Hook):
    """Adds ``beta * cross-entropy`` to the loss and the conditional-model metrics (see module doc)."""

    name = "conditioning"

    def __init__(self, beta: float) -> None:
        self.beta = float(beta)
        self._reset()

    def _reset(self) -> None:
        self.count = 0
        self.errors = 0
        self.cond_lp = 0.0
        self.marg_lp = 0.0

    def setup(self, trainer) -> None:
        prior = trainer.model.prior
        if not isinstance(prior, ClassConditionalGaussian):
            raise TypeError(f"conditioning.kind={trainer.cfg.conditioning.kind} needs the class-conditional "
                            f"prior, but the model's prior is {type(prior).__name__}")
        if trainer.bundle.train.y is None and trainer.bundle.sampler is None:
            raise ValueError(f"conditioning needs labels; data set {trainer.bundle.name!r} has none")

    # ---- training ---------------------------------------------------------------------------
    def loss_terms(self, trainer, ctx: StepContext) -> dict[str, Tensor]:
        labels = ctx.get("labels")
        if labels is None:
            raise ValueError("conditioning: the training batch has no labels (data set without labels?)")
        logits = trainer.model.prior.logits(ctx["z"])
        ce = F.cross_entropy(logits, labels)
        ctx["train_error"] = (logits.detach().argmax(1) != labels).double().mean()
        ctx["cross_entropy_raw"] = ce.detach()
        return {"cross_entropy": self.beta * ce}

    def log_columns(self, trainer) -> list[str]:
        return ["cross_entropy", "train_error"]

    def log_values(self, trainer, ctx: StepContext) -> dict[str, Any]:
        return {"train_error": float(ctx["train_error"])} if "train_error" in ctx else {}

    # ---- evaluation -------------------------------------------------------------------------
    def eval_begin(self, trainer) -> None:
        self._reset()

    @torch.no_grad()
    def eval_batch(self, trainer, ctx: StepContext) -> None:
        prior = trainer.model.prior
        z, logdet, labels = ctx["z"], ctx["logdet"], ctx.get("labels")
        if labels is None:
            raise ValueError("conditioning: the test split has no labels")
        cond = prior.log_prob(z, labels) + logdet
        marg = prior.marginal_log_prob(z) + logdet
        pred = prior.logits(z).argmax(1)
        self.count += z.shape[0]
        self.errors += int((pred != labels).sum())
        self.cond_lp += float(cond.double().sum())
        self.marg_lp += float(marg.double().sum())

    def eval_metrics(self, trainer) -> dict[str, Any]:
        n = max(self.count, 1)
        cond, marg = self.cond_lp / n, self.marg_lp / n
        out: dict[str, Any] = {
            "test_error": self.errors / n,
            "test_nll_conditional_nats": -cond,
            "test_nll_marginal_nats": -marg,
            "conditioning": trainer.cfg.conditioning.kind,
        }
        b = trainer.bundle
        if b.is_image:
            for key, lp in (("conditional", cond), ("marginal", marg)):
                out[f"test_bits_per_dim_{key}"] = float(bits_per_dim_from_log_prob(torch.tensor(lp), b.dim, b.levels))
        for k, v in list(out.items()):
            if isinstance(v, float) and not math.isfinite(v):
                out[k] = None
        return out

    # ---- figures ----------------------------------------------------------------------------
    def figures(self, trainer, fig_dir) -> None:
        """``class_conditional_samples.png``: one row per class (images) or points coloured by class."""
        from fastcnf.evaluation.metrics import fork_rng

        model = trainer.model
        prior = model.prior
        k = prior.num_classes
        per_class = 10
        was_training = model.training
        model.eval()
        with fork_rng(trainer.cfg.eval.seed):
            y = torch.arange(k).repeat_interleave(per_class)
            x = model.sample(len(y), y).float().cpu()
        model.train(was_training)
        out = Path(fig_dir) / "class_conditional_samples.png"
        if trainer.bundle.is_image:
            from fastcnf.evaluation.plots import save_image_grid

            save_image_grid(x, out, nrow=per_class, title=f"{trainer.cfg.conditioning.kind}: one row per class")
            return
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 4))
        pts = x.numpy()
        for c in range(k):
            sel = (y == c).numpy()
            if pts.shape[1] >= 2:
                ax.scatter(pts[sel, 0], pts[sel, 1], s=4, label=str(c))
            else:
                ax.hist(pts[sel, 0], bins=30, alpha=0.5, label=str(c))
        ax.legend(fontsize=7)
        fig.savefig(out, dpi=110)
        plt.close(fig)


def build_conditioning_hook(cfg, trainer) -> ConditioningHook | None:
    """HOOK_BUILDERS entry: the hook when ``conditioning.kind`` is ccnf or infocnf."""
    if cfg.conditioning.kind == "none":
        return None
    return ConditioningHook(cfg.conditioning.beta)


if build_conditioning_hook not in HOOK_BUILDERS:
    HOOK_BUILDERS.append(build_conditioning_hook)
