"""Flow architectures: sequential flows with factor-outs, FFJORD multiscale, fixed layers."""
from fastcnf.flows.layers import LogitTransform, Squeeze
from fastcnf.flows.multiscale import auto_n_scales, build_multiscale
from fastcnf.flows.sequential import FactorOut, SequentialFlow

__all__ = ["LogitTransform", "Squeeze", "auto_n_scales", "build_multiscale", "FactorOut", "SequentialFlow"]
