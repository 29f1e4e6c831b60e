"""Straight flows and few-step generation: reflow (rectified flow) and distillation.

Liu et al. 2023, "Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified
Flow": a trained flow's own (noise, sample) pairs (:mod:`fastcnf.reflow.pairs`) are the coupling
of the next flow-matching run, trained on the straight path between them by the one trainer
(:mod:`fastcnf.reflow.hook` supplies the pairs); repeated, the flow straightens (k-rectified
flows) and a few Euler steps suffice. Distillation trains only at the k Euler grid times
(:class:`fastcnf.reflow.hook.GridTime`). :mod:`fastcnf.pipelines.reflow` runs both from a run
directory (``fastcnf reflow``, ``fastcnf distill``). Docs: docs/reflow.md.
"""
from __future__ import annotations

from typing import Any

from fastcnf.method import Hook, Method
from fastcnf.reflow.config import ReflowConfig
from fastcnf.reflow.hook import GridTime, PairsSource
from fastcnf.reflow.pairs import generate_pairs, load_pairs

__all__ = ["REFLOW", "ReflowMethod", "GridTime", "PairsSource", "generate_pairs", "load_pairs"]


class ReflowMethod(Method):
    """Reflow and distillation: the pairs of ``reflow.pairs`` as each step's batch."""

    name = "reflow"
    section = ReflowConfig
    docs = "docs/reflow.md"

    def hook(self, cfg: Any) -> Hook | None:
        return PairsSource(cfg) if cfg.reflow.pairs else None


REFLOW = ReflowMethod()
