"""The configuration section of this method: :class:`FlowMatchingConfig`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fastcnf.config import ConfigError, Section

__all__ = ["FlowMatchingConfig"]


@dataclass
class FlowMatchingConfig(Section):
    """Flow matching (``train.objective: flow_matching``): the CNF's network regresses onto the
    velocity of a probability path between data (t = 0) and the prior (t = 1) (Lipman et al. 2023,
    "Flow Matching for Generative Modeling"; Tong et al. 2024, "Improving and generalizing
    flow-based generative models with minibatch optimal transport"). No ODE is solved in training;
    the trained model is an ordinary CNF, evaluated by exact or Hutchinson likelihood like any other.

    Attributes:
        path: ``cfm`` (independent conditional flow matching: straight paths with constant
            ``sigma``) or ``ot`` (Lipman et al.'s optimal-transport path with ``sigma_min``).
        sigma: cfm: standard deviation of the Gaussian around each straight path.
        sigma_min: ot: width of the path's end at the data.
        coupling: ``independent`` pairs, ``exact`` minibatch optimal transport (Hungarian
            algorithm on squared distances) or ``sinkhorn`` (entropic OT; needs the POT package).
        sinkhorn_reg: sinkhorn: entropic regularisation, relative to the mean squared cost.
        sinkhorn_solver: sinkhorn: ``pot`` (POT's ``ot.sinkhorn``, on the CPU) or ``torch`` (fastcnf's
            log-domain iteration on the batch's device, no POT needed).
        ot_batch_size: exact / sinkhorn: pair within consecutive groups of this many examples of
            the batch (0: the whole batch); a batch of 1024 with groups of 256 costs four 256x256
            assignments instead of one 1024x1024 (Tong et al. 2024 solve OT per minibatch).
        background_pairing: exact: pair the next batch in a worker thread while the current step
            runs (scipy's assignment releases the interpreter lock); the pairs are those pairing in
            line gives. The exact coupling draws each step's noise from a generator seeded by
            (seed, iteration), so the next batch's noise is known ahead and resume stays bit-identical.
            Off by default (``toy-otcfm`` turns it on: 1.55x faster to metrics.json on an idle 2-core
            machine with two workers, 3% slower with both cores already busy).
        pairing_workers: background_pairing: worker threads, and batches paired ahead (1: the next
            one). An assignment dearer than a step (256x256 exact OT against a small MLP's step)
            needs ``w`` workers on free cores to stay off the critical path while it costs less
            than ``w`` steps.
        time_sampling: ``uniform`` on [0, 1] or ``logit_normal``.
        class_separation: class-conditional runs (``conditioning.kind: ccnf``): norm of each class's
            fixed source mean (random directions, one per class); the source of class y is
            N(mu_y, I) and labels are read back by Bayes' rule.
    """

    _key = "flow_matching"
    path: Literal["cfm", "ot"] = "cfm"
    sigma: float = 0.0
    sigma_min: float = 1e-4
    coupling: Literal["independent", "exact", "sinkhorn"] = "independent"
    sinkhorn_reg: float = 0.05
    sinkhorn_solver: Literal["pot", "torch"] = "pot"
    ot_batch_size: int = 0
    background_pairing: bool = False
    pairing_workers: int = 2
    time_sampling: Literal["uniform", "logit_normal"] = "uniform"
    class_separation: float = 4.0

    def check(self) -> None:
        if self.sigma < 0 or self.sigma_min < 0:
            raise ConfigError("flow_matching.sigma and flow_matching.sigma_min must be >= 0")
        self._positive("sinkhorn_reg", "class_separation", "pairing_workers")  # the loader checks it is an integer
        if isinstance(self.ot_batch_size, bool) or int(self.ot_batch_size) < 0:
            raise ConfigError(f"flow_matching.ot_batch_size must be an integer >= 0, got {self.ot_batch_size!r}")
