"""Pairing a data batch with a noise batch for flow matching: independent, exact OT, entropic OT.

A coupling returns ``index`` (B,) such that ``noise[index[i]]`` is the partner of ``x_data[i]``;
the data keep their order (and their labels). Minibatch optimal transport (OT-CFM, Tong et al. 2024)
solves the assignment problem with squared Euclidean cost
``C[i, j] = ||x_i - eps_j||^2`` on each batch:

* :class:`IndependentCoupling`: ``index = arange(B)`` (the noise was drawn independently).
* :class:`ExactOTCoupling`: the optimal permutation (POT's network simplex ``ot.emd`` where POT is
  installed and its plan is a permutation, else ``scipy.optimize.linear_sum_assignment``);
  for uniform weights on two batches of equal size the OT plan is a permutation (Birkhoff).
* :class:`SinkhornCoupling`: the entropic plan ``pi`` (Cuturi 2013, via POT's ``ot.sinkhorn``,
  an optional dependency, or ``method="torch"``: :func:`sinkhorn_log`, log-domain, on the batch's
  device); each data point ``i`` draws its partner from row ``i`` of ``pi``,
  ``j ~ pi[i, .] / pi[i, .].sum()`` -- a sample of the plan stratified over its uniform first
  marginal, so the data are used once each and may share a noise partner.

With ``labels`` every coupling pairs only within each class: ``noise[i]`` is taken to belong to
class ``labels[i]`` (the caller draws the noise per class, e.g. from a class-conditional Gaussian
source), and the assignment is solved class by class.

:class:`BackgroundPairing` takes the pairing off the critical path: the coming batches' assignments
are computed in worker threads while the current step runs (deterministic couplings; the indices are
the ones pairing in line gives).

References: Tong et al. 2024, "Improving and generalizing flow-based generative models with
minibatch optimal transport" (OT-CFM and its entropic variant); Pooladian et al. 2023,
"Multisample Flow Matching: Straightening Flows with Minibatch Couplings"; Cuturi 2013,
"Sinkhorn Distances: Lightspeed Computation of Optimal Transport".
"""
from __future__ import annotations

import math
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

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
    "sinkhorn_log",
    "BackgroundPairing",
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
    #: whether the indices depend on the inputs alone (no random draw): then they can be computed ahead
    deterministic = True
    #: whether the cost matrix goes to the CPU first (scipy, POT) or stays on the batch's device
    cost_on_cpu = True

    def _cost(self, x_data: Tensor, noise: Tensor) -> Tensor:
        cost = squared_distances(x_data, noise)
        return cost.cpu() if self.cost_on_cpu else cost

    def plan_indices(self, cost: Tensor, generator: torch.Generator | None) -> Tensor:
        """Partner indices (B,) for one (class) block of the cost matrix (CPU, float64)."""
        raise NotImplementedError

    def __call__(self, x_data: Tensor, noise: Tensor, labels: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        b = x_data.shape[0]
        if noise.shape[0] != b:
            raise ValueError(f"data ({b}) and noise ({noise.shape[0]}) batches differ in size")
        if labels is None:
            index = self.plan_indices(self._cost(x_data, noise), generator)
            return index.to(x_data.device)
        labels = labels.reshape(-1)
        if labels.shape[0] != b:
            raise ValueError(f"labels ({labels.shape[0]}) and data ({b}) batches differ in size")
        index = torch.empty(b, dtype=torch.long)
        labels_cpu = labels.detach().cpu()
        for c in torch.unique(labels_cpu):
            members = torch.nonzero(labels_cpu == c).reshape(-1)
            dev = members.to(x_data.device)
            cost = self._cost(x_data[dev], noise[dev])
            index[members] = members[self.plan_indices(cost, generator).cpu()]
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
        c = cost.numpy()
        index = _emd_permutation(c)  # POT's network simplex: 1.2-3.3x faster than scipy at B = 256-1024
        if index is None:
            rows, cols = linear_sum_assignment(c)
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


def _emd_permutation(c: np.ndarray, min_size: int = 128) -> np.ndarray | None:
    """The optimal assignment of the square cost ``c`` by POT's exact network simplex (``ot.emd``,
    Bonneel et al. 2011, "Displacement interpolation using Lagrangian mass transport") with uniform
    weights: its optimal vertex is a permutation matrix (Birkhoff). None when POT is missing, the
    solver did not reach optimality or the plan is not a permutation (scipy then decides), and below
    ``min_size`` (scipy is faster there: benchmarks/ot_assignment.py)."""
    n, m = c.shape
    if n != m or n < max(2, min_size):
        return None
    try:
        import ot
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    w = np.full(n, 1.0 / n)
    # no warnings.catch_warnings() here: it swaps the process-wide filter list and is not thread-safe, so
    # two pairing workers inside it at once left an "ignore" filter behind that silenced every later
    # warning of the process; ot.emd warns only when it stops short, which the result code below catches
    plan, log = ot.emd(w, w, np.ascontiguousarray(c, dtype=np.float64), numItermax=max(100_000, 50 * n * n),
                       log=True)
    if log.get("result_code") != 1:  # 1: optimal
        return None
    support = plan > 0.5 / n
    if not (support.sum(1) == 1).all() or not (support.sum(0) == 1).all():
        return None
    return support.argmax(1).astype(np.int64)


class SinkhornCoupling(Coupling):
    """Entropic minibatch OT: partners drawn from the Sinkhorn plan (POT ``ot.sinkhorn``).

    Args:
        epsilon: entropic regularisation, relative to the cost scale (see ``normalize_cost``);
            ``epsilon -> 0`` approaches :class:`ExactOTCoupling`, large values the independent one.
        normalize_cost: divide the cost by its maximum first, so ``epsilon`` does not depend on the
            dimension or scale of the data (and ``exp(-C / epsilon)`` does not underflow on images).
        method: POT's solver; ``auto`` runs the plain iteration and, when it warns or its plan is
            not finite (small ``epsilon``), the log-domain one (``sinkhorn_log``); ``torch``:
            :func:`sinkhorn_log` on the batch's device (no POT, no copy to the CPU).
        max_iter: iteration cap of the Sinkhorn loop.
        stop_threshold: stop when the marginals are met to this (POT's ``stopThr``; the plan only
            serves to draw pairs, so POT's default 1e-9 would spend iterations on nothing).
    """

    name = "sinkhorn"
    deterministic = False  # partners are drawn from the plan

    def __init__(self, epsilon: float = 0.05, normalize_cost: bool = True, method: str = "auto",
                 max_iter: int = 1000, stop_threshold: float = 1e-6) -> None:
        if not epsilon > 0:
            raise ValueError(f"sinkhorn epsilon must be > 0, got {epsilon!r}")
        self.epsilon = float(epsilon)
        self.normalize_cost = bool(normalize_cost)
        self.method = method
        self.max_iter = int(max_iter)
        self.stop_threshold = float(stop_threshold)
        self.cost_on_cpu = method != "torch"

    def plan(self, cost: Tensor) -> Tensor:
        """The entropic plan (B, B'), uniform marginals ``1/B`` and ``1/B'``."""
        if self.method == "torch":
            if self.normalize_cost and bool(cost.max() > 0):
                cost = cost / cost.max()
            return sinkhorn_log(cost, self.epsilon, self.max_iter, self.stop_threshold)
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
        if not _valid_plan(pi.detach().cpu().numpy()):
            raise FloatingPointError(f"Sinkhorn plan is not finite at epsilon={self.epsilon} (method "
                                     f"{self.method!r}); raise epsilon or use method='auto'")
        if generator is not None:  # multinomial draws on the generator's device
            pi = pi.to(generator.device)
        return torch.multinomial(pi, 1, generator=generator).reshape(-1).cpu()

    def __repr__(self) -> str:
        return f"SinkhornCoupling(epsilon={self.epsilon}, normalize_cost={self.normalize_cost}, method={self.method!r})"


def sinkhorn_log(cost: Tensor, epsilon: float, max_iter: int = 1000, stop_threshold: float = 1e-6) -> Tensor:
    """The entropic OT plan of ``cost`` (B, B') with uniform marginals, by Sinkhorn's iteration in the
    log domain on ``cost``'s device and dtype (Cuturi 2013; Peyre & Cuturi 2019, "Computational
    Optimal Transport", §4.4, Remark 4.23)::

        f <- log a - logsumexp_j(g_j - C_ij / eps),   g <- log b - logsumexp_i(f_i - C_ij / eps)
        pi_ij = exp(f_i + g_j - C_ij / eps)

    No ``exp(-C / eps)`` is formed, so small ``epsilon`` does not underflow. Stops when the row
    marginal is met to ``stop_threshold`` (L1, checked every 10 iterations) or after ``max_iter``.

    Example:
        >>> pi = sinkhorn_log(torch.rand(4, 4), 0.1)
        >>> bool(torch.allclose(pi.sum(0), torch.full((4,), 0.25), atol=1e-6))
        True
    """
    n, m = cost.shape
    k = -cost / float(epsilon)
    log_a = torch.full((n,), -math.log(n), dtype=cost.dtype, device=cost.device)
    log_b = torch.full((m,), -math.log(m), dtype=cost.dtype, device=cost.device)
    f = torch.zeros_like(log_a)
    g = torch.zeros_like(log_b)
    for it in range(int(max_iter)):
        f = log_a - torch.logsumexp(k + g[None, :], dim=1)
        g = log_b - torch.logsumexp(k + f[:, None], dim=0)
        if it % 10 == 9:  # after the g update the column marginal is exact; test the row marginal
            rows = torch.logsumexp(k + f[:, None] + g[None, :], dim=1).exp()
            if float((rows - log_a.exp()).abs().sum()) < stop_threshold:
                break
    return (k + f[:, None] + g[None, :]).exp()


class BackgroundPairing:
    """Pairs the coming batches in worker threads while the current step runs.

    ``submit(x, noise, labels)`` starts ``coupling(x, noise, labels)`` in one of ``workers``
    threads (scipy's and POT's assignment solvers and torch's kernels release the interpreter lock).
    Submitted pairings are answered in order: a call whose tensors equal the oldest pending
    submission's returns its result, anything else drops what is pending and pairs in line. The
    indices are those of ``coupling`` called in line: a worker computes the same function of the
    same inputs. Couplings that draw at random (Sinkhorn) always pair in line, on the caller's
    generator.

    With ``upcoming`` the object keeps ``workers`` batches in flight: after each call it submits the
    batches ``1 .. workers`` steps ahead that are not pending yet (``upcoming(k)`` gives the batch
    ``k`` steps after the one just paired). One worker hides an assignment that costs less than a
    step; with an assignment dearer than the step, ``w`` workers on free cores keep up while it
    costs less than ``w`` steps.

    Example:
        >>> pairing = BackgroundPairing(ExactOTCoupling())
        >>> x, noise = torch.randn(16, 2), torch.randn(16, 2)
        >>> pairing.submit(x, noise)
        >>> bool((pairing(x, noise) == ExactOTCoupling()(x, noise)).all())
        True
    """

    def __init__(self, coupling: Coupling,
                 upcoming: Callable[[int], tuple[Tensor, Tensor, Tensor | None] | None] | None = None,
                 workers: int = 1) -> None:
        if isinstance(workers, bool) or int(workers) < 1:
            raise ValueError(f"BackgroundPairing needs workers >= 1, got {workers!r}")
        self.coupling = coupling
        #: ``k -> (x, noise, labels)`` of the batch ``k`` steps after the one being paired (or None)
        self.upcoming = upcoming
        self.workers = int(workers)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[Tensor, Tensor, Tensor | None, Future]] = deque()
        #: how many calls were answered by a worker (the rest paired in line)
        self.prefetched = 0

    def submit(self, x_data: Tensor, noise: Tensor, labels: Tensor | None = None) -> None:
        """Queue the pairing of ``(x_data, noise, labels)`` behind those pending (no-op for random
        couplings)."""
        if not self.coupling.deterministic:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="fastcnf-pairing")
        x, n = x_data.detach(), noise.detach()
        lab = None if labels is None else labels.detach()
        self._pending.append((x, n, lab, self._pool.submit(self.coupling, x, n, lab)))

    def __call__(self, x_data: Tensor, noise: Tensor, labels: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        index = None
        if self._pending:
            x, n, lab, future = self._pending.popleft()
            index = future.result()  # wait for it even if unused: the worker is free again
            if not (_same(x, x_data) and _same(n, noise) and _same(lab, labels)):
                index = None
                self.drop()  # out of step (a new epoch's order, a resumed run): start again from here
        if index is None:
            index = self.coupling(x_data, noise, labels=labels, generator=generator)
        else:
            self.prefetched += 1
        if self.upcoming is not None and self.coupling.deterministic:
            for ahead in range(len(self._pending) + 1, self.workers + 1):
                nxt = self.upcoming(ahead)
                if nxt is None:
                    break
                self.submit(*nxt)
        return index

    def wait(self) -> None:
        """Block until every pending pairing is computed (they stay pending)."""
        for pending in self._pending:
            pending[3].result()

    def drop(self) -> None:
        """Forget the submitted pairings (waiting for the workers to finish them)."""
        self.wait()
        self._pending.clear()

    def close(self) -> None:
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __repr__(self) -> str:
        return f"BackgroundPairing({self.coupling!r}, workers={self.workers})"


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.device == b.device and bool(torch.equal(a, b.detach()))

