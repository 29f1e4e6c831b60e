"""Gradient accumulation: a batch in micro-batches whose gradients sum to the whole batch's.

Each process splits its batch into ``train.accumulation_steps`` micro-batches and back-propagates
``(n_k / n) * loss_k``; because the loss is a mean, ``sum_k (n_k / n) grad loss_k = grad loss`` of
the whole batch (exact, up to rounding). ``train.batch_size`` stays the *global* batch of one
optimiser step (Nguyen et al. 2019, "InfoCNF", §4.5: batch 8,000; Nguyen et al., "On Mixed
Conditional FFJORD with Large-Batch Training", §3).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastcnf.config import ConfigError

__all__ = ["check_large_batch", "split_micro", "merge_contexts"]


def check_large_batch(cfg, world_size: int) -> None:
    """The global batch must split evenly into ``world_size`` shards of ``accumulation_steps``
    micro-batches (otherwise the averaged gradient is not the full-batch gradient)."""
    t = cfg.train
    parts = world_size * t.accumulation_steps
    if t.batch_size % parts:
        raise ConfigError(
            f"train.batch_size={t.batch_size} must be divisible by world_size x train.accumulation_steps "
            f"= {world_size} x {t.accumulation_steps} = {parts} (equal shards give the exact full-batch gradient)")


def split_micro(ctx: dict, steps: int) -> list[tuple[float, dict]]:
    """``steps`` contiguous micro-batch contexts of ``ctx`` with their share ``n_k / n``; every
    other key of ``ctx`` (what ``before_step`` hooks put there) is shared."""
    x, y = ctx["x"], ctx["y"]
    n = x.shape[0]
    out = []
    for xs, idx in zip(torch.tensor_split(x, steps), torch.tensor_split(torch.arange(n), steps)):
        micro = type(ctx)(ctx)
        micro["x"] = xs
        micro["y"] = None if y is None else y[idx[0]:idx[-1] + 1]
        out.append((xs.shape[0] / n, micro))
    return out


def merge_contexts(ctx: dict, micros: list[tuple[float, dict]]) -> None:
    """Fold micro-batch results back into ``ctx``: 0-d float tensors become their share-weighted
    sum (the full-batch mean: loss, nll, bits/dim), per-example tensors are concatenated
    (detached), ``terms`` are merged the same way, anything else takes the last micro-batch's."""
    n = ctx["x"].shape[0]
    keys = [k for k in micros[-1][1] if k not in ("x", "y")]
    for k in keys:
        vals = [m.get(k) for _, m in micros]
        v0 = vals[-1]
        if k == "terms" and isinstance(v0, dict):
            ctx[k] = {tk: sum(w * m["terms"][tk].detach() for w, m in micros) for tk in v0}
        elif isinstance(v0, Tensor) and all(isinstance(v, Tensor) for v in vals):
            if v0.dim() == 0 and v0.is_floating_point():
                ctx[k] = sum(w * v.detach() for (w, _), v in zip(micros, vals))
            elif v0.dim() >= 1 and sum(v.shape[0] for v in vals) == n:
                ctx[k] = torch.cat([v.detach() for v in vals])
            else:
                ctx[k] = v0
        else:
            ctx[k] = v0
