"""Maximum likelihood, the training objective of every flow unless a method provides another.

``ctx["loss"] = -mean log p(x | y)`` by the change of variables through the flow's ODE solves
(Grathwohl et al. 2019, "FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative
Models"). A method may replace the forward pass: training by parts puts a truncated flow under
``ctx["objective"]`` (Bhatt & Inouye 2021, "Learning Flows by Parts").
"""
from __future__ import annotations

from typing import Any

from fastcnf.data.base import DataBundle
from fastcnf.models.flow_model import FlowModel

__all__ = ["Likelihood"]


class Likelihood:
    """``-log p(x | y)``; fills ``z``, ``logdet``, ``log_prob``, ``labels``, ``nll`` and ``loss``
    (nats; the density task turns it into bits/dim on images)."""

    #: the step maps data to a latent ``z`` (a classifier on the latent can read it)
    computes_latent = True

    def __init__(self, cfg: Any, bundle: DataBundle) -> None:
        self.cfg, self.bundle = cfg, bundle

    def __call__(self, model: FlowModel, ctx: dict) -> None:
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
