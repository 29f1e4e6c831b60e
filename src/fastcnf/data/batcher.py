"""Mini-batches for training: fresh draws from a sampler or epochs of a fixed permutation."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fastcnf.config import ConfigError
from fastcnf.data.base import DataBundle

__all__ = ["Batcher", "shard_rows", "flip_horizontally", "model_scale"]


def flip_horizontally(x: Tensor, generator: torch.Generator) -> Tensor:
    """Each image of ``x`` (B, C, H, W) mirrored left-right with probability 1/2 (a copy)."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    out = x.clone()
    out[flip] = x[flip].flip(-1)
    return out


def shard_rows(x: Tensor, y: Tensor | None, rank: int, world_size: int):
    """Rows ``[rank*n/W, (rank+1)*n/W)`` of a global batch (every rank drew the same batch)."""
    if world_size <= 1:
        return x, y
    n = x.shape[0] // world_size
    sl = slice(rank * n, (rank + 1) * n)
    return x[sl], (None if y is None else y[sl])


def model_scale(bundle: DataBundle, x: Tensor) -> Tensor:
    """Rows of a split in the scale the model is trained in: standardised by the bundle's
    :class:`~fastcnf.data.standardize.Standardizer` if it has one; float64 tables as float32."""
    if bundle.standardizer is not None:
        return bundle.standardizer.transform(x)
    return x.float() if x.dtype == torch.float64 else x


class Batcher:
    """Mini-batches: fresh draws from a sampler (toy sets, as FFJORD trains them) or epochs of a
    fixed permutation of the training split. Its whole state is checkpointed.

    Under data-parallel training every rank draws the same global batch (same seeds, like
    ``DistributedSampler``) and keeps its rows (:func:`shard_rows`).

    ``hflip``: each training image (B, C, H, W) is flipped left-right with probability 1/2
    (InfoCNF §4.1, CIFAR-10), drawn from the batcher's own generator (checkpointed).

    Example:
        >>> from fastcnf.data import DataConfig, load_data
        >>> batcher = Batcher(load_data(DataConfig(name="digits")), batch_size=32, seed=0)
        >>> x, y = batcher.next()
        >>> x.shape, y.shape
        (torch.Size([32, 1, 8, 8]), torch.Size([32]))
    """

    def __init__(self, bundle: DataBundle, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 hflip: bool = False) -> None:
        self.bundle = bundle
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.rng = np.random.default_rng(seed + 7919)
        self.gen = torch.Generator().manual_seed(seed + 104729)
        self.hflip = bool(hflip)
        if self.hflip and len(bundle.shape) != 3:
            raise ConfigError(f"data.hflip needs images (C, H, W); {bundle.name!r} has examples of shape {bundle.shape}")
        self.flip_gen = torch.Generator().manual_seed(seed + 15485863)
        self.perm: Tensor | None = None
        self.pos = 0
        self.epoch = 0
        n = len(bundle.train)
        if bundle.sampler is None and batch_size > n:
            raise ConfigError(f"train.batch_size={batch_size} exceeds the {n} training examples")
        # an epoch drops its last partial batch, so it is n // batch_size steps
        self.steps_per_epoch = max(1, n // batch_size) if n else 1

    def next(self) -> tuple[Tensor, Tensor | None]:
        """This rank's shard of the next global batch (the whole batch in one process)."""
        x, y = self._next_global()
        if self.hflip:
            x = flip_horizontally(x, self.flip_gen)
        return shard_rows(x, y, self.rank, self.world_size)

    def _next_global(self) -> tuple[Tensor, Tensor | None]:
        b = self.bundle
        if b.sampler is not None:
            return b.sampler(self.batch_size, self.rng)
        n = len(b.train)
        if self.perm is None or self.pos + self.batch_size > n:
            if self.perm is not None:
                self.epoch += 1
            self.perm = torch.randperm(n, generator=self.gen)
            self.pos = 0
        idx = self.perm[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        # only these rows are read (a memory-mapped table stays on disk), then put in the model's scale
        return model_scale(b, b.train.x[idx]), (None if b.train.y is None else b.train.y[idx])

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "gen": self.gen.get_state(),
                "perm": self.perm, "pos": self.pos, "epoch": self.epoch, "flip_gen": self.flip_gen.get_state()}

    def load_state_dict(self, s: dict) -> None:
        self.rng.bit_generator.state = s["rng"]
        self.gen.set_state(s["gen"])
        self.perm, self.pos, self.epoch = s["perm"], int(s["pos"]), int(s["epoch"])
        if "flip_gen" in s:  # checkpoints before data.hflip have none
            self.flip_gen.set_state(s["flip_gen"])
