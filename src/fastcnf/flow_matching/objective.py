"""Flow matching as a training objective (``train.objective: flow_matching``).

Regression of the CNF block's dynamics onto a probability path's velocity between the data
(t = 0) and the prior (t = 1), no ODE solve (Lipman et al. 2023, "Flow Matching for Generative
Modeling"; Tong et al. 2024, "Improving and generalizing flow-based generative models with minibatch
optimal transport"). The flow's fixed preprocessing steps run first; the source of a
class-conditional model is its class-conditional prior, drawn per label. A data source may hand
over the noise paired with each example (``ctx["noise"]``, kept as paired: no fresh noise, no
re-pairing) and its own time sampler (``ctx["time_sampler"]``): reflow and distillation
(:mod:`fastcnf.reflow`).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from fastcnf.cnf.block import CNFBlock
from fastcnf.config import ConfigError
from fastcnf.data.base import DataBundle
from fastcnf.flow_matching.config import FlowMatchingConfig
from fastcnf.flow_matching.loss import flow_matching_loss
from fastcnf.flow_matching.pairing import (BackgroundPairing, Coupling, ExactOTCoupling, IndependentCoupling,
                                           SinkhornCoupling)
from fastcnf.flow_matching.paths import (IndependentCFMPath, LipmanOTPath, LogitNormalTime, ProbabilityPath,
                                         TimeSampler, UniformTime)
from fastcnf.method import StepContext
from fastcnf.models.flow_model import FlowModel

__all__ = ["FlowMatching"]

#: ``flow_matching.path`` -> the conditional probability path
_PATHS: dict[str, Callable[[FlowMatchingConfig], ProbabilityPath]] = {
    "cfm": lambda f: IndependentCFMPath(f.sigma),
    "ot": lambda f: LipmanOTPath(f.sigma_min),
}
#: ``flow_matching.coupling`` -> how data and noise are paired within a batch
_PAIRINGS: dict[str, Callable[[FlowMatchingConfig], Coupling]] = {
    "independent": lambda f: IndependentCoupling(),
    "exact": lambda f: ExactOTCoupling(),
    "sinkhorn": lambda f: SinkhornCoupling(epsilon=f.sinkhorn_reg,
                                           method="torch" if f.sinkhorn_solver == "torch" else "auto"),
}
#: ``flow_matching.time_sampling`` -> the distribution of t
_TIMES: dict[str, Callable[[], TimeSampler]] = {"uniform": UniformTime, "logit_normal": LogitNormalTime}


class FlowMatching:
    """The conditional flow-matching loss of the model's one CNF block (see the module docstring).

    Fills ``loss`` (mean squared velocity error per coordinate), ``nll`` (NaN: no likelihood is
    computed in training) and ``labels``; the block's NFE record is zero (nothing is solved).
    """

    #: the step maps no data to a latent (a classifier on the latent has nothing to read)
    computes_latent = False
    #: trains on given (example, noise) pairs when the step context holds ``noise`` (reflow)
    trains_on_pairs = True

    def __init__(self, cfg: Any, bundle: DataBundle) -> None:
        f = cfg.flow_matching
        self.path = _PATHS[f.path](f)
        self.coupling = _PAIRINGS[f.coupling](f)
        self.time_sampler = _TIMES[f.time_sampling]()
        self.ot_batch_size = int(f.ot_batch_size)
        self.seed = int(cfg.seed)
        #: a :class:`~fastcnf.flow_matching.pairing.BackgroundPairing` set by the method's hook
        #: (``flow_matching.background_pairing``); None: pair in line
        self.background: BackgroundPairing | None = None

    def _block(self, model: FlowModel) -> CNFBlock:
        steps = list(model.flow.steps)
        if not steps or not isinstance(steps[-1], CNFBlock) or len(model.cnf_blocks()) != 1:
            raise ConfigError("train.objective=flow_matching needs a flow that ends in its only CNF block "
                              "(model.arch mlp or unet)")
        return steps[-1]

    def noise_generator(self, iteration: int, device: torch.device) -> torch.Generator | None:
        """The exact coupling's noise source of step ``iteration``: a generator seeded by (seed,
        iteration, rank), so the noise of any step is known ahead (background pairing) and a
        resumed run draws what the uninterrupted one drew. Other couplings: None (the global RNG)."""
        if not isinstance(self.coupling, ExactOTCoupling):
            return None
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        seed = (self.seed * 1_000_003 + int(iteration) * 8191 + rank * 131 + 17) % (2 ** 63)
        return torch.Generator(device=device).manual_seed(seed)

    def pairing_inputs(self, model: FlowModel, x: torch.Tensor, y: torch.Tensor | None, iteration: int,
                       noise: torch.Tensor | None = None):
        """``(h, noise, groups, labels)`` of a batch: the block's input, the source batch, the pairing
        groups (classes and ``ot_batch_size`` chunks) and the checked labels."""
        steps = list(model.flow.steps)
        labels = model.check_label(y, x.shape[0]) if y is not None else None
        with torch.no_grad():  # fixed preprocessing (e.g. centring) before the block
            h = model.flow.forward_range(x, 0, len(steps) - 1)[0]
        if noise is None:
            noise = model.prior.sample(x.shape[0], labels, generator=self.noise_generator(iteration, x.device),
                                       device=x.device, dtype=x.dtype)
        noise = noise.to(h).reshape(h.shape)
        groups = labels
        if 0 < self.ot_batch_size < x.shape[0]:  # pair within consecutive groups (and classes)
            groups = torch.arange(x.shape[0], device=x.device) // self.ot_batch_size
            if labels is not None:
                groups = labels.reshape(-1) * (groups.max() + 1) + groups
        return h, noise, groups, labels

    def __call__(self, model: FlowModel, ctx: StepContext) -> None:
        block = self._block(model)
        x, y = ctx["x"], ctx["y"]
        given = ctx.get("noise")
        h, noise, groups, labels = self.pairing_inputs(model, x, y, ctx.get("iteration", 0), given)
        coupling = self.coupling if self.background is None else self.background
        if given is not None:  # a data source that pairs each example with its noise (reflow): keep the pairs
            coupling = IndependentCoupling()
        model.reset_nfe()
        time_sampler = ctx.get("time_sampler", self.time_sampler)
        loss = flow_matching_loss(block.net, h, noise, self.path, coupling, time_sampler, labels=groups)
        ctx.update(labels=labels, loss=loss, nll=torch.tensor(math.nan))
