"""Minibatch couplings (issue 19): exact OT against brute force over all permutations, class-wise
pairing, and Sinkhorn's plan approaching the exact one as epsilon -> 0.
"""
from __future__ import annotations

import itertools
import sys

import numpy as np
import pytest
import torch

from fastcnf.flow_matching.config import FlowMatchingConfig
from fastcnf.flow_matching.pairing import ExactOTCoupling, IndependentCoupling, SinkhornCoupling, squared_distances


def _batches(b, shape=(2,), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, *shape, generator=g, dtype=torch.float64) * 0.5 + 1.0
    eps = torch.randn(b, *shape, generator=g, dtype=torch.float64)
    return x, eps


def _cost(x, eps, index):
    return float(((x - eps[index]) ** 2).reshape(x.shape[0], -1).sum())


def _brute_force(cost: np.ndarray) -> float:
    perms = np.array(list(itertools.permutations(range(cost.shape[0]))))
    return float(cost[np.arange(cost.shape[0]), perms].sum(1).min())


@pytest.mark.parametrize("b", [5, 6])
@pytest.mark.parametrize("seed", range(4))
def test_exact_ot_pairing_attains_the_brute_force_minimum(b, seed):
    x, eps = _batches(b, seed=seed)
    index = ExactOTCoupling()(x, eps)
    assert sorted(index.tolist()) == list(range(b))  # a permutation: every noise sample used once
    best = _brute_force(squared_distances(x, eps).numpy())
    assert _cost(x, eps, index) == pytest.approx(best, rel=1e-9, abs=1e-9)
    assert _cost(x, eps, index) <= _cost(x, eps, torch.arange(b)) + 1e-9


def test_exact_ot_pairs_images_by_their_flattened_distance():
    x, eps = _batches(6, shape=(1, 3, 3), seed=5)
    index = ExactOTCoupling()(x, eps)
    best = _brute_force(squared_distances(x, eps).numpy())
    assert _cost(x, eps, index) == pytest.approx(best, rel=1e-9)


def test_pairing_with_labels_stays_within_each_class_and_is_optimal_per_class():
    x, eps = _batches(10, seed=3)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 1, 0, 2])
    index = ExactOTCoupling()(x, eps, labels=labels)
    assert torch.equal(labels[index], labels)
    assert sorted(index.tolist()) == list(range(10))
    total = 0.0
    for c in range(3):
        members = torch.nonzero(labels == c).reshape(-1)
        total += _brute_force(squared_distances(x[members], eps[members]).numpy())
    assert _cost(x, eps, index) == pytest.approx(total, rel=1e-9)


def test_independent_coupling_keeps_the_draws():
    x, eps = _batches(8)
    assert torch.equal(IndependentCoupling()(x, eps), torch.arange(8))
    assert torch.equal(IndependentCoupling()(x, eps, labels=torch.zeros(8, dtype=torch.long)), torch.arange(8))


def test_coupling_rejects_batches_of_different_sizes_and_unknown_names():
    x, eps = _batches(6)
    with pytest.raises(ValueError, match="differ"):
        ExactOTCoupling()(x, eps[:5])
    with pytest.raises(ValueError, match="accepted: independent, exact, sinkhorn"):
        FlowMatchingConfig(coupling="hungarian")


def test_sinkhorn_coupling_names_the_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "ot", None)  # makes ``import ot`` fail
    x, eps = _batches(4)
    with pytest.raises(ImportError, match="pip install pot"):
        SinkhornCoupling()(x, eps)


def test_sinkhorn_plan_cost_decreases_to_the_exact_optimum_as_epsilon_shrinks():
    pytest.importorskip("ot", reason="POT (pip install pot) provides the Sinkhorn solver")
    x, eps = _batches(24, seed=2)
    exact = ExactOTCoupling()(x, eps)
    cost = squared_distances(x, eps)
    best = float(cost[torch.arange(24), exact].sum()) / 24

    def plan_cost(epsilon):
        return float((SinkhornCoupling(epsilon=epsilon, max_iter=5000).plan(cost) * cost).sum())

    gaps = [plan_cost(e) - best for e in (1e-1, 1e-2, 1e-3)]
    assert gaps[0] > gaps[1] > gaps[2] >= -1e-9  # the entropic plan's cost decreases to the optimum
    assert gaps[2] < 2e-3 * best


def test_sinkhorn_draws_recover_a_clear_optimal_assignment():
    """Noise = the data permuted and slightly perturbed: the optimal pairing is unique with a wide
    margin, and pairs drawn from the entropic plan at small epsilon are exactly it."""
    pytest.importorskip("ot", reason="POT (pip install pot) provides the Sinkhorn solver")
    grid = torch.arange(5, dtype=torch.float64)
    x = torch.cartesian_prod(grid, grid)  # 25 points, 1 apart: a swap costs >= 2 more
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(25, generator=g)
    eps = torch.empty_like(x)
    eps[perm] = x + 0.02 * torch.randn(x.shape, generator=g, dtype=x.dtype)
    assert torch.equal(ExactOTCoupling()(x, eps), perm)
    index = SinkhornCoupling(epsilon=3e-3, max_iter=10000)(x, eps, generator=torch.Generator().manual_seed(0))
    assert torch.equal(index, perm)


def test_sinkhorn_plan_has_uniform_marginals_and_tends_to_independence_at_large_epsilon():
    pytest.importorskip("ot", reason="POT (pip install pot) provides the Sinkhorn solver")
    x, eps = _batches(16, seed=4)
    plan = SinkhornCoupling(epsilon=0.05).plan(squared_distances(x, eps))
    torch.testing.assert_close(plan.sum(1), torch.full((16,), 1 / 16, dtype=plan.dtype), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(plan.sum(0), torch.full((16,), 1 / 16, dtype=plan.dtype), rtol=1e-3, atol=1e-5)
    flat = SinkhornCoupling(epsilon=1e3).plan(squared_distances(x, eps))
    torch.testing.assert_close(flat, torch.full((16, 16), 1 / 256, dtype=flat.dtype), rtol=1e-2, atol=0)


def test_sinkhorn_draws_are_reproducible_and_stay_within_class():
    pytest.importorskip("ot", reason="POT (pip install pot) provides the Sinkhorn solver")
    x, eps = _batches(12, seed=6)
    labels = torch.tensor([0, 1] * 6)
    coupling = SinkhornCoupling(epsilon=0.1)
    a = coupling(x, eps, labels=labels, generator=torch.Generator().manual_seed(1))
    b = coupling(x, eps, labels=labels, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert torch.equal(labels[a], labels)


# ---- the torch Sinkhorn (log domain, on the batch's device) and the background pairing -------------

@pytest.mark.parametrize("epsilon", [0.5, 0.05, 0.01])
def test_torch_sinkhorn_plan_equals_pots(epsilon):
    ot = pytest.importorskip("ot", reason="POT (pip install pot) is the reference")
    from fastcnf.flow_matching.pairing import sinkhorn_log
    x, eps = _batches(7, seed=3)
    cost = squared_distances(x, eps)[:, :6]  # unequal sizes: 7 x 6
    c = cost / cost.max()
    ours = sinkhorn_log(c, epsilon, max_iter=20000, stop_threshold=1e-13)
    ref = ot.sinkhorn(np.full(7, 1 / 7), np.full(6, 1 / 6), c.numpy(), epsilon, method="sinkhorn_log",
                      numItermax=20000, stopThr=1e-13)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-7, atol=1e-12)
    plan = SinkhornCoupling(epsilon, method="torch", max_iter=20000, stop_threshold=1e-13).plan(cost)
    np.testing.assert_allclose(plan.numpy(), ref, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_torch_sinkhorn_tends_to_the_exact_assignment_as_epsilon_shrinks(seed):
    """Small problems: the plan (times B) approaches the permutation matrix of the exact assignment."""
    from fastcnf.flow_matching.pairing import sinkhorn_log
    x, eps = _batches(6, seed=seed)
    cost = squared_distances(x, eps)
    perm = ExactOTCoupling()(x, eps)
    target = torch.zeros(6, 6, dtype=torch.float64)
    target[torch.arange(6), perm] = 1.0
    c = cost / cost.max()
    errors = [float((sinkhorn_log(c, e, max_iter=5000, stop_threshold=1e-8) * 6 - target).abs().max())
              for e in (1e-1, 1e-2, 2e-3)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.1, errors
    index = SinkhornCoupling(2e-3, method="torch", max_iter=5000)(x, eps, generator=torch.Generator().manual_seed(0))
    assert torch.equal(index, perm)


def test_background_pairing_gives_the_in_line_pairs_under_a_fixed_seed():
    """A run of batches paired ahead in the worker thread (each batch submitted while the previous
    one is used) against the same batches paired in line, classes included; a batch that was not
    submitted (or differs) is paired in line."""
    import threading

    from fastcnf.flow_matching.pairing import BackgroundPairing

    threads = set()

    class Recording(ExactOTCoupling):
        def __call__(self, *args, **kwargs):
            threads.add(threading.current_thread().name)
            return super().__call__(*args, **kwargs)

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(40, 2, generator=g) + 2, torch.randn(40, 2, generator=g), torch.randint(0, 3, (40,),
                generator=g)) for _ in range(6)]
    in_line = [ExactOTCoupling()(x, n, labels=y) for x, n, y in batches]
    pairing = BackgroundPairing(Recording(), upcoming=None)
    k = [0]
    pairing.upcoming = lambda ahead: batches[k[0] + ahead] if k[0] + ahead < len(batches) else None
    got = []
    for k[0], (x, n, y) in enumerate(batches):
        got.append(pairing(x, n, labels=y))
    pairing.close()
    assert all(torch.equal(a, b) for a, b in zip(got, in_line))
    assert pairing.prefetched == len(batches) - 1  # all but the first came from the worker
    assert any(name.startswith("fastcnf-pairing") for name in threads)
    # a submitted batch that is not the one asked for: paired in line, still right
    x, n, y = batches[0]
    pairing = BackgroundPairing(ExactOTCoupling())
    pairing.submit(x, n, y)
    other = batches[1]
    assert torch.equal(pairing(*other), ExactOTCoupling()(*other)) and pairing.prefetched == 0
    pairing.close()


@pytest.mark.parametrize("workers", [2, 3])
def test_background_pairing_with_several_workers_keeps_the_order_and_the_in_line_pairs(workers):
    """``workers`` batches in flight: every call is answered with the pairs of its own batch (in
    line's), a batch out of the expected order drops what is pending and pairs in line, and the
    pipeline refills behind it."""
    from fastcnf.flow_matching.pairing import BackgroundPairing

    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(48, 2, generator=g) * 2, torch.randn(48, 2, generator=g), None) for _ in range(9)]
    in_line = [ExactOTCoupling()(x, n) for x, n, _ in batches]
    order = [0, 1, 2, 3, 6, 7, 8]  # a jump after 3: the batches 4 and 5 paired ahead are never asked for
    pos = [0]
    asked = []

    def upcoming(ahead):
        asked.append(ahead)
        j = pos[0] + ahead
        return batches[order[j]] if j < len(order) else None

    pairing = BackgroundPairing(ExactOTCoupling(), upcoming=upcoming, workers=workers)
    got = []
    for pos[0], b in enumerate(order):
        x, n, _ = batches[b]
        got.append(pairing(x, n))
        assert len(pairing._pending) <= workers
    pairing.close()
    assert all(torch.equal(a, in_line[b]) for a, b in zip(got, order))
    assert pairing.prefetched == len(order) - 1  # the upcoming callback followed the order: only the first in line
    assert asked[:workers] == list(range(1, workers + 1))  # the first call fills the pipeline

    # the same pipeline fed along the plain order while the caller jumps: a mismatch, paired in line
    pos = [0]
    pairing = BackgroundPairing(ExactOTCoupling(), upcoming=lambda ahead: (
        batches[pos[0] + ahead] if pos[0] + ahead < len(batches) else None), workers=workers)
    got = []
    for b in order:
        pos[0] = b
        got.append(pairing(batches[b][0], batches[b][1]))
    pairing.close()
    assert all(torch.equal(a, in_line[b]) for a, b in zip(got, order))
    assert pairing.prefetched == len(order) - 2  # the first call and the one after the jump paired in line
    with pytest.raises(ValueError, match="workers >= 1"):
        BackgroundPairing(ExactOTCoupling(), workers=0)


def test_pairing_in_several_workers_leaves_the_warning_filters_alone():
    """Exact pairings at the size where POT's network simplex runs, in three workers at once: the
    process-wide warning filters are the same afterwards (``warnings.catch_warnings`` in the workers
    was not thread-safe and left an "ignore everything" filter behind)."""
    import warnings

    pytest.importorskip("ot", reason="POT (pip install pot) provides the network simplex")
    from fastcnf.flow_matching.pairing import BackgroundPairing

    before = list(warnings.filters)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(160, 2, generator=g), torch.randn(160, 2, generator=g)) for _ in range(30)]
    pos = [0]
    pairing = BackgroundPairing(ExactOTCoupling(), workers=3, upcoming=lambda ahead: (
        (*batches[pos[0] + ahead], None) if pos[0] + ahead < len(batches) else None))
    for pos[0], (x, n) in enumerate(batches):
        pairing(x, n)
    pairing.close()
    assert list(warnings.filters) == before
    assert pairing.prefetched == len(batches) - 1


def test_background_pairing_leaves_random_couplings_in_line():
    pytest.importorskip("ot", reason="POT (pip install pot) provides the Sinkhorn solver")
    from fastcnf.flow_matching.pairing import BackgroundPairing
    x, eps = _batches(10, seed=1)
    pairing = BackgroundPairing(SinkhornCoupling(0.1))
    pairing.submit(x, eps)
    a = pairing(x, eps, generator=torch.Generator().manual_seed(3))
    b = SinkhornCoupling(0.1)(x, eps, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and pairing.prefetched == 0


@pytest.mark.parametrize("n,dim", [(7, 2), (64, 2), (256, 2), (100, 784)])
def test_exact_coupling_by_network_simplex_equals_scipys_assignment(n, dim):
    pytest.importorskip("ot")
    from scipy.optimize import linear_sum_assignment
    from fastcnf.flow_matching.pairing import _emd_permutation
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, dim, generator=g) * 2 + 1
    noise = torch.randn(n, dim, generator=g)
    cost = squared_distances(x, noise).numpy()
    rows, cols = linear_sum_assignment(cost)
    index = _emd_permutation(cost, min_size=2)
    assert index is not None and np.array_equal(index[rows], cols)  # continuous data: the optimum is unique
    # ties (repeated points): another optimal permutation may be chosen, at the same (minimal) cost
    tied = np.repeat(cost[: n // 2 + 1], 2, axis=0)[:n]
    rows, cols = linear_sum_assignment(tied)
    index = ExactOTCoupling().plan_indices(torch.from_numpy(tied), None).numpy()
    assert sorted(index.tolist()) == list(range(n))
    assert tied[np.arange(n), index].sum() == pytest.approx(tied[rows, cols].sum(), rel=1e-12)
