"""Flow architectures: sequential flows with factor-outs, FFJORD multiscale, Glow, fixed layers."""
from fastcnf.flows.glow import (
    ActNorm,
    AffineCoupling,
    GlowSplit,
    GlowStep,
    InvConv1x1,
    Shift,
    ZeroConv2d,
    build_glow,
    initialize_actnorm,
)
from fastcnf.flows.layers import LogitTransform, Squeeze
from fastcnf.flows.multiscale import auto_n_scales, build_multiscale
from fastcnf.flows.sequential import FactorOut, SequentialFlow

__all__ = [
    "LogitTransform", "Squeeze", "auto_n_scales", "build_multiscale", "FactorOut", "SequentialFlow",
    "ActNorm", "InvConv1x1", "ZeroConv2d", "AffineCoupling", "GlowStep", "GlowSplit", "Shift", "build_glow",
    "initialize_actnorm",
]
