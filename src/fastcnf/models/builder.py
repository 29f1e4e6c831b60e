"""Build the model a configuration describes (one table of architectures, no if/elif sprawl)."""
from __future__ import annotations

from typing import Callable

from torch import nn

from fastcnf.cnf.block import CNFBlock
from fastcnf.cnf.divergence import ExactTrace, Hutchinson
from fastcnf.cnf.dynamics import ConcatSquashConvNet, ConcatSquashMLP
from fastcnf.cnf.endtime import EndTimePolicy, FixedEndTime
from fastcnf.cnf.regularizers import JacobianFrobenius, KineticEnergy
from fastcnf.flows.glow import build_glow
from fastcnf.flows.multiscale import build_multiscale
from fastcnf.flows.sequential import SequentialFlow
from fastcnf.models.flow_model import FlowModel
from fastcnf.priors import Prior, StandardNormal

__all__ = ["build_model", "ARCHITECTURES", "PRIOR_BUILDERS", "END_TIME_BUILDERS"]

#: prior builders ``(cfg, flow, bundle) -> Prior | None``, tried in order; the first non-None wins
PRIOR_BUILDERS: list[Callable] = []
#: end-time policy builders ``(cfg, name) -> EndTimePolicy | None``, tried in order
END_TIME_BUILDERS: list[Callable] = []


def _end_time(cfg, name: str) -> EndTimePolicy:
    for build in END_TIME_BUILDERS:
        policy = build(cfg, name)
        if policy is not None:
            return policy
    return FixedEndTime(cfg.model.end_time, learnable=cfg.model.train_end_time)


def make_block_factory(cfg, image: bool, per_dim_loss: bool | None = None) -> Callable[[int, str], CNFBlock]:
    """CNF blocks for ``cfg``; ``per_dim_loss`` (the loss is bits/dim) resolves
    ``model.regularizer_reduction=auto`` to ``mean`` (default: ``image``)."""
    m = cfg.model
    reduction = m.regularizer_reduction
    if reduction == "auto":
        reduction = "mean" if (image if per_dim_loss is None else per_dim_loss) else "sum"
    eval_solver = cfg.solver.with_tolerance(cfg.eval.atol, cfg.eval.rtol)

    def make(channels: int, name: str) -> CNFBlock:
        if image:
            net: nn.Module = ConcatSquashConvNet(channels, m.hidden_dims, m.activation)
        else:
            net = ConcatSquashMLP(channels, m.hidden_dims, m.activation)
        div = ExactTrace(m.exact_mode) if m.divergence == "exact" else Hutchinson(m.noise)
        regs = []
        if m.kinetic_weight > 0:
            regs.append(KineticEnergy(m.kinetic_weight, reduction))
        if m.jacobian_weight > 0:
            regs.append(JacobianFrobenius(m.jacobian_weight, reduction))
        return CNFBlock(net, div, cfg.solver, _end_time(cfg, name), regs, eval_solver=eval_solver, name=name)

    return make


def _mlp(cfg, bundle) -> SequentialFlow:
    if len(bundle.shape) != 1:
        raise ValueError(f"model.arch=mlp needs vector data, got shape {bundle.shape}; use multiscale or glow")
    make = make_block_factory(cfg, image=False, per_dim_loss=bundle.is_image)
    blocks = [make(bundle.shape[0], f"cnf{i}") for i in range(cfg.model.num_blocks)]
    return SequentialFlow(blocks, bundle.shape)


def _multiscale(cfg, bundle) -> SequentialFlow:
    if len(bundle.shape) != 3:
        raise ValueError(f"model.arch=multiscale needs images (C, H, W), got shape {bundle.shape}")
    return build_multiscale(bundle.shape, make_block_factory(cfg, image=True, per_dim_loss=bundle.is_image), cfg.model.n_scales,
                            cfg.model.num_blocks, cfg.model.logit_alpha)


def _glow(cfg, bundle) -> SequentialFlow:
    if len(bundle.shape) != 3:
        raise ValueError(f"model.arch=glow needs images (C, H, W), got shape {bundle.shape}")
    m = cfg.model
    alpha = m.logit_alpha if m.glow_preprocess == "logit" else None  # logit_alpha only applies to logit
    return build_glow(bundle.shape, m.glow_levels, m.glow_steps, m.glow_hidden, m.glow_lu, m.glow_preprocess, alpha)


#: architecture name -> ``(cfg, bundle) -> SequentialFlow``
ARCHITECTURES: dict[str, Callable] = {"mlp": _mlp, "multiscale": _multiscale, "glow": _glow}


def build_prior(cfg, flow: SequentialFlow, bundle) -> Prior:
    for build in PRIOR_BUILDERS:
        prior = build(cfg, flow, bundle)
        if prior is not None:
            return prior
    return StandardNormal(flow.latent_dim, flow.latent_sizes)


def build_model(cfg, bundle) -> FlowModel:
    """The :class:`FlowModel` of ``cfg.model`` for the data set ``bundle``."""
    from fastcnf.training import features  # noqa: F401  (registers feature priors / end-time policies)

    if cfg.model.arch not in ARCHITECTURES:
        raise ValueError(f"unknown model.arch {cfg.model.arch!r}; available: {', '.join(ARCHITECTURES)}")
    flow = ARCHITECTURES[cfg.model.arch](cfg, bundle)
    return FlowModel(flow, build_prior(cfg, flow, bundle), levels=bundle.levels)
