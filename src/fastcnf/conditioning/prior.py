"""The class-conditional prior of CCNF and InfoCNF as the conditioning method builds it: which slice
of the latent is conditioned (CCNF: all of it, eq. 3; InfoCNF: the supervised code z_y, §2.2) and
the label prior p(y) (Nguyen et al. 2019, "InfoCNF: Efficient Conditional Continuous Normalizing
Flow Using Adaptive Solvers")."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from fastcnf.config import ConfigError
from fastcnf.data.base import DataBundle
from fastcnf.priors import ClassConditionalGaussian

__all__ = ["CONDITIONED_SLICES", "INFOCNF_PLACEMENTS", "LABEL_PRIORS", "class_conditional_prior"]


def _supervised_size(total: int, fraction: float, where: str) -> int:
    size = int(round(total * fraction))
    if size < 1 or size > total:
        raise ConfigError(f"conditioning.supervised_fraction={fraction} leaves no supervised code in {where} "
                          f"of size {total}")
    return size


def _first(latent_sizes: list[int], fraction: float) -> tuple[int, int]:
    return 0, _supervised_size(sum(latent_sizes), fraction, "the latent")


def _last(latent_sizes: list[int], fraction: float) -> tuple[int, int]:
    total = sum(latent_sizes)
    size = _supervised_size(total, fraction, "the latent")
    return total - size, size


def _final_piece(latent_sizes: list[int], fraction: float) -> tuple[int, int]:
    return sum(latent_sizes[:-1]), _supervised_size(latent_sizes[-1], fraction, "the final latent piece")


#: ``conditioning.placement`` -> ``(latent_sizes, supervised_fraction) -> (start, size)`` of InfoCNF's z_y:
#: ``first`` (the paper's ``[z_y, z_u]``), ``last``, ``final_piece`` (the start of the final latent
#: piece only; deprecated, for runs made before z_y spanned the whole latent)
INFOCNF_PLACEMENTS: dict[str, Callable[[list[int], float], tuple[int, int]]] = {
    "first": _first, "last": _last, "final_piece": _final_piece,
}


def _ccnf_slice(latent_sizes: list[int], fraction: float, placement: str = "first") -> tuple[int, int]:
    return 0, sum(latent_sizes)


def _infocnf_slice(latent_sizes: list[int], fraction: float, placement: str = "first") -> tuple[int, int]:
    return INFOCNF_PLACEMENTS[placement](list(latent_sizes), fraction)


#: kind -> ``(latent_sizes, supervised_fraction, placement) -> (start, size)`` of the conditioned slice
CONDITIONED_SLICES: dict[str, Callable[..., tuple[int, int]]] = {
    "ccnf": _ccnf_slice,
    "infocnf": _infocnf_slice,
}


def _uniform(num_classes: int, labels: Tensor | None) -> Tensor:
    return torch.full((num_classes,), -math.log(num_classes))


def _empirical(num_classes: int, labels: Tensor | None) -> Tensor:
    if labels is None:
        raise ConfigError("conditioning.label_prior=empirical needs training labels")
    counts = torch.bincount(labels.long().reshape(-1), minlength=num_classes).double()
    if (counts == 0).any():
        raise ConfigError("conditioning.label_prior=empirical: some classes never occur in the training split")
    return (counts / counts.sum()).log().float()


#: ``conditioning.label_prior`` -> ``(num_classes, train labels) -> log p(y)``
LABEL_PRIORS: dict[str, Callable[[int, Tensor | None], Tensor]] = {"uniform": _uniform, "empirical": _empirical}


def class_conditional_prior(cfg: Any, flow: nn.Module, bundle: DataBundle) -> ClassConditionalGaussian:
    """The CCNF / InfoCNF prior of ``cfg.conditioning`` on ``flow``'s latent, for ``bundle``'s labels."""
    c = cfg.conditioning
    if not bundle.num_classes or bundle.train.y is None:
        raise ConfigError(f"conditioning.kind={c.kind} needs a labelled data set; {bundle.name!r} has no labels "
                          "(use e.g. digits, mnist, mnist-test-split, cifar10, mix1d)")
    start, size = CONDITIONED_SLICES[c.kind](list(flow.latent_sizes), c.supervised_fraction, c.placement)
    log_py = LABEL_PRIORS[c.label_prior](bundle.num_classes, bundle.train.y)
    return ClassConditionalGaussian(flow.latent_dim, bundle.num_classes, start, size, flow.latent_sizes,
                                    dropout=c.dropout, label_log_prior=log_py, learn_scale=c.learn_scale)
