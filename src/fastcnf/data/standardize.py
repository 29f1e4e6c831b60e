"""Standardisation of tables with the training split's statistics.

A model is trained on ``u = (x - mean) / std``; its density in the data's own units is
``log p_x(x) = log p_u(u) - sum_j log std_j`` (change of variables with the diagonal affine map
``u = (x - mean) / std``), and its samples are mapped back with ``x = mean + std * u``. MAF
(Papamakarios et al. 2017, "Masked Autoregressive Flow for Density Estimation", §4.2 and its data
code) and FFJORD (Grathwohl et al. 2019, its ``datasets/`` folder) standardise every tabular set
this way; here the statistics travel with the run so that ``eval``, ``score`` and ``sample``
speak the user's units.

The statistics are computed in float64 over row chunks, so a memory-mapped file is read once and
never copied; :meth:`Standardizer.transform` is applied per batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .base import DataError

__all__ = ["Standardizer", "column_moments"]

#: rows read at a time when computing statistics of a (memory-mapped) array
_CHUNK_ROWS = 1 << 16


def column_moments(x: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and (population, ``ddof=0``) standard deviation of a 2-D array, in float64,
    read ``65,536`` rows at a time (no copy of a memory-mapped array). Two passes: the mean, then
    the centred sum of squares (numerically stable for large offsets)."""
    arr = x.numpy() if isinstance(x, Tensor) else x
    n = arr.shape[0]
    if n == 0:
        raise DataError("cannot standardise an empty training split")
    total = np.zeros(arr.shape[1], dtype=np.float64)
    for start in range(0, n, _CHUNK_ROWS):
        total += np.asarray(arr[start:start + _CHUNK_ROWS], dtype=np.float64).sum(0)
    mean = total / n
    sq = np.zeros_like(mean)
    for start in range(0, n, _CHUNK_ROWS):
        sq += ((np.asarray(arr[start:start + _CHUNK_ROWS], dtype=np.float64) - mean) ** 2).sum(0)
    return mean, np.sqrt(sq / n)


@dataclass
class Standardizer:
    """The affine map ``u = (x - mean) / std`` of a table's columns (float64 statistics).

    Attributes:
        mean, std: ``(D,)`` float64 arrays; every ``std`` is positive.
        columns: the column names (for messages and the run's record).

    Example:
        >>> import numpy as np, torch
        >>> s = Standardizer.fit(np.array([[1.0, 10.0], [3.0, 30.0]]), ["a", "b"])
        >>> s.transform(torch.tensor([[2.0, 20.0]])).tolist(), round(s.log_abs_det, 4)
        ([[0.0, 0.0]], -2.3026)
    """

    mean: np.ndarray
    std: np.ndarray
    columns: list[str]

    @classmethod
    def fit(cls, x: np.ndarray | Tensor, columns: list[str], where: str = "the training split") -> "Standardizer":
        """Statistics of ``x`` (rows = examples). Raises :class:`DataError` naming the first
        constant column, which has no scale to divide by."""
        mean, std = column_moments(x)
        const = [columns[j] for j in np.flatnonzero(~(std > 0))]
        if const:
            raise DataError(f"column {const[0]!r} of {where} is constant ({len(const)} constant column(s)), so it "
                            "cannot be standardised: drop it with data.columns or set data.standardize: false")
        return cls(mean, std, list(columns))

    @property
    def log_abs_det(self) -> float:
        """``log |det d u / d x| = -sum_j log std_j``: add it to a log-density of ``u`` to get the
        log-density of ``x``."""
        return -float(np.log(self.std).sum())

    def transform(self, x: Tensor) -> Tensor:
        """``(x - mean) / std`` in float64, returned as float32 (a new tensor; any row subset)."""
        mean = torch.from_numpy(self.mean)
        std = torch.from_numpy(self.std)
        return ((x.to(torch.float64) - mean) / std).to(torch.float32)

    def inverse(self, u: Tensor) -> Tensor:
        """``mean + std * u`` (float64), e.g. samples of the model back in the data's units."""
        return torch.from_numpy(self.mean) + torch.from_numpy(self.std) * u.to(torch.float64)

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "columns": list(self.columns)}

    @classmethod
    def from_dict(cls, d: dict) -> "Standardizer":
        std = np.asarray(d["std"], dtype=np.float64)
        if not (np.all(np.isfinite(std)) and np.all(std > 0)):
            raise DataError("the run's standardisation has a non-positive or non-finite scale")
        return cls(np.asarray(d["mean"], dtype=np.float64), std, list(d["columns"]))

    def __repr__(self) -> str:
        return f"Standardizer({len(self.mean)} columns, log|det|={self.log_abs_det:.4g})"

