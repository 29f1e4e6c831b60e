"""Pairing a data batch with a noise batch for flow matching: independent, exact OT, entropic OT.

A coupling returns ``index`` (B,) such that ``noise[index[i]]`` is the partner of ``x_data[i]``;
the data keep their order (and their labels). Minibatch optimal transport (OT-CFM, Tong et al. 2024)
solves the assignment problem with squared Euclidean cost
``C[i, j] = ||x_i - eps_j||^2`` on each batch:

* :class:`IndependentCoupling`: ``index = arange(B)`` (the noise was drawn independently).
* :class:`ExactOTCoupling`: the optimal permutation (``scipy.optimize.linear_sum_assignment``);
  for uniform weights on two batches of equal size the OT plan is a permutation (Birkhoff).
* :class:`SinkhornCoupling`: the entropic plan ``pi`` (Cuturi 2013, via POT's ``ot.sinkhorn``,
  an optional dependency); each data point ``i`` draws its partner from row ``i`` of ``pi``,
  ``j ~ pi[i, .] / pi[i, .].sum()`` -- a sample of the plan stratified over its uniform first
  marginal, so the data are used once each and may share a noise partner.

With ``labels`` every coupling pairs only within each class: ``noise[i]`` is taken to belong to
class ``labels[i]`` (the caller draws the noise per class, e.g. from a class-conditional Gaussian
source), and the assignment is solved class by class.

References: Tong et al. 2024, "Improving and generalizing flow-based generative models with
minibatch optimal transport" (OT-CFM and its entropic variant); Pooladian et al. 2023,
"Multisample Flow Matching: Straightening Flows with Minibatch Couplings"; Cuturi 2013,
"Sinkhorn Distances: Lightspeed Computation of Optimal Transport".
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = [
    "Coupling",
    "IndependentCoupling",
    "ExactOTCoupling",
    "SinkhornCoupling",
    "squared_distances",
]


def squared_distances(x_data: Tensor, noise: Tensor) -> Tensor:
    """The (B, B') cost matrix ``||x_i - eps_j||^2`` over flattened examples (float64, detached)."""
    a = x_data.detach().reshape(x_data.shape[0], -1).double()
    b = noise.detach().reshape(noise.shape[0], -1).double()
    return torch.cdist(a, b).pow_(2)


class Coupling:
    """Interface: ``coupling(x_data, noise, labels=None, generator=None) -> index`` (B,), long,
    on ``x_data``'s device; ``noise[index]`` is the paired noise batch."""

    name = "base"

    def plan_indices(self, cost: Tensor, generator: torch.Generator | None) -> Tensor:
        """Partner indices (B,) for one (class) block of the cost matrix (CPU, float64)."""
        raise NotImplementedError

    def __call__(self, x_data: Tensor, noise: Tensor, labels: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        b = x_data.shape[0]
        if noise.shape[0] != b:
            raise ValueError(f"data ({b}) and noise ({noise.shape[0]}) batches differ in size")
        if labels is None:
            index = self.plan_indices(squared_distances(x_data, noise).cpu(), generator)
            return index.to(x_data.device)
        labels = labels.reshape(-1)
        if labels.shape[0] != b:
            raise ValueError(f"labels ({labels.shape[0]}) and data ({b}) batches differ in size")
        index = torch.empty(b, dtype=torch.long)
        labels_cpu = labels.detach().cpu()
        for c in torch.unique(labels_cpu):
            members = torch.nonzero(labels_cpu == c).reshape(-1)
            dev = members.to(x_data.device)
            cost = squared_distances(x_data[dev], noise[dev]).cpu()
            index[members] = members[self.plan_indices(cost, generator)]
        return index.to(x_data.device)


class IndependentCoupling(Coupling):
    """Keeps the independent draws as they are: ``index = arange(B)`` (I-CFM)."""

    name = "independent"

    def plan_indices(self, cost, generator):
        return torch.arange(cost.shape[0])

    def __call__(self, x_data, noise, labels=None, generator=None):
        if noise.shape[0] != x_data.shape[0]:
            raise ValueError(f"data ({x_data.shape[0]}) and noise ({noise.shape[0]}) batches differ in size")
        return torch.arange(x_data.shape[0], device=x_data.device)

    def __repr__(self) -> str:
        return "IndependentCoupling()"


class ExactOTCoupling(Coupling):
    """The exact minibatch OT assignment, ``min_perm sum_i ||x_i - eps_perm(i)||^2`` (OT-CFM).

    Example:
        >>> x_data, noise = torch.randn(8, 2), torch.randn(8, 2)
        >>> paired = noise[ExactOTCoupling()(x_data, noise)]
    """

    name = "exact"

    def plan_indices(self, cost, generator):
        rows, cols = linear_sum_assignment(cost.numpy())
        index = np.empty(cost.shape[0], dtype=np.int64)
        index[rows] = cols
        return torch.from_numpy(index)

    def __repr__(self) -> str:
        return "ExactOTCoupling()"


def _valid_plan(pi: np.ndarray) -> bool:
    return bool(np.isfinite(pi).all() and (pi.sum(1) > 0).all())


def _import_ot():
    try:
        import ot  # optional dependency: imported on first use
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the sinkhorn coupling needs POT: pip install pot") from err
    return ot


class SinkhornCoupling(Coupling):
    """Entropic minibatch OT: partners drawn from the Sinkhorn plan (POT ``ot.sinkhorn``).

    Args:
        epsilon: entropic regularisation, relative to the cost scale (see ``normalize_cost``);
            ``epsilon -> 0`` approaches :class:`ExactOTCoupling`, large values the independent one.
        normalize_cost: divide the cost by its maximum first, so ``epsilon`` does not depend on the
            dimension or scale of the data (and ``exp(-C / epsilon)`` does not underflow on images).
        method: POT's solver; ``auto`` runs the plain iteration and, when it warns or its plan is
            not finite (small ``epsilon``), the log-domain one (``sinkhorn_log``).
        max_iter: iteration cap of the Sinkhorn loop.
        stop_threshold: stop when the marginals are met to this (POT's ``stopThr``; the plan only
            serves to draw pairs, so POT's default 1e-9 would spend iterations on nothing).
    """

    name = "sinkhorn"

    def __init__(self, epsilon: float = 0.05, normalize_cost: bool = True, method: str = "auto",
                 max_iter: int = 1000, stop_threshold: float = 1e-6) -> None:
        if not epsilon > 0:
            raise ValueError(f"sinkhorn epsilon must be > 0, got {epsilon!r}")
        self.epsilon = float(epsilon)
        self.normalize_cost = bool(normalize_cost)
        self.method = method
        self.max_iter = int(max_iter)
        self.stop_threshold = float(stop_threshold)

    def plan(self, cost: Tensor) -> Tensor:
        """The entropic plan (B, B'), uniform marginals ``1/B`` and ``1/B'``."""
        ot = _import_ot()
        c = cost.numpy()
        if self.normalize_cost and c.max() > 0:
            c = c / c.max()
        a = np.full(c.shape[0], 1.0 / c.shape[0])
        b = np.full(c.shape[1], 1.0 / c.shape[1])

        def solve(method: str) -> np.ndarray:
            return np.asarray(ot.sinkhorn(a, b, c, self.epsilon, method=method, numItermax=self.max_iter,
                                          stopThr=self.stop_threshold), dtype=np.float64)

        if self.method != "auto":
            return torch.from_numpy(solve(self.method))
        # the plain iteration is ~30x faster than the log-domain one at epsilon = 0.05, batch 256;
        # at small epsilon exp(-C / epsilon) underflows and POT warns: redo it in the log domain
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pi = solve("sinkhorn")
        if caught or not _valid_plan(pi):
            pi = solve("sinkhorn_log")
        return torch.from_numpy(pi)

    def plan_indices(self, cost, generator):
        pi = self.plan(cost)
        if not _valid_plan(pi.numpy()):
            raise FloatingPointError(f"Sinkhorn plan is not finite at epsilon={self.epsilon} (method "
                                     f"{self.method!r}); raise epsilon or use method='auto'")
        if generator is not None:  # multinomial draws on the generator's device
            pi = pi.to(generator.device)
        return torch.multinomial(pi, 1, generator=generator).reshape(-1).cpu()

    def __repr__(self) -> str:
        return f"SinkhornCoupling(epsilon={self.epsilon}, normalize_cost={self.normalize_cost}, method={self.method!r})"
