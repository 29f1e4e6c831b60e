"""Build the model a configuration describes, from static tables and the methods' model sides.

The core choices are looked up by name: the architecture (:data:`ARCHITECTURES`), the network's
layer type (:data:`LAYER_TYPES`) and the regularisers (:data:`REGULARIZERS`). The methods (passed
in by :mod:`fastcnf.methods`, which lists them) give each CNF block's end-time policy, the prior,
and adjust the built model (:class:`fastcnf.method.Method`); nothing here names a method.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import nn

from fastcnf.cnf.block import CNFBlock
from fastcnf.cnf.concat import ConcatConvNet, ConcatMLP
from fastcnf.cnf.divergence import ExactTrace, Hutchinson
from fastcnf.cnf.dynamics import ConcatSquashConvNet, ConcatSquashMLP
from fastcnf.cnf.regularizers import JacobianFrobenius, KineticEnergy, Regularizer
from fastcnf.cnf.unet import UNetVelocity
from fastcnf.config import Config, ConfigError
from fastcnf.data.base import DataBundle
from fastcnf.flows.glow import Shift, build_glow
from fastcnf.flows.multiscale import build_multiscale
from fastcnf.flows.sequential import SequentialFlow
from fastcnf.models.flow_model import FlowModel
from fastcnf.priors import StandardNormal

__all__ = ["build_model", "build_flow", "make_block_factory", "ARCHITECTURES", "LAYER_TYPES", "REGULARIZERS"]


# ---------------------------------------------------------------------------------------------
# CNF blocks: dynamics, divergence, end time, regularisers
# ---------------------------------------------------------------------------------------------

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


def _end_time(cfg: Config, name: str, methods: Sequence[Any]) -> Any:
    """The end-time policy a method gives block ``name``, else T0 = ``model.end_time`` (fixed)."""
    for m in methods:
        policy = m.end_time_policy(cfg, name)
        if policy is not None:
            return policy
    return cfg.model.end_time


def make_block_factory(cfg: Config, image: bool, per_dim_loss: bool | None = None,
                       network: Callable[[int], nn.Module] | None = None,
                       methods: Sequence[Any] = ()) -> Callable[[int, str], CNFBlock]:
    """CNF blocks for ``cfg``; ``per_dim_loss`` (the loss is bits/dim) resolves
    ``model.regularizer_reduction=auto`` to ``mean`` (default: ``image``); ``network(channels)``
    replaces the ``model.layer_type`` network (e.g. the U-Net); ``methods`` give the end times."""
    m = cfg.model
    reduction = m.regularizer_reduction
    if reduction == "auto":
        reduction = "mean" if (image if per_dim_loss is None else per_dim_loss) else "sum"
    eval_solver = cfg.solver.with_tolerance(cfg.eval.atol, cfg.eval.rtol)

    def make(channels: int, name: str) -> CNFBlock:
        widths = m.hidden_dims if image else [max(h, m.min_width_per_dim * channels) for h in m.hidden_dims]
        net: nn.Module = network(channels) if network is not None else \
            LAYER_TYPES[m.layer_type][1 if image else 0](channels, widths, m.activation)
        div = _divergence(m)
        regs = [cls(getattr(m, f"{key}_weight"), reduction) for key, cls in REGULARIZERS.items()
                if getattr(m, f"{key}_weight") > 0]
        return CNFBlock(net, div, cfg.solver, _end_time(cfg, name, methods), regs, eval_solver=eval_solver, name=name)

    return make


# ---------------------------------------------------------------------------------------------
# architectures
# ---------------------------------------------------------------------------------------------

def _mlp(cfg: Config, bundle: DataBundle, methods: Sequence[Any]) -> SequentialFlow:
    if len(bundle.shape) != 1:
        raise ConfigError(f"model.arch=mlp needs vector data, got shape {bundle.shape}; use multiscale or glow")
    make = make_block_factory(cfg, image=False, per_dim_loss=bundle.is_image, methods=methods)
    blocks = [make(bundle.shape[0], f"cnf{i}") for i in range(cfg.model.num_blocks)]
    return SequentialFlow(blocks, bundle.shape)


def _multiscale(cfg: Config, bundle: DataBundle, methods: Sequence[Any]) -> SequentialFlow:
    if len(bundle.shape) != 3:
        raise ConfigError(f"model.arch=multiscale needs images (C, H, W), got shape {bundle.shape}")
    make = make_block_factory(cfg, image=True, per_dim_loss=bundle.is_image, methods=methods)
    return build_multiscale(bundle.shape, make, cfg.model.n_scales, cfg.model.num_blocks, cfg.model.logit_alpha)


def _glow(cfg: Config, bundle: DataBundle, methods: Sequence[Any]) -> SequentialFlow:
    if len(bundle.shape) != 3:
        raise ConfigError(f"model.arch=glow needs images (C, H, W), got shape {bundle.shape}")
    m = cfg.model
    g = m.glow
    alpha = m.logit_alpha if g.preprocess == "logit" else None  # logit_alpha only applies to logit
    return build_glow(bundle.shape, g.levels, g.steps, g.hidden, g.lu, g.preprocess, alpha)


def _unet(cfg: Config, bundle: DataBundle, methods: Sequence[Any]) -> SequentialFlow:
    if len(bundle.shape) != 3:
        raise ConfigError(f"model.arch=unet needs images (C, H, W), got shape {bundle.shape}")
    m = cfg.model
    make = make_block_factory(cfg, image=True, per_dim_loss=bundle.is_image,
                              network=lambda c: UNetVelocity(c, m.unet.channels, m.unet.levels), methods=methods)
    block = make(bundle.shape[0], "cnf")
    return SequentialFlow([Shift(-0.5), block], bundle.shape)


#: ``model.arch`` -> ``(cfg, bundle, methods) -> SequentialFlow``
ARCHITECTURES: dict[str, Callable[[Config, DataBundle, Sequence[Any]], SequentialFlow]] = {
    "mlp": _mlp, "multiscale": _multiscale, "glow": _glow, "unet": _unet,
}


def build_flow(cfg: Config, bundle: DataBundle, methods: Sequence[Any] = ()) -> SequentialFlow:
    """The flow of ``cfg.model`` for the data set ``bundle`` (``methods`` give the end times)."""
    return ARCHITECTURES[cfg.model.arch](cfg, bundle, methods)


def build_model(cfg: Config, bundle: DataBundle, methods: Sequence[Any] = ()) -> FlowModel:
    """The :class:`FlowModel` of ``cfg`` for the data set ``bundle``: the flow, the prior (the first
    method that gives one, else the standard normal), then each method's :meth:`attach`, in order.
    ``fastcnf.methods.build_model`` passes every method; ``methods=()`` builds the plain model."""
    flow = build_flow(cfg, bundle, methods)
    prior = next((p for p in (m.prior(cfg, flow, bundle) for m in methods) if p is not None), None)
    model = FlowModel(flow, prior if prior is not None else StandardNormal(flow.latent_dim, flow.latent_sizes),
                      levels=bundle.levels)
    for m in methods:
        m.attach(cfg, model)
    return model
