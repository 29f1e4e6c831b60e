"""Data parallel (torch.distributed, gloo on CPU): 2 processes on halves of each global batch
reproduce one process on the whole batch; a resumed 2-process run equals an uninterrupted one."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import det_cfg, launch_two_ranks, params, run_steps  # noqa: E402

from fastcnf.training.trainer import Batcher, Trainer  # noqa: E402

STEPS = 4
WORKER = Path(__file__).parent / "ddp_worker.py"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """Launch the worker as 2 ranks with torchrun's environment (gloo, 127.0.0.1, free port)."""
    out = tmp_path_factory.mktemp("ddp")
    launch_two_ranks(WORKER, [str(out), str(STEPS)])
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _assert_same(a: dict, b: dict, atol: float = 1e-10) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=f"parameter {k} differs")


def test_two_ranks_equal_one_process_on_the_global_batch(two_ranks) -> None:
    r0, r1 = two_ranks
    assert (r0["world"], r1["world"]) == (2, 2)
    assert r0["agree"] and r1["agree"]
    _assert_same(r0["params"], r1["params"], atol=0.0)  # identical on every rank
    single = Trainer(det_cfg(f"train.iterations={STEPS}"), "unused", progress=False)
    losses = run_steps(single, STEPS)
    _assert_same(params(single), r0["params"])
    # logged losses are all-reduced: the global batch's mean loss
    assert r0["losses"] == pytest.approx(losses, abs=1e-10)
    assert r1["losses"] == pytest.approx(losses, abs=1e-10)


def test_resumed_two_rank_run_equals_uninterrupted(two_ranks) -> None:
    for r in two_ranks:
        _assert_same(r["resumed"], r["params"], atol=0.0)


def test_two_ranks_with_accumulation_equal_one_process(two_ranks) -> None:
    single = Trainer(det_cfg(f"train.iterations={STEPS}"), "unused", progress=False)
    run_steps(single, STEPS)
    _assert_same(params(single), two_ranks[0]["accum"])


def test_shards_partition_the_global_batch() -> None:
    """Like DistributedSampler: ranks get disjoint rows whose union is the 1-process batch."""
    from fastcnf.data.registry import load_data

    cfg = det_cfg("data.name=digits")
    bundle = load_data(cfg.data, 0)
    one = Batcher(bundle, 12, seed=3)
    ranks = [Batcher(bundle, 12, seed=3, rank=r, world_size=3) for r in range(3)]
    for _ in range(5):  # crosses an epoch boundary of the permutation
        x, y = one.next()
        parts = [b.next() for b in ranks]
        torch.testing.assert_close(torch.cat([p[0] for p in parts]), x, atol=0, rtol=0)
        torch.testing.assert_close(torch.cat([p[1] for p in parts]), y, atol=0, rtol=0)
