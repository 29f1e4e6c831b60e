"""Flow matching as a method: conditional flow matching (CFM), OT-CFM and class-conditional flow
matching, trained without ODE solves and evaluated by exact likelihood like any CNF.

``train.objective: flow_matching`` turns it on; its section is
:class:`~fastcnf.flow_matching.config.FlowMatchingConfig`. The package: :mod:`~.paths` (probability
paths and time sampling), :mod:`~.pairing` (minibatch optimal-transport pairing), :mod:`~.loss`
(the regression loss), :mod:`~.objective` (the training objective). Docs: docs/flow_matching.md.

References: Lipman et al. 2023, "Flow Matching for Generative Modeling"; Tong et al. 2024,
"Improving and generalizing flow-based generative models with minibatch optimal transport".
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
from torch import nn

from fastcnf.cnf.endtime import FixedEndTime
from fastcnf.config import ConfigError, SolverConfig
from fastcnf.flow_matching.config import FlowMatchingConfig
from fastcnf.flow_matching.objective import FlowMatching
from fastcnf.flow_matching.pairing import BackgroundPairing, ExactOTCoupling
from fastcnf.method import Hook, Method
from fastcnf.priors import ClassConditionalGaussian

__all__ = ["FLOW_MATCHING", "FlowMatchingMethod"]

#: the training solver's options: flow matching solves nothing in training (evaluation uses eval.*)
_TRAINING_SOLVER = ("atol", "rtol", "gradient", "memory_budget", "adjoint_atol", "adjoint_rtol", "backward_precision")


class FlowMatchingMethod(Method):
    """The flow-matching method (see the module docstring)."""

    name = "flow_matching"
    section = FlowMatchingConfig
    docs = "docs/flow_matching.md"
    objectives = {"flow_matching": FlowMatching}

    def check(self, cfg: Any) -> None:
        """Flow matching trains one CNF block on the path from data (t = 0) to the prior (t = 1)."""
        if cfg.train.objective != "flow_matching":
            return
        m = cfg.model
        problems = [
            (cfg.task != "density", f"task={cfg.task!r} (only density models)"),
            (m.arch not in ("mlp", "unet"), f"model.arch={m.arch!r} (use mlp for vectors, unet for images)"),
            (m.num_blocks != 1, f"model.num_blocks={m.num_blocks} (one CNF block)"),
            (m.end_time != 1.0, f"model.end_time={m.end_time} (the path runs over [0, 1])"),
            (m.kinetic_weight > 0 or m.jacobian_weight > 0, "RNODE regularisers (they need solves)"),
            (cfg.parts.enabled, "parts.enabled (no flow to cut)"),
        ]
        for bad, what in problems:
            if bad:
                raise ConfigError(f"train.objective=flow_matching does not go with {what}")
        # options that would silently do nothing
        default = SolverConfig()
        for key in _TRAINING_SOLVER:
            if getattr(cfg.solver, key) != getattr(default, key):
                raise ConfigError(f"solver.{key}={getattr(cfg.solver, key)!r} has no effect under "
                                  "train.objective=flow_matching (nothing is solved in training; evaluation "
                                  "uses eval.atol / eval.rtol): remove it")
        beta_default = next(f.default for f in fields(cfg.conditioning) if f.name == "beta")
        if cfg.conditioning.beta != beta_default:
            raise ConfigError(f"conditioning.beta={cfg.conditioning.beta!r} has no effect under "
                              "train.objective=flow_matching (no latent for a classifier: labels are read back "
                              "by Bayes' rule from the class-conditional source): remove it")

    def hook(self, cfg: Any) -> Hook | None:
        f = cfg.flow_matching
        if cfg.train.objective == "flow_matching" and f.coupling == "exact" and f.background_pairing:
            return BackgroundPairingHook()
        return None

    def attach(self, cfg: Any, model: nn.Module) -> None:
        if cfg.train.objective != "flow_matching":
            return
        for block in model.cnf_blocks():
            p = block.end_time_policy
            if type(p) is not FixedEndTime or p.end_time.requires_grad:
                raise ConfigError(f"train.objective=flow_matching does not go with a learned or random end time "
                                  f"({type(p).__name__} on block {block.name!r}; the path runs over [0, 1])")
        prior = model.prior
        if isinstance(prior, ClassConditionalGaussian):
            if prior.cond_size != prior.dim:
                raise ConfigError("train.objective=flow_matching conditions the whole latent: the source of class y "
                                  "is a Gaussian on all of z (CCNF's prior), not on a part of it (InfoCNF's z_y)")
            # a fixed class-conditional source
            prior.fix_class_means(cfg.flow_matching.class_separation, torch.Generator().manual_seed(cfg.seed + 31))


class BackgroundPairingHook(Hook):
    """``flow_matching.background_pairing``: while a step trains on its batch, worker threads
    (``flow_matching.pairing_workers``) pair the next batches (exact minibatch OT), read ahead with
    ``trainer.peek_batch`` and the noise of their iterations; the objective takes a result when its
    inputs are the same tensors and pairs in line otherwise, so the pairs are those of pairing in
    line."""

    name = "flow_matching_pairing"
    objective: FlowMatching | None = None  #: the objective whose pairing runs in the background

    @property
    def background(self) -> BackgroundPairing | None:
        return None if self.objective is None else self.objective.background

    def setup(self, trainer) -> None:
        objective = getattr(trainer.task, "objective", None)
        if not isinstance(objective, FlowMatching) or trainer.cfg.train.accumulation_steps != 1:
            return  # micro-batches are paired in line

        def upcoming(ahead: int):
            if trainer.iteration + ahead >= trainer.cfg.train.iterations:
                return None  # past the last step: nothing to pair
            x, y = trainer.peek_batch(ahead)
            h, noise, groups, _ = objective.pairing_inputs(trainer.model, x, y, trainer.iteration + ahead)
            return h, noise, groups

        objective.background = BackgroundPairing(objective.coupling, upcoming=upcoming,
                                                 workers=trainer.cfg.flow_matching.pairing_workers)
        self.objective = objective

    def start_note(self, trainer) -> str:
        if self.background is None:
            return ""
        w = self.background.workers
        return f"exact OT pairs computed {w} batch{'es' * (w > 1)} ahead in {w} worker thread{'s' * (w > 1)}"

    def eval_metrics(self, trainer) -> dict[str, Any]:
        return {} if self.background is None else {"pairings_prefetched": self.background.prefetched}


FLOW_MATCHING = FlowMatchingMethod()
