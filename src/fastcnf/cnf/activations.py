"""Activations of the dynamics networks and their elementwise derivatives (used by the forward-mode
trace kernel and by tangent propagation)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fastcnf.config import check_choice

__all__ = ["ACTIVATIONS", "make_activation", "activation_derivative"]

#: ``model.activation`` -> module class
ACTIVATIONS = {
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "swish": nn.SiLU,
}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name (:data:`ACTIVATIONS`)."""
    check_choice("activation", name, ACTIVATIONS)
    return ACTIVATIONS[name]()


def activation_derivative(act: nn.Module, pre: Tensor, post: Tensor) -> Tensor:
    """d act(pre) / d pre, elementwise, reusing the output where cheaper."""
    if isinstance(act, nn.Tanh):
        return 1 - post * post
    if isinstance(act, nn.Softplus):
        return torch.sigmoid(pre * act.beta)
    if isinstance(act, nn.ReLU):
        return (pre > 0).to(pre.dtype)
    if isinstance(act, nn.ELU):
        return torch.where(pre > 0, torch.ones_like(pre), post + act.alpha)
    if isinstance(act, nn.SiLU):
        s = torch.sigmoid(pre)
        return s * (1 + pre * (1 - s))
    raise TypeError(f"no derivative for activation {type(act).__name__}")
