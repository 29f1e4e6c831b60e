"""Training objectives of flows (``train.objective``).

* ``likelihood`` — maximum likelihood through the ODE solves (Grathwohl et al. 2019, "FFJORD"):
  ``ctx["loss"] = -mean log p(x | y)``; a hook may replace the forward pass (training by parts:
  ``ctx["objective"](model, x)`` returns the ``(z, logdet)`` of a truncated flow).
* ``flow_matching`` — regression of the CNF block's dynamics onto a probability path's velocity
  between the data (t = 0) and the prior (t = 1), no ODE solve (Lipman et al. 2023, "Flow Matching
  for Generative Modeling"; Tong et al. 2024, "Improving and generalizing flow-based generative
  models with minibatch optimal transport"). The flow's fixed preprocessing steps run first; the
  source of a class-conditional model is its class-conditional prior, drawn per label.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from fastcnf.cnf.block import CNFBlock
from fastcnf.cnf.coupling import COUPLINGS
from fastcnf.cnf.flow_matching import flow_matching_loss
from fastcnf.cnf.paths import IndependentCFMPath, LipmanOTPath, TIME_SAMPLERS
from fastcnf.config import Config, ConfigError
from fastcnf.data.base import DataBundle
from fastcnf.models.flow_model import FlowModel
from fastcnf.training.hooks import StepContext

__all__ = ["Likelihood", "FlowMatching", "OBJECTIVES"]


class Likelihood:
    """``-log p(x | y)`` by the change of variables; fills ``z``, ``logdet``, ``log_prob``,
    ``labels``, ``nll`` and ``loss`` (nats; the density task turns it into bits/dim on images)."""

    def __init__(self, cfg: Config, bundle: DataBundle) -> None:
        self.cfg, self.bundle = cfg, bundle

    def __call__(self, model: FlowModel, ctx: StepContext) -> None:
        x, y = ctx["x"], ctx["y"]
        # training by parts: the loss is the truncated objective, in bits/dim normalised by the
        # FULL data dimension (Bhatt & Inouye 2021, "Learning Flows by Parts")
        forward = ctx.get("objective")
        z, logdet = forward(model, x) if forward is not None else model(x)
        labels = model.check_label(y, x.shape[0]) if y is not None else None
        log_prob = model.prior.log_prob(z, labels) + logdet
        ctx.update(z=z, logdet=logdet, log_prob=log_prob, labels=labels)
        ctx["nll"] = -log_prob.mean()
        ctx["loss"] = ctx["nll"]


class FlowMatching:
    """The conditional flow-matching loss of the model's one CNF block (see the module docstring).

    Fills ``loss`` (mean squared velocity error per coordinate), ``nll`` (NaN: no likelihood is
    computed in training) and ``labels``; the block's NFE record is zero (nothing is solved).
    """

    def __init__(self, cfg: Config, bundle: DataBundle) -> None:
        f = cfg.flow_matching
        self.path = IndependentCFMPath(f.sigma) if f.path == "cfm" else LipmanOTPath(f.sigma_min)
        kwargs = {"epsilon": f.sinkhorn_reg, "method": "torch" if f.sinkhorn_solver == "torch" else "auto"} \
            if f.coupling == "sinkhorn" else {}
        self.coupling = COUPLINGS[f.coupling](**kwargs)
        self.time_sampler = TIME_SAMPLERS[f.time_sampling]()
        self.ot_batch_size = int(f.ot_batch_size)

    def __call__(self, model: FlowModel, ctx: StepContext) -> None:
        steps = list(model.flow.steps)
        if not steps or not isinstance(steps[-1], CNFBlock) or len(model.cnf_blocks()) != 1:
            raise ConfigError("train.objective=flow_matching needs a flow that ends in its only CNF block "
                              "(model.arch mlp or unet)")
        block = steps[-1]
        x, y = ctx["x"], ctx["y"]
        labels = model.check_label(y, x.shape[0]) if y is not None else None
        with torch.no_grad():  # fixed preprocessing (e.g. centring) before the block
            h = model.flow.forward_range(x, 0, len(steps) - 1)[0]
        noise = model.prior.sample(x.shape[0], labels, device=x.device, dtype=x.dtype).reshape(h.shape)
        model.reset_nfe()
        groups = labels
        if 0 < self.ot_batch_size < x.shape[0]:  # pair within consecutive groups (and classes)
            groups = torch.arange(x.shape[0], device=x.device) // self.ot_batch_size
            if labels is not None:
                groups = labels.reshape(-1) * (groups.max() + 1) + groups
        loss = flow_matching_loss(block.net, h, noise, self.path, self.coupling, self.time_sampler, labels=groups)
        ctx.update(labels=labels, loss=loss, nll=torch.tensor(math.nan))


#: ``train.objective`` -> ``(cfg, bundle) -> objective(model, ctx)``
OBJECTIVES: dict[str, Callable[[Config, DataBundle], Callable[[FlowModel, StepContext], None]]] = {
    "likelihood": Likelihood,
    "flow_matching": FlowMatching,
}
