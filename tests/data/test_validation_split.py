"""The validation split (fastcnf.data.validation): carved from the training split by a seeded
permutation, never from the test split; synthetic sets draw their own."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastcnf.config import ConfigError
from fastcnf.data import DataBundle, DataConfig, DataError, DataSplit, load_data
from fastcnf.data.validation import carve_validation


def _bundle(n: int = 20, sampler=None) -> DataBundle:
    # rows are their own index, so membership can be checked exactly
    x = torch.arange(n, dtype=torch.float32)[:, None]
    return DataBundle(name="rows", train=DataSplit(x, torch.arange(n) % 3), test=DataSplit(-x[:5]),
                      shape=(1,), num_classes=3, levels=None, split="hand-made", sampler=sampler)


def test_validation_rows_leave_the_training_split_and_nothing_else_changes() -> None:
    b = carve_validation(_bundle(20), 0.25, seed=7)
    val, train = b.val.x[:, 0].long(), b.train.x[:, 0].long()
    assert len(val) == 5 and len(train) == 15
    assert sorted(val.tolist() + train.tolist()) == list(range(20))  # a partition of the training rows
    assert train.tolist() == sorted(train.tolist())  # the rest keep their order
    # the rows are those of numpy's permutation with the run's seed
    assert sorted(val.tolist()) == sorted(np.random.default_rng(7).permutation(20)[:5].tolist())
    assert torch.equal(b.val.y, val % 3) and torch.equal(b.train.y, train % 3)  # labels follow their rows
    assert torch.equal(b.test.x, _bundle(20).test.x)  # the test split is never touched
    assert "validation: 5 of the 20 training examples" in b.split and "seed 7" in b.split


def test_validation_split_depends_on_the_seed_only() -> None:
    a, b, c = (carve_validation(_bundle(50), 0.2, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.val.x, b.val.x) and torch.equal(a.train.x, b.train.x)
    assert not torch.equal(a.val.x, c.val.x)


def test_a_loaders_own_validation_split_and_fraction_zero_are_kept() -> None:
    own = _bundle(10)
    own.val = DataSplit(torch.zeros(3, 1))
    assert carve_validation(own, 0.5, 0) is own
    plain = _bundle(10)
    assert carve_validation(plain, 0.0, 0) is plain and plain.val is None


def test_synthetic_sets_draw_a_fixed_validation_sample_from_their_sampler() -> None:
    def sampler(n, rng):
        return torch.from_numpy(rng.standard_normal((n, 1)).astype(np.float32)), None

    b = carve_validation(_bundle(40, sampler=sampler), 0.1, seed=3)
    assert len(b.train) == 40  # training draws fresh batches: nothing is taken from it
    ref, _ = sampler(4, np.random.default_rng(5))  # train seed 3, test seed 4, validation seed 5
    assert torch.equal(b.val.x, ref)


def test_toy_validation_draw_differs_from_train_and_test_draws() -> None:
    b = load_data(DataConfig(name="8gaussians", n_train=500, n_test=300, val_fraction=0.2), seed=4)
    assert len(b.val) == 100 and len(b.train) == 500 and len(b.test) == 300
    assert not torch.equal(b.val.x, b.train.x[:100]) and not torch.equal(b.val.x, b.test.x[:100])


def test_digits_validation_comes_from_the_training_split() -> None:
    plain = load_data(DataConfig(name="digits"))
    b = load_data(DataConfig(name="digits", val_fraction=0.1), seed=0)
    assert torch.equal(b.test.x, plain.test.x) and torch.equal(b.test.y, plain.test.y)
    assert len(b.val) + len(b.train) == len(plain.train) and len(b.val) == round(0.1 * len(plain.train))
    # every validation image is a training image of the plain split, at the permutation's positions
    idx = np.sort(np.random.default_rng(0).permutation(len(plain.train))[:len(b.val)])
    assert torch.equal(b.val.x, plain.train.x[idx]) and torch.equal(b.val.y, plain.train.y[idx])


def test_too_small_a_fraction_is_a_data_error_and_a_bad_one_a_config_error() -> None:
    with pytest.raises(DataError, match="val_fraction=0.01 of the 20 training examples"):
        carve_validation(_bundle(20), 0.01, 0)
    with pytest.raises(ConfigError, match=r"data.val_fraction must be in \[0, 1\)"):
        DataConfig(name="digits", val_fraction=1.0)
