"""Build the model a configuration describes, from static tables.

Each choice a paper varies is looked up by name: the architecture (:data:`ARCHITECTURES`), the
prior (:data:`PRIORS`), the end-time policy (``fastcnf.cnf.endtime.END_TIME_POLICIES``), the
tolerance policy (:data:`TOLERANCE_POLICIES`) and the regularisers (:data:`REGULARIZERS`). Adding
one is a function and a line in its table; nothing is registered by importing a module.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from fastcnf.cnf.block import CNFBlock
from fastcnf.cnf.concat import ConcatConvNet, ConcatMLP
from fastcnf.cnf.divergence import ExactTrace, Hutchinson
from fastcnf.cnf.dynamics import ConcatSquashConvNet, ConcatSquashMLP
from fastcnf.cnf.endtime import END_TIME_POLICIES, EndTimePolicy
from fastcnf.cnf.regularizers import JacobianFrobenius, KineticEnergy, Regularizer
from fastcnf.cnf.tolerances import LearnedTolerance, per_block_solvers
from fastcnf.cnf.unet import UNetVelocity
from fastcnf.config import Config, ConfigError
from fastcnf.data.base import DataBundle
from fastcnf.flows.glow import Shift, build_glow
from fastcnf.flows.multiscale import build_multiscale
from fastcnf.flows.sequential import SequentialFlow
from fastcnf.models.flow_model import FlowModel
from fastcnf.priors import CONDITIONED_SLICES, LABEL_PRIORS, ClassConditionalGaussian, Prior, StandardNormal

__all__ = ["build_model", "build_flow", "make_block_factory", "ARCHITECTURES", "LAYER_TYPES", "PRIORS",
           "TOLERANCE_POLICIES", "REGULARIZERS"]


# ---------------------------------------------------------------------------------------------
# CNF blocks: dynamics, divergence, end time, regularisers
# ---------------------------------------------------------------------------------------------

def _end_time(cfg: Config, name: str) -> EndTimePolicy:
    return END_TIME_POLICIES[cfg.endtime.policy](cfg.model.end_time, cfg.endtime)


#: ``model.<name>_weight`` -> regulariser class (Finlay et al. 2020, "How to train your neural ODE")
REGULARIZERS: dict[str, Callable[[float, str], Regularizer]] = {
    "kinetic": KineticEnergy,
    "jacobian": JacobianFrobenius,
}


#: ``model.layer_type`` -> ``(vector network, image network)``, each ``(size, hidden_dims, activation)``
LAYER_TYPES: dict[str, tuple[Callable[..., nn.Module], Callable[..., nn.Module]]] = {
    "concatsquash": (ConcatSquashMLP, ConcatSquashConvNet),
    "concat": (ConcatMLP, ConcatConvNet),
}


def _divergence(m) -> ExactTrace | Hutchinson:
    return ExactTrace(m.exact_mode) if m.divergence == "exact" else Hutchinson(m.noise, mode=m.hutchinson_mode)


def make_block_factory(cfg: Config, image: bool, per_dim_loss: bool | None = None,
                       network: Callable[[int], nn.Module] | None = None) -> Callable[[int, str], CNFBlock]:
    """CNF blocks for ``cfg``; ``per_dim_loss`` (the loss is bits/dim) resolves
    ``model.regularizer_reduction=auto`` to ``mean`` (default: ``image``); ``network(channels)``
    replaces the ``model.layer_type`` network (e.g. the U-Net)."""
    m = cfg.model
    reduction = m.regularizer_reduction
    if reduction == "auto":
        reduction = "mean" if (image if per_dim_loss is None else per_dim_loss) else "sum"
    eval_solver = cfg.solver.with_tolerance(cfg.eval.atol, cfg.eval.rtol)

    def make(channels: int, name: str) -> CNFBlock:
        net: nn.Module = network(channels) if network is not None else \
            LAYER_TYPES[m.layer_type][1 if image else 0](channels, m.hidden_dims, m.activation)
        div = _divergence(m)
        regs = [cls(getattr(m, f"{key}_weight"), reduction) for key, cls in REGULARIZERS.items()
                if getattr(m, f"{key}_weight") > 0]
        return CNFBlock(net, div, cfg.solver, _end_time(cfg, name), regs, eval_solver=eval_solver, name=name)

    return make


# ---------------------------------------------------------------------------------------------
# architectures
# ---------------------------------------------------------------------------------------------

def _mlp(cfg: Config, bundle: DataBundle) -> SequentialFlow:
    if len(bundle.shape) != 1:
        raise ConfigError(f"model.arch=mlp needs vector data, got shape {bundle.shape}; use multiscale or glow")
    make = make_block_factory(cfg, image=False, per_dim_loss=bundle.is_image)
    blocks = [make(bundle.shape[0], f"cnf{i}") for i in range(cfg.model.num_blocks)]
    return SequentialFlow(blocks, bundle.shape)


def _multiscale(cfg: Config, bundle: DataBundle) -> SequentialFlow:
    if len(bundle.shape) != 3:
        raise ConfigError(f"model.arch=multiscale needs images (C, H, W), got shape {bundle.shape}")
    make = make_block_factory(cfg, image=True, per_dim_loss=bundle.is_image)
    return build_multiscale(bundle.shape, make, cfg.model.n_scales, cfg.model.num_blocks, cfg.model.logit_alpha)


def _glow(cfg: Config, bundle: DataBundle) -> SequentialFlow:
    if len(bundle.shape) != 3:
        raise ConfigError(f"model.arch=glow needs images (C, H, W), got shape {bundle.shape}")
    m = cfg.model
    alpha = m.logit_alpha if m.glow_preprocess == "logit" else None  # logit_alpha only applies to logit
    return build_glow(bundle.shape, m.glow_levels, m.glow_steps, m.glow_hidden, m.glow_lu, m.glow_preprocess, alpha)


def _unet(cfg: Config, bundle: DataBundle) -> SequentialFlow:
    if len(bundle.shape) != 3:
        raise ConfigError(f"model.arch=unet needs images (C, H, W), got shape {bundle.shape}")
    m = cfg.model
    make = make_block_factory(cfg, image=True, per_dim_loss=bundle.is_image,
                              network=lambda c: UNetVelocity(c, m.unet_channels, m.unet_levels))
    block = make(bundle.shape[0], "cnf")
    return SequentialFlow([Shift(-0.5), block], bundle.shape)


#: ``model.arch`` -> ``(cfg, bundle) -> SequentialFlow``
ARCHITECTURES: dict[str, Callable[[Config, DataBundle], SequentialFlow]] = {
    "mlp": _mlp, "multiscale": _multiscale, "glow": _glow, "unet": _unet,
}


# ---------------------------------------------------------------------------------------------
# priors
# ---------------------------------------------------------------------------------------------

def _standard_normal(cfg: Config, flow: SequentialFlow, bundle: DataBundle) -> Prior:
    return StandardNormal(flow.latent_dim, flow.latent_sizes)


def _class_conditional(cfg: Config, flow: SequentialFlow, bundle: DataBundle) -> Prior:
    c = cfg.conditioning
    if not bundle.num_classes or bundle.train.y is None:
        raise ConfigError(f"conditioning.kind={c.kind} needs a labelled data set; {bundle.name!r} has no labels "
                          "(use e.g. digits, mnist, mnist-test-split, cifar10, mix1d)")
    start, size = CONDITIONED_SLICES[c.kind](list(flow.latent_sizes), c.supervised_fraction, c.placement)
    log_py = LABEL_PRIORS[c.label_prior](bundle.num_classes, bundle.train.y)
    prior = ClassConditionalGaussian(flow.latent_dim, bundle.num_classes, start, size, flow.latent_sizes,
                                     dropout=c.dropout, label_log_prior=log_py, learn_scale=c.learn_scale)
    if cfg.train.objective == "flow_matching":  # a fixed class-conditional source
        prior.fix_class_means(cfg.flow_matching.class_separation, torch.Generator().manual_seed(cfg.seed + 31))
    return prior


#: ``conditioning.kind`` -> ``(cfg, flow, bundle) -> Prior``
PRIORS: dict[str, Callable[[Config, SequentialFlow, DataBundle], Prior]] = {
    "none": _standard_normal, "ccnf": _class_conditional, "infocnf": _class_conditional,
}


# ---------------------------------------------------------------------------------------------
# tolerance policies (Nguyen et al. 2019, "InfoCNF", §3 and Appendix F)
# ---------------------------------------------------------------------------------------------

def _fixed_tolerance(cfg: Config, blocks: list[CNFBlock]) -> nn.Module | None:
    return None  # every block keeps solver.atol / solver.rtol


def _stack_position(blocks: list[CNFBlock]) -> list[int]:
    """0 for the first CNF block of each scale's stack (``scale{i}.cnf0``; the first block of a
    flow without scales), 1 for the others."""
    return [0 if i == 0 or b.name.endswith(".cnf0") else 1 for i, b in enumerate(blocks)]


def _per_block_tolerance(cfg: Config, blocks: list[CNFBlock]) -> nn.Module | None:
    t = cfg.tolerances
    lists = [t.atol, t.rtol, t.adjoint_atol, t.adjoint_rtol]
    if t.layout == "stacks":  # Mixed Conditional FFJORD §3: a tight first block in each stack
        where = _stack_position(blocks)
        lists = [[values[k] for k in where] if values else [] for values in lists]
    solvers = per_block_solvers(cfg.solver, len(blocks), *lists)
    for b, s in zip(blocks, solvers):
        b.solver = s
    return None


def _learned_tolerance(cfg: Config, blocks: list[CNFBlock]) -> nn.Module | None:
    t = cfg.tolerances
    if not blocks:
        raise ConfigError(f"tolerances.policy=learned needs a model with CNF blocks (model.arch={cfg.model.arch!r} "
                          "has none)")
    # adjoint tolerances (optional) per block; the gates choose the forward ones per batch
    for b, s in zip(blocks, per_block_solvers(cfg.solver, len(blocks), [], [], t.adjoint_atol, t.adjoint_rtol)):
        b.solver = s
    init = t.init_tol if t.init_tol > 0 else cfg.solver.atol
    policy = LearnedTolerance(blocks, t.gate_hidden, math.log10(init), t.init_std, t.min_std, t.min_tol,
                              t.max_tol, t.eval_tolerance)
    policy.attach(blocks)
    return policy


#: ``tolerances.policy`` -> ``(cfg, blocks) -> policy module or None``; it sets the blocks' solvers
TOLERANCE_POLICIES: dict[str, Callable[[Config, list[CNFBlock]], nn.Module | None]] = {
    "fixed": _fixed_tolerance, "per_block": _per_block_tolerance, "learned": _learned_tolerance,
}


def build_flow(cfg: Config, bundle: DataBundle) -> SequentialFlow:
    """The flow of ``cfg.model`` for the data set ``bundle``."""
    return ARCHITECTURES[cfg.model.arch](cfg, bundle)


def build_model(cfg: Config, bundle: DataBundle) -> FlowModel:
    """The :class:`FlowModel` of ``cfg`` for the data set ``bundle``: flow, prior and policies."""
    flow = build_flow(cfg, bundle)
    model = FlowModel(flow, PRIORS[cfg.conditioning.kind](cfg, flow, bundle), levels=bundle.levels)
    model.tolerance_policy = TOLERANCE_POLICIES[cfg.tolerances.policy](cfg, model.cnf_blocks())
    return model
