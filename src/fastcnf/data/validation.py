"""The validation split: a seeded share of the training split, held out for early stopping.

Density models trained with early stopping (Papamakarios et al. 2017, "Masked Autoregressive Flow
for Density Estimation", §4; Grathwohl et al. 2019, "FFJORD", §5.2 on the tabular sets) choose
their weights on a validation split taken from the training data, never from the test split, so
the reported test NLL stays an unbiased estimate.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .base import DataBundle, DataError, DataSplit

__all__ = ["carve_validation"]


def carve_validation(bundle: DataBundle, fraction: float, seed: int) -> DataBundle:
    """``bundle`` with a validation split of ``fraction`` of its training split (``data.val_fraction``).

    A bundle that already has one (a loader that reads its own validation file) and ``fraction``
    0 leave ``bundle`` unchanged. Synthetic sets (with a ``sampler``) keep drawing fresh training
    batches and get a fixed validation draw of ``round(fraction * n_train)`` examples (numpy seed
    ``seed + 2``; train and test use ``seed`` and ``seed + 1``). Other sets lose
    ``round(fraction * N)`` training examples chosen by a permutation seeded with ``seed``; the
    rest keep their order. ``bundle.split`` states which.

    Raises:
        DataError: the split would leave no validation or no training example.

    Example:
        >>> from fastcnf.data import DataConfig, load_data
        >>> bundle = load_data(DataConfig(name="digits", val_fraction=0.1))
        >>> len(bundle.train), len(bundle.val), len(bundle.test)
        (1293, 144, 360)
    """
    if bundle.val is not None or fraction <= 0:
        return bundle
    n = len(bundle.train)
    n_val = int(round(fraction * n))
    if bundle.sampler is not None:
        if n_val < 1:
            raise DataError(f"data.val_fraction={fraction} of {n} training draws of {bundle.name!r} is no "
                            f"validation example; raise data.val_fraction or data.n_train")
        val = DataSplit(*bundle.sampler(n_val, np.random.default_rng(seed + 2)))
        return dataclasses.replace(bundle, val=val, split=f"{bundle.split}; a fixed validation draw of {n_val} "
                                                          f"(numpy seed {seed + 2})")
    if not 1 <= n_val <= n - 1:
        raise DataError(f"data.val_fraction={fraction} of the {n} training examples of {bundle.name!r} leaves "
                        f"{n_val} for validation and {n - n_val} for training; both need at least one")
    order = np.random.default_rng(seed).permutation(n)
    val_idx = torch.from_numpy(np.sort(order[:n_val]))
    train_idx = torch.from_numpy(np.sort(order[n_val:]))

    def take(split: DataSplit, idx: torch.Tensor) -> DataSplit:
        return DataSplit(split.x[idx], None if split.y is None else split.y[idx])

    return dataclasses.replace(
        bundle, train=take(bundle.train, train_idx), val=take(bundle.train, val_idx),
        split=f"{bundle.split}; validation: {n_val} of the {n} training examples (random, numpy seed {seed}), "
              f"{n - n_val} left for training")
