"""Standardisation of tables with the training split's statistics.

A model is trained on ``u = (x - mean) / std``; its density in the data's own units is
``log p_x(x) = log p_u(u) - sum_j log std_j`` (change of variables with the diagonal affine map
``u = (x - mean) / std``), and its samples are mapped back with ``x = mean + std * u``. MAF
(Papamakarios et al. 2017, "Masked Autoregressive Flow for Density Estimation", §4.2 and its data
code) and FFJORD (Grathwohl et al. 2019, its ``datasets/`` folder) standardise every tabular set
this way; here the statistics travel with the run so that ``eval``, ``score`` and ``sample``
speak the user's units.

``data.standardize: whiten`` goes one step further: after the per-column map, ``u = L^{-1} z``
with ``L`` the lower Cholesky factor of the standardised training rows' covariance (their
correlation matrix), so the training rows have identity covariance and a flow starts from the best
single Gaussian instead of the best diagonal one; ``log p_x(x) = log p_u(u) - sum_j log std_j -
sum_j log L_jj`` (the map is triangular). Classical whitening (e.g. Kessy, Lewis and Strimmer 2018,
"Optimal Whitening and Decorrelation", the Cholesky variant).

The statistics are computed in float64 over row chunks, so a memory-mapped file is read once and
never copied; :meth:`Standardizer.transform` is applied per batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .base import DataError

__all__ = ["Standardizer", "column_moments", "correlation_cholesky"]

#: a column whose residual variance given the columns before it (in correlation units) is below
#: this is a linear combination of them: whitening refuses it
_SINGULAR = 1e-10

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


def correlation_cholesky(x: np.ndarray | Tensor, mean: np.ndarray, std: np.ndarray, columns: list[str],
                         where: str = "the training split") -> np.ndarray:
    """The lower Cholesky factor ``L`` of the covariance of ``(x - mean) / std`` (float64, read in
    row chunks like :func:`column_moments`). Raises :class:`DataError` naming the first column that
    is (numerically) a linear combination of the columns before it: its residual variance
    ``L_jj^2`` is below ``1e-10``, so the whitened table would have no density."""
    arr = x.numpy() if isinstance(x, Tensor) else x
    n, d = arr.shape
    cov = np.zeros((d, d), dtype=np.float64)
    for start in range(0, n, _CHUNK_ROWS):
        z = (np.asarray(arr[start:start + _CHUNK_ROWS], dtype=np.float64) - mean) / std
        cov += z.T @ z
    cov /= n
    try:
        chol = np.linalg.cholesky(cov)
        if np.all(np.diag(chol) ** 2 > _SINGULAR):
            return chol
    except np.linalg.LinAlgError:
        pass
    for j in range(d):  # the leading blocks: the first column that makes one singular is named
        try:
            lj = np.linalg.cholesky(cov[:j + 1, :j + 1])
        except np.linalg.LinAlgError:
            lj = None
        if lj is None or not lj[j, j] ** 2 > _SINGULAR:
            break
    raise DataError(f"column {columns[j]!r} of {where} is a linear combination of the columns before it, so "
                    "the table cannot be whitened: drop it with data.columns or set data.standardize: true")


@dataclass
class Standardizer:
    """The affine map ``u = (x - mean) / std`` of a table's columns (float64 statistics).

    Attributes:
        mean, std: ``(D,)`` float64 arrays; every ``std`` is positive.
        columns: the column names (for messages and the run's record).
        chol: ``data.standardize: whiten``: the ``(D, D)`` lower Cholesky factor ``L`` of the
            standardised training rows' covariance, and the map is ``u = L^{-1} (x - mean) / std``;
            None: per-column only.

    Example:
        >>> import numpy as np, torch
        >>> s = Standardizer.fit(np.array([[1.0, 10.0], [3.0, 30.0]]), ["a", "b"])
        >>> s.transform(torch.tensor([[2.0, 20.0]])).tolist(), round(s.log_abs_det, 4)
        ([[0.0, 0.0]], -2.3026)
    """

    mean: np.ndarray
    std: np.ndarray
    columns: list[str]
    chol: np.ndarray | None = None

    def __post_init__(self) -> None:
        self._chol_inv_t = None if self.chol is None else np.linalg.inv(self.chol).T  # u = z @ L^{-T}

    @classmethod
    def fit(cls, x: np.ndarray | Tensor, columns: list[str], where: str = "the training split",
            whiten: bool = False) -> "Standardizer":
        """Statistics of ``x`` (rows = examples); ``whiten``: also the Cholesky factor of the
        standardised columns' covariance. Raises :class:`DataError` naming the first constant
        column, which has no scale to divide by (whiten: or the first linearly dependent one)."""
        mean, std = column_moments(x)
        const = [columns[j] for j in np.flatnonzero(~(std > 0))]
        if const:
            raise DataError(f"column {const[0]!r} of {where} is constant ({len(const)} constant column(s)), so it "
                            "cannot be standardised: drop it with data.columns or set data.standardize: false")
        chol = correlation_cholesky(x, mean, std, list(columns), where) if whiten else None
        return cls(mean, std, list(columns), chol)

    @property
    def log_abs_det(self) -> float:
        """``log |det d u / d x| = -sum_j log std_j`` (whitened: ``- sum_j log L_jj`` more): add it
        to a log-density of ``u`` to get the log-density of ``x``."""
        whitening = 0.0 if self.chol is None else float(np.log(np.diag(self.chol)).sum())
        return -float(np.log(self.std).sum()) - whitening

    def transform(self, x: Tensor) -> Tensor:
        """``(x - mean) / std`` (whitened: times ``L^{-T}`` on the right) in float64, returned as
        float32 (a new tensor; any row subset)."""
        mean = torch.from_numpy(self.mean)
        std = torch.from_numpy(self.std)
        z = (x.to(torch.float64) - mean) / std
        if self._chol_inv_t is not None:
            z = z @ torch.from_numpy(self._chol_inv_t)
        return z.to(torch.float32)

    def inverse(self, u: Tensor) -> Tensor:
        """``mean + std * u`` (whitened: ``mean + std * (u L^T)``; float64), e.g. samples of the
        model back in the data's units."""
        u = u.to(torch.float64)
        if self.chol is not None:
            u = u @ torch.from_numpy(self.chol).T
        return torch.from_numpy(self.mean) + torch.from_numpy(self.std) * u

    def to_dict(self) -> dict:
        d = {"mean": self.mean.tolist(), "std": self.std.tolist(), "columns": list(self.columns)}
        if self.chol is not None:
            d["chol"] = self.chol.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Standardizer":
        std = np.asarray(d["std"], dtype=np.float64)
        if not (np.all(np.isfinite(std)) and np.all(std > 0)):
            raise DataError("the run's standardisation has a non-positive or non-finite scale")
        chol = None if d.get("chol") is None else np.asarray(d["chol"], dtype=np.float64)
        if chol is not None and not (np.all(np.isfinite(chol)) and np.all(np.diag(chol) > 0)):
            raise DataError("the run's whitening has a non-positive or non-finite Cholesky factor")
        return cls(np.asarray(d["mean"], dtype=np.float64), std, list(d["columns"]), chol)

    def __repr__(self) -> str:
        kind = "whitened" if self.chol is not None else "per-column"
        return f"Standardizer({len(self.mean)} columns, {kind}, log|det|={self.log_abs_det:.4g})"

