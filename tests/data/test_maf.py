"""The MAF benchmark loaders on small files written in each set's format; expected values are
computed by hand from the preprocessing of MAF's / FFJORD's loaders (rtqichen/ffjord, datasets/)."""
import h5py
import numpy as np
import pandas as pd
import pytest

from fastcnf.config import DataConfig
from fastcnf.data import DataError, load_data
from fastcnf.data.maf import MAF_FILES


def test_missing_files_are_named(tmp_path):
    for name, files in MAF_FILES.items():
        with pytest.raises(DataError) as err:
            load_data(DataConfig(name=name, root=str(tmp_path)))
        for f in files:
            assert f in str(err.value)


def test_miniboone_splits_in_file_order_and_standardises_by_train_plus_validation(tmp_path):
    (tmp_path / "miniboone").mkdir()
    data = np.arange(60, dtype=np.float64).reshape(20, 3)  # column j: 3 i + j
    np.save(tmp_path / "miniboone" / "data.npy", data)
    b = load_data(DataConfig(name="miniboone", root=str(tmp_path)))
    # N_test = int(0.1 * 20) = 2; N_val = int(0.1 * 18) = 1
    assert (len(b.train), len(b.val), len(b.test)) == (17, 1, 2)
    # train + val = rows 0..17: column 0 is 0, 3, ..., 51, mean 25.5, population std 3 sqrt((18^2 - 1) / 12)
    std = 3 * np.sqrt((18 ** 2 - 1) / 12)
    np.testing.assert_allclose(b.test.x[:, 0].numpy(), [(54 - 25.5) / std, (57 - 25.5) / std], rtol=1e-6)
    np.testing.assert_allclose(b.val.x[0].numpy(), [(51 - 25.5) / std] * 3, rtol=1e-6)
    assert b.standardizer is None and b.shape == (3,)


def test_power_shuffles_drops_columns_1_and_3_and_adds_noise(tmp_path):
    (tmp_path / "power").mkdir()
    n = 50
    raw = np.random.default_rng(1).normal(size=(n, 8)) * 10
    np.save(tmp_path / "power" / "data.npy", raw)
    b = load_data(DataConfig(name="power", root=str(tmp_path)))
    assert b.shape == (6,) and (len(b.train), len(b.val), len(b.test)) == (41, 4, 5)
    # by hand: RandomState(42) permutes the rows, then draws voltage, gap and sub-metering noise
    rng = np.random.RandomState(42)
    perm = rng.permutation(n)
    voltage, gap, sub = 0.01 * rng.rand(n, 1), 0.001 * rng.rand(n, 1), rng.rand(n, 3)
    x = raw[perm][:, [0, 2, 4, 5, 6, 7]] + np.hstack([gap, voltage, sub, np.zeros((n, 1))])
    mu, s = x[:45].mean(0), x[:45].std(0)
    np.testing.assert_allclose(b.test.x.numpy(), ((x[45:] - mu) / s).astype(np.float32), rtol=1e-5, atol=1e-6)
    # the time column gets no noise: it is the shuffled raw column 7, standardised
    t = raw[perm][:, 7]
    np.testing.assert_allclose(b.train.x[:, 5].numpy(), (t[:41] - t[:45].mean()) / t[:45].std(), rtol=1e-5, atol=1e-6)


def test_gas_drops_labels_time_and_correlated_columns_then_standardises_with_ddof_1(tmp_path):
    (tmp_path / "gas").mkdir()
    n = 30
    rng = np.random.default_rng(2)
    a, c = rng.normal(size=n), rng.normal(size=n)
    frame = pd.DataFrame({"Time": np.arange(n), "Meth": rng.normal(size=n), "Eth": rng.normal(size=n),
                          "A": a, "B": 2 * a + 1e-3 * rng.normal(size=n), "C": c})
    frame.to_pickle(tmp_path / "gas" / "ethylene_CO.pickle")
    b = load_data(DataConfig(name="gas", root=str(tmp_path)))
    # A and B correlate above 0.98: the first of them (A) goes; B and C stay
    kept = np.stack([frame["B"].to_numpy(), c], 1)
    z = (kept - kept.mean(0)) / kept.std(0, ddof=1)
    # N_test = 3, N_val = int(0.1 * 27) = 2
    assert (len(b.train), len(b.val), len(b.test)) == (25, 2, 3)
    np.testing.assert_allclose(b.test.x.numpy(), z[27:], rtol=1e-5)
    np.testing.assert_allclose(b.val.x.numpy(), z[25:27], rtol=1e-5)


def test_hepmass_keeps_signal_rows_and_drops_columns_whose_smallest_value_repeats(tmp_path):
    (tmp_path / "hepmass").mkdir()
    rng = np.random.default_rng(3)

    def write(path, n, extra):
        label = np.tile([1, 0], n // 2)
        f0, f1 = rng.normal(size=n), rng.normal(size=n)
        mass = np.where(np.arange(n) % 3 == 0, 500.0, 1000.0)
        cols = [label, f0, f1, mass] + ([rng.normal(size=n)] if extra else [])
        names = ["# label", "f0", "f1", "mass"] + (["junk"] if extra else [])
        with open(path, "w") as fh:
            fh.write(",".join(names) + "\n")
            for r in np.stack(cols, 1):
                fh.write(",".join(repr(float(v)) for v in r) + "\n")
        return np.stack(cols, 1)

    train = write(tmp_path / "hepmass" / "1000_train.csv", 40, False)
    test = write(tmp_path / "hepmass" / "1000_test.csv", 20, True)
    b = load_data(DataConfig(name="hepmass", root=str(tmp_path)))
    sig = train[train[:, 0] == 1][:, 1:]
    mu, s = sig.mean(0), sig.std(0, ddof=1)
    # mass: its smallest value (500) occurs 7 times among the 20 signal rows (> 5): dropped
    z = ((sig - mu) / s)[:, :2]
    tsig = test[test[:, 0] == 1][:, 1:3]
    assert b.shape == (2,) and (len(b.train), len(b.val), len(b.test)) == (18, 2, 10)
    np.testing.assert_allclose(b.train.x.numpy(), z[:18], rtol=1e-5)
    np.testing.assert_allclose(b.test.x.numpy(), (tsig - mu[:2]) / s[:2], rtol=1e-5)


def test_bsds300_reads_the_three_arrays_as_they_are(tmp_path):
    (tmp_path / "BSDS300").mkdir()
    arrays = {k: np.random.default_rng(i).normal(size=(n, 63)).astype(np.float32)
              for i, (k, n) in enumerate((("train", 12), ("validation", 4), ("test", 6)))}
    with h5py.File(tmp_path / "BSDS300" / "BSDS300.hdf5", "w") as f:
        for k, v in arrays.items():
            f[k] = v
    b = load_data(DataConfig(name="bsds300", root=str(tmp_path)))
    np.testing.assert_array_equal(b.train.x.numpy(), arrays["train"])
    np.testing.assert_array_equal(b.val.x.numpy(), arrays["validation"])
    np.testing.assert_array_equal(b.test.x.numpy(), arrays["test"])
