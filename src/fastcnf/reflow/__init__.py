"""Straight flows and few-step generation: reflow (rectified flow) and distillation.

Liu et al. 2023, "Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified
Flow": a trained flow's own (noise, sample) pairs (:mod:`fastcnf.reflow.pairs`) are the coupling
of the next flow-matching run, trained on the straight path between them by the one trainer
(:mod:`fastcnf.reflow.hook` supplies the pairs); repeated, the flow straightens (k-rectified
flows) and a few Euler steps suffice. Distillation trains only at the k Euler grid times
(:class:`fastcnf.reflow.hook.GridTime`). :mod:`fastcnf.reflow.pipeline` runs both from a run
directory (``fastcnf reflow``, ``fastcnf distill``).
"""
from fastcnf.reflow.hook import GridTime, PairsSource
from fastcnf.reflow.pairs import generate_pairs, load_pairs

__all__ = ["GridTime", "PairsSource", "generate_pairs", "load_pairs"]
