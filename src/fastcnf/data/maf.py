"""The five tabular density benchmarks of Papamakarios et al. 2017 ("Masked Autoregressive Flow
for Density Estimation", §4.2 and Appendix D): POWER, GAS, HEPMASS, MINIBOONE, BSDS300.

They are read from the files of the MAF data release (``data.tar.gz`` of Zenodo record 1161203)
unpacked under ``data.root``, with exactly the preprocessing of MAF's loaders as FFJORD
(Grathwohl et al. 2019, Table 2) uses them: the reference is the ``datasets/`` folder of
https://github.com/rtqichen/ffjord (``power.py``, ``gas.py``, ``hepmass.py``, ``miniboone.py``,
``bsds300.py``), re-implemented here (not copied) and checked by tests on small files:

* ``power``: ``power/data.npy``; rows shuffled by ``RandomState(42)``, columns 3 and 1 deleted,
  uniform noise added from the same generator (voltage ``0.01 U``, then gap ``0.001 U``, then the
  three sub-meterings ``U``; time none), last 10% test, last 10% of the rest validation,
  standardised with the mean / std (``ddof=0``) of train + validation. 6 columns;
  1,659,917 / 184,435 / 204,928 rows.
* ``gas``: ``gas/ethylene_CO.pickle`` (a pandas DataFrame; needs ``pandas``); columns Meth, Eth
  and Time dropped, then repeatedly the first column correlated above 0.98 with another one,
  standardised with pandas' mean / std (``ddof=1``) of all rows, split in file order as POWER.
  8 columns; 852,174 / 94,685 / 105,206 rows.
* ``hepmass``: ``hepmass/1000_train.csv`` and ``1000_test.csv`` (``pandas.read_csv`` with
  ``index_col=False``); the signal rows (first column 1) without that column, the test file's last
  column dropped, standardised with the training file's pandas mean / std, then every column in
  which the count of its *smallest* value exceeds 5 removed (MAF's test, kept as it is), last 10%
  of the training rows validation. 21 columns; 315,123 / 35,013 / 174,987 rows.
* ``miniboone``: ``miniboone/data.npy``; split and standardised as POWER (no shuffle, no noise).
  43 columns; 29,556 / 3,284 / 3,648 rows.
* ``bsds300``: ``BSDS300/BSDS300.hdf5`` (needs ``h5py``), its ``train`` / ``validation`` /
  ``test`` arrays as they are. 63 columns; 1,000,000 / 50,000 / 250,000 rows.

These sets arrive standardised by their own preprocessing, so ``data.standardize`` does not apply
and test NLLs are in the units the papers report.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .base import DataBundle, DataError, DataSplit

__all__ = ["MAF_SETS", "MAF_FILES", "load_maf", "power_arrays", "gas_arrays", "hepmass_arrays",
           "miniboone_arrays", "bsds300_arrays"]

#: name -> files (relative to ``data.root``) of the MAF data release it is read from
MAF_FILES: dict[str, tuple[str, ...]] = {
    "power": ("power/data.npy",),
    "gas": ("gas/ethylene_CO.pickle",),
    "hepmass": ("hepmass/1000_train.csv", "hepmass/1000_test.csv"),
    "miniboone": ("miniboone/data.npy",),
    "bsds300": ("BSDS300/BSDS300.hdf5",),
}

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]


def _tail_splits(data: np.ndarray) -> Arrays:
    """MAF's split in file order: the last ``int(0.1 N)`` rows test, then the last 10% of the
    rest validation; ``(train, val, test)``."""
    n_test = int(0.1 * data.shape[0])
    test, rest = data[data.shape[0] - n_test:], data[:data.shape[0] - n_test]
    n_val = int(0.1 * rest.shape[0])
    return rest[:rest.shape[0] - n_val], rest[rest.shape[0] - n_val:], test


def _standardise_by_train_val(train: np.ndarray, val: np.ndarray, test: np.ndarray) -> Arrays:
    both = np.vstack((train, val))
    mu, s = both.mean(axis=0), both.std(axis=0)
    return (train - mu) / s, (val - mu) / s, (test - mu) / s


def power_arrays(data: np.ndarray) -> Arrays:
    """POWER's preprocessing of the array of ``power/data.npy`` (see the module docstring)."""
    rng = np.random.RandomState(42)
    data = np.array(data, dtype=np.float64)
    rng.shuffle(data)
    n = data.shape[0]
    data = np.delete(np.delete(data, 3, axis=1), 1, axis=1)
    voltage = 0.01 * rng.rand(n, 1)
    gap = 0.001 * rng.rand(n, 1)
    sub_metering = rng.rand(n, 3)
    data = data + np.hstack((gap, voltage, sub_metering, np.zeros((n, 1))))
    return _standardise_by_train_val(*_tail_splits(data))


def miniboone_arrays(data: np.ndarray) -> Arrays:
    """MINIBOONE's preprocessing of the array of ``miniboone/data.npy``."""
    return _standardise_by_train_val(*_tail_splits(np.asarray(data, dtype=np.float64)))


def _pandas(name: str):
    try:
        import pandas
    except ImportError as e:
        raise DataError(f"data.name={name} reads the MAF release's pandas files: pip install 'fastcnf[maf]' "
                        "(or pandas)") from e
    return pandas


def gas_arrays(frame) -> Arrays:
    """GAS's preprocessing of the DataFrame of ``gas/ethylene_CO.pickle``."""
    data = frame.drop(columns=["Meth", "Eth", "Time"])
    while True:
        counts = (data.corr() > 0.98).to_numpy().sum(axis=1)
        over = np.flatnonzero(counts > 1)
        if over.size == 0:
            break
        data = data.drop(columns=data.columns[over[0]])
    data = (data - data.mean()) / data.std()
    return _tail_splits(data.to_numpy(dtype=np.float64))


def hepmass_arrays(train_frame, test_frame) -> Arrays:
    """HEPMASS's preprocessing of the DataFrames of ``1000_train.csv`` and ``1000_test.csv``."""
    def signal(frame):
        first = frame.columns[0]
        return frame[frame[first] == 1].drop(columns=first)

    train, test = signal(train_frame), signal(test_frame)
    test = test.drop(columns=test.columns[-1])
    mu, s = train.mean(), train.std()
    train, test = ((train - mu) / s).to_numpy(dtype=np.float64), ((test - mu) / s).to_numpy(dtype=np.float64)
    drop = set()
    for j in range(train.shape[1]):
        counts = Counter(train[:, j])
        if counts[min(counts)] > 5:  # the count of the smallest value, as MAF tests it
            drop.add(j)
    train = train[:, [j for j in range(train.shape[1]) if j not in drop]]
    test = test[:, [j for j in range(test.shape[1]) if j not in drop]]
    n_val = int(0.1 * train.shape[0])
    return train[:train.shape[0] - n_val], train[train.shape[0] - n_val:], test


def bsds300_arrays(path: Path) -> Arrays:
    """BSDS300's ``train`` / ``validation`` / ``test`` arrays of ``BSDS300.hdf5``."""
    try:
        import h5py
    except ImportError as e:
        raise DataError("data.name=bsds300 reads an HDF5 file: pip install 'fastcnf[maf]' (or h5py)") from e
    with h5py.File(path, "r") as f:
        return tuple(np.asarray(f[k][:], dtype=np.float64) for k in ("train", "validation", "test"))  # type: ignore[return-value]


_READERS: dict[str, Callable[[list[Path]], Arrays]] = {
    "power": lambda p: power_arrays(np.load(p[0])),
    "gas": lambda p: gas_arrays(_pandas("gas").read_pickle(p[0])),
    "hepmass": lambda p: hepmass_arrays(_pandas("hepmass").read_csv(p[0], index_col=False),
                                        _pandas("hepmass").read_csv(p[1], index_col=False)),
    "miniboone": lambda p: miniboone_arrays(np.load(p[0])),
    "bsds300": lambda p: bsds300_arrays(p[0]),
}
MAF_SETS = tuple(MAF_FILES)


def load_maf(name: str, root: str | None) -> DataBundle:
    """The MAF benchmark ``name`` from the release files under ``root`` (train, validation and
    test splits as float32, as FFJORD trains on them). Raises :class:`DataError` naming the
    expected files when they are absent."""
    base = Path(root).expanduser() if root else Path(".")
    paths = [base / f for f in MAF_FILES[name]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"data.name={name}: missing {', '.join(missing)}; unpack the MAF data release "
                        "(Papamakarios et al. 2017, zenodo.org/record/1161203, data.tar.gz) and set data.root to "
                        f"the folder holding {', '.join(MAF_FILES[name])}")
    try:
        train, val, test = _READERS[name](paths)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"data.name={name}: cannot read {', '.join(map(str, paths))} ({e})") from e

    def split(a: np.ndarray) -> DataSplit:
        return DataSplit(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)))

    return DataBundle(
        name=name, train=split(train), val=split(val), test=split(test), shape=(train.shape[1],),
        num_classes=None, levels=None,
        split=f"MAF {name.upper()} (Papamakarios et al. 2017; preprocessing of MAF's / FFJORD's loaders): "
              f"{len(train)} train / {len(val)} validation / {len(test)} test rows, {train.shape[1]} columns")
