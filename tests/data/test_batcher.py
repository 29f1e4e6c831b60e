"""Training mini-batches (fastcnf.data.batcher): rank shards partition the global batch, epochs are
permutations, and the state restores the exact data order."""
from __future__ import annotations

import pytest
import torch

from fastcnf.config import ConfigError, DataConfig
from fastcnf.data import Batcher, load_data


@pytest.fixture(scope="module")
def digits():
    return load_data(DataConfig(name="digits"), 0)


def test_rank_shards_partition_the_one_process_batch(digits):
    """Like DistributedSampler: ranks get disjoint rows whose union is the 1-process batch."""
    one = Batcher(digits, 12, seed=3)
    ranks = [Batcher(digits, 12, seed=3, rank=r, world_size=3) for r in range(3)]
    for _ in range(5):
        x, y = one.next()
        parts = [b.next() for b in ranks]
        torch.testing.assert_close(torch.cat([p[0] for p in parts]), x, atol=0, rtol=0)
        torch.testing.assert_close(torch.cat([p[1] for p in parts]), y, atol=0, rtol=0)


def test_an_epoch_visits_each_example_at_most_once_and_drops_the_partial_batch():
    from fastcnf.data.base import DataBundle, DataSplit

    x = torch.arange(10.0).unsqueeze(1)
    bundle = DataBundle(name="fake", train=DataSplit(x), test=DataSplit(x[:2]), shape=(1,), num_classes=None,
                        levels=None, split="fake")
    b = Batcher(bundle, 3, seed=0)
    assert b.steps_per_epoch == 3
    seen = torch.cat([b.next()[0] for _ in range(3)]).flatten()
    assert len(set(seen.tolist())) == 9 and b.epoch == 0
    b.next()
    assert b.epoch == 1


def test_restored_state_continues_the_same_data_order(digits):
    a = Batcher(digits, 16, seed=1)
    for _ in range(200):  # crosses an epoch boundary
        a.next()
    state = a.state_dict()
    expected = [a.next()[0] for _ in range(100)]
    b = Batcher(digits, 16, seed=99)
    b.load_state_dict(state)
    for e in expected:
        torch.testing.assert_close(b.next()[0], e, atol=0, rtol=0)


def test_batch_larger_than_the_training_split_is_a_config_error(digits):
    with pytest.raises(ConfigError, match="exceeds the"):
        Batcher(digits, len(digits.train) + 1, seed=0)


def test_hflip_mirrors_about_half_of_the_training_images_and_resumes():
    import torch

    from fastcnf.data import Batcher
    from fastcnf.data.base import DataBundle, DataSplit

    x = torch.arange(64 * 2 * 3, dtype=torch.uint8).reshape(64, 1, 2, 3)
    bundle = DataBundle(name="fake", train=DataSplit(x, torch.arange(64)), test=DataSplit(x[:2], torch.arange(2)),
                        shape=(1, 2, 3), num_classes=64, levels=256, split="fake")
    plain, flipping = Batcher(bundle, 64, seed=0), Batcher(bundle, 64, seed=0, hflip=True)
    (a, ya), (b, yb) = plain.next(), flipping.next()
    assert torch.equal(ya, yb)
    mirrored = torch.tensor([torch.equal(bi, ai.flip(-1)) for ai, bi in zip(a, b)])
    same = torch.tensor([torch.equal(bi, ai) for ai, bi in zip(a, b)])
    assert bool((mirrored | same).all()) and 16 < int(mirrored.sum()) < 48
    state = flipping.state_dict()
    again = Batcher(bundle, 64, seed=0, hflip=True)
    again.load_state_dict(state)
    assert torch.equal(again.next()[0], flipping.next()[0])
