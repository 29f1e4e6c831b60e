"""The containers every data set is returned in, and the helpers shared by all of them.

A loader returns one :class:`DataBundle`: a train and a test :class:`DataSplit`, the per-example
shape, the number of classes, the number of quantisation levels (images only), a sentence stating
which split was used, and, for synthetic sets, a ``sampler`` that draws fresh training batches.

Images stay integer-valued (``torch.uint8`` in ``[0, levels - 1]``) until the trainer calls
:func:`dequantize`, so each epoch sees fresh uniform noise, as FFJORD trains its image models.

References: Grathwohl et al. 2019 (FFJORD) §5 (uniform dequantisation of images); TO-FLOW
(Du et al. 2022, "TO-FLOW: Efficient Continuous Normalizing Flows with Temporal Optimization adjoint
with Moving Speed") eq. 18 (bits/dim of data scaled to ``[0, 1)`` by ``1/256``); Theis et al. 2016
(uniform dequantisation gives a lower bound on the discrete log-likelihood).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DataError",
    "DataSplit",
    "DataBundle",
    "Sampler",
    "dequantize",
    "check_finite",
]


class DataError(ValueError):
    """Bad or missing data. The message names the problem and, for files, the path looked in and
    the files expected there. The command-line interface turns it into exit code 2."""


Sampler = Callable[[int, np.random.Generator], "tuple[Tensor, Tensor | None]"]
"""``sampler(n, rng) -> (x, y)``: ``n`` fresh training examples (float32) and labels or ``None``."""


@dataclass
class DataSplit:
    """One split of a data set.

    Attributes:
        x: ``(N, *shape)`` examples. Images: ``torch.uint8`` in ``[0, levels - 1]``;
            vectors: ``torch.float32``.
        y: ``(N,)`` ``int64`` labels, or ``None`` for unlabelled data.
    """

    x: Tensor
    y: Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.x, Tensor):
            raise DataError(f"DataSplit.x must be a torch.Tensor, got {type(self.x).__name__}")
        if self.y is not None:
            if not isinstance(self.y, Tensor) or self.y.dim() != 1:
                raise DataError("DataSplit.y must be a 1-D torch.Tensor of labels or None")
            if self.y.shape[0] != self.x.shape[0]:
                raise DataError(
                    f"DataSplit has {self.x.shape[0]} examples but {self.y.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def head(self, n: int) -> "DataSplit":
        """The first ``n`` examples (``n`` must not exceed the split's size)."""
        if n > len(self):
            raise DataError(f"asked for the first {n} examples of a split holding {len(self)}")
        return DataSplit(self.x[:n], None if self.y is None else self.y[:n])


@dataclass
class DataBundle:
    """A data set ready for training: both splits plus what a model needs to know about them.

    Attributes:
        name: registry name, e.g. ``"8gaussians"`` or ``"mnist-test-split"``.
        train, test: the two splits.
        shape: per-example shape, e.g. ``(2,)``, ``(1,)``, ``(1, 8, 8)``, ``(3, 32, 32)``.
        num_classes: number of label values (10 for the image sets, 3 for ``mix1d``), or ``None``.
        levels: quantisation levels of images (17 for digits, 256 for MNIST/CIFAR-10); ``None``
            for continuous data.
        split: one sentence saying which split was used; every reported result should quote it.
        sampler: for synthetic sets, ``sampler(n, rng)`` draws a fresh training batch
            (float32 ``x``, labels or ``None``), as FFJORD trains its toy densities; else ``None``.
        val: a validation split, or ``None``.
        class_names: the classes' names in label order (an image folder's sub-folders, a table's label
            names), or ``None``.
        standardizer: tables: the map to the standardised scale the model is trained in
            (:class:`~fastcnf.data.standardize.Standardizer`, applied per batch); ``x`` of every
            split stays in the data's own units. ``None``: the model sees ``x`` as it is.

    Example:
        >>> from fastcnf.data import DataConfig, load_data
        >>> bundle = load_data(DataConfig(name="8gaussians", n_train=512, n_test=256))
        >>> bundle.dim, bundle.is_image, tuple(bundle.train.x.shape)
        (2, False, (512, 2))
    """

    name: str
    train: DataSplit
    test: DataSplit
    shape: tuple[int, ...]
    num_classes: int | None
    levels: int | None
    split: str
    sampler: Sampler | None = None
    val: DataSplit | None = None
    standardizer: "Standardizer | None" = None  # fastcnf.data.standardize (not imported here: no cycle)
    class_names: list[str] | None = None

    @property
    def is_image(self) -> bool:
        """True for quantised image data (``levels`` is set)."""
        return self.levels is not None

    @property
    def dim(self) -> int:
        """Number of scalars per example, ``prod(shape)``."""
        return int(math.prod(self.shape))


def dequantize(x_int: Tensor, levels: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantisation ``(x + u) / levels`` with ``u ~ U[0, 1)``, as float32 in ``[0, 1)``.

    Every returned value ``v`` satisfies ``x / levels <= v < (x + 1) / levels`` exactly, so
    ``floor(v * levels) == x``: float32 rounding at the top of a bin is corrected by one ulp.
    The density of the result on ``[0, 1)^d`` is the quantity bits/dim is computed from (TO-FLOW
    eq. 18 with ``levels = 256``; FFJORD §5).

    Args:
        x_int: integer tensor (any shape) with values in ``[0, levels - 1]``.
        levels: number of quantisation levels (17 for digits, 256 for 8-bit images).
        generator: optional ``torch.Generator`` (on ``x_int``'s device) for reproducible noise.

    Raises:
        DataError: ``x_int`` is floating point, or a value lies outside ``[0, levels - 1]``.
    """
    if levels < 2:
        raise DataError(f"dequantize needs levels >= 2, got {levels}")
    if x_int.is_floating_point() or x_int.is_complex() or x_int.dtype == torch.bool:
        raise DataError(f"dequantize expects integer pixel values, got dtype {x_int.dtype}")
    if x_int.numel() > 0:
        low, high = int(x_int.min()), int(x_int.max())
        if low < 0 or high > levels - 1:
            raise DataError(
                f"dequantize: values must lie in [0, {levels - 1}], found range [{low}, {high}]")
    x64 = x_int.to(torch.float64)
    noise = torch.rand(x_int.shape, generator=generator, device=x_int.device, dtype=torch.float64)
    out = ((x64 + noise) / levels).to(torch.float32)
    # Rounding to float32 can land exactly on a bin edge; step one ulp back inside the bin.
    # (float32 * levels is exact in float64, so these comparisons are exact.)
    scaled = out.to(torch.float64) * levels
    out = torch.where(scaled >= x64 + 1, torch.nextafter(out, torch.zeros_like(out)), out)
    out = torch.where(scaled < x64, torch.nextafter(out, torch.ones_like(out)), out)
    return out


def check_finite(x: Tensor | np.ndarray, what: str) -> None:
    """Raise :class:`DataError` naming ``what`` if ``x`` holds NaN or infinite values."""
    if isinstance(x, np.ndarray):
        bad = int(x.size - np.count_nonzero(np.isfinite(x))) if x.dtype.kind in "fc" else 0
    elif isinstance(x, Tensor):
        bad = int((~torch.isfinite(x)).sum()) if (x.is_floating_point() or x.is_complex()) else 0
    else:
        raise DataError(f"{what}: expected a tensor or array, got {type(x).__name__}")
    if bad:
        raise DataError(f"{what} holds {bad} non-finite value(s) (NaN or inf)")
