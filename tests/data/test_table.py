"""Tables from files: formats, column selection, labels, splits, memory maps, standardisation."""
import math

import numpy as np
import pytest
import torch

from fastcnf.config import DataConfig
from fastcnf.data import Batcher, DataError, load_data
from fastcnf.data.batcher import model_scale
from fastcnf.data.standardize import Standardizer, column_moments
from fastcnf.data.table import read_rows_like, read_table, select_columns


def _rows(n=50, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 4)) * [1.0, 2.0, 3.0, 4.0] + [0.0, 10.0, -5.0, 100.0]


def _write_text(path, x, header=None, delim=","):
    with open(path, "w") as fh:
        if header:
            fh.write(delim.join(header) + "\n")
        for r in x:
            fh.write(delim.join(repr(float(v)) for v in r) + "\n")


@pytest.mark.parametrize("suffix,delim,header", [(".csv", ",", ["a", "b", "c", "d"]), (".tsv", "\t", None),
                                                 (".txt", " ", ["a", "b", "c", "d"]), (".csv", ",", None)])
def test_text_formats_read_every_value_and_detect_the_header(tmp_path, suffix, delim, header):
    x = _rows()
    path = tmp_path / f"t{suffix}"
    _write_text(path, x, header, delim)
    t = read_table(path)
    assert t.header == (header is not None)
    assert t.names == (header or ["0", "1", "2", "3"])
    np.testing.assert_array_equal(t.values, x)  # repr round-trips float64 exactly


def test_npy_is_memory_mapped_and_npz_needs_a_key_among_several(tmp_path):
    x = _rows()
    np.save(tmp_path / "t.npy", x)
    t = read_table(tmp_path / "t.npy")
    assert t.memory_mapped
    np.testing.assert_array_equal(t.values, x)
    np.savez(tmp_path / "t.npz", x=x, y=x[:, :2])
    with pytest.raises(DataError, match=r"several arrays \(x, y\); choose one with data.key"):
        read_table(tmp_path / "t.npz")
    np.testing.assert_array_equal(read_table(tmp_path / "t.npz", key="y").values, x[:, :2])


def test_columns_by_name_and_index_and_integer_labels(tmp_path):
    x = _rows()
    x[:, 2] = np.arange(50) % 3
    path = tmp_path / "t.csv"
    _write_text(path, x, ["a", "b", "lab", "d"])
    cfg = DataConfig(name="table", path=str(path), columns=["d", 0], label_column="lab", standardize=False)
    b = load_data(cfg, seed=0)
    assert b.shape == (2,) and b.num_classes == 3 and b.columns == ["d", "a"]
    rows = np.vstack([b.train.x.numpy(), b.test.x.numpy()])
    labels = np.concatenate([b.train.y.numpy(), b.test.y.numpy()])
    order = np.lexsort(rows.T)
    ref = x[:, [3, 0]]
    ref_order = np.lexsort(ref.T)
    np.testing.assert_array_equal(rows[order], ref[ref_order])
    np.testing.assert_array_equal(labels[order], x[ref_order, 2].astype(int))


def test_columns_leave_text_columns_out_of_the_parse_and_quoted_cells_keep_their_commas(tmp_path):
    import csv

    x = _rows()
    path = tmp_path / "t.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "a", "name", "b", "lab"])
        for i, r in enumerate(x):  # a name with a comma inside quotes, a date-like id
            name = f"Smith, J{i}" if i % 2 else f"x{i}"
            w.writerow([f"2024-01-{i:02d}", repr(float(r[0])), name, repr(float(r[1])), i % 2])
    with pytest.raises(DataError, match=r"line 2, column 'id': '2024-01-00' is not a number; fix the cell or leave "
                                        r"the column out with data.columns"):
        read_table(path)
    t = read_table(path, columns=["a", 3], label_column="lab")
    np.testing.assert_array_equal(t.values[:, [1, 3]], x[:, :2])  # every value exactly, the commas not split
    np.testing.assert_array_equal(t.values[:, 4], np.arange(50) % 2)
    assert np.isnan(t.values[:, [0, 2]]).all() and t.names == ["id", "a", "name", "b", "lab"]
    b = load_data(DataConfig(name="table", path=str(path), columns=["a", "b"], label_column="lab",
                             standardize=False), seed=0)
    assert b.columns == ["a", "b"] and b.num_classes == 2
    got = np.vstack([b.train.x.numpy(), b.test.x.numpy()])
    np.testing.assert_array_equal(np.sort(got[:, 0]), np.sort(x[:, 0]))
    # a selected cell that is not a number is still named, and a ragged row still refused
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3] + [lines[3].replace(repr(float(x[2][0])), "oops")] + lines[4:]) + "\n")
    with pytest.raises(DataError, match=r"line 4, column 'a': 'oops' is not a number; fix the cell$"):
        read_table(path, columns=["a", "b"])
    path.write_text("\n".join(lines[:3] + [lines[3] + ",extra"] + lines[4:]) + "\n")
    with pytest.raises(DataError, match=r"line 4 has 6 cells, the header 5"):
        read_table(path, columns=["a", "b"])
    with pytest.raises(DataError, match=r"has no column 'zz' \(data.columns\)"):
        read_table(path, columns=["a", "zz"])


@pytest.mark.parametrize("missing", ["", "NA", "n/a", "null", "None", "nan"])
def test_empty_and_missing_value_cells_read_as_nan_and_drop_nonfinite_drops_their_rows(tmp_path, missing):
    x = _rows()
    path = tmp_path / "t.csv"
    _write_text(path, x, ["a", "b", "c", "d"])
    lines = path.read_text().splitlines()
    for r in (3, 8):  # data rows 3 and 8: cells (3, b) and (8, d)
        cells = lines[r + 1].split(",")
        cells[1 if r == 3 else 3] = missing
        lines[r + 1] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    t = read_table(path)
    assert t.header and np.isnan(t.values[3, 1]) and np.isnan(t.values[8, 3]) and np.isnan(t.values).sum() == 2
    keep = np.ones(50, dtype=bool)
    keep[[3, 8]] = False
    np.testing.assert_array_equal(t.values[keep], x[keep])
    with pytest.raises(DataError, match=r"2 missing \(empty, NA\), NaN or inf value\(s\) in 2 row\(s\), the first in "
                                        r"data row 4"):
        load_data(DataConfig(name="table", path=str(path)), seed=0)
    b = load_data(DataConfig(name="table", path=str(path), drop_nonfinite=True, standardize=False), seed=0)
    got = np.vstack([b.train.x.numpy(), b.test.x.numpy()])
    np.testing.assert_array_equal(got[np.lexsort(got.T[::-1])], x[keep][np.lexsort(x[keep].T[::-1])])


def test_seeded_split_sizes_disjoint_and_reproducible(tmp_path):
    x = _rows(100)
    path = tmp_path / "t.csv"
    _write_text(path, x)
    cfg = DataConfig(name="table", path=str(path), test_fraction=0.2, val_fraction=0.1)
    b1, b2, b3 = load_data(cfg, seed=0), load_data(cfg, seed=0), load_data(cfg, seed=1)
    assert (len(b1.train), len(b1.val), len(b1.test)) == (72, 8, 20)  # 20% test, 10% of the other 80 val
    assert torch.equal(b1.test.x, b2.test.x) and not torch.equal(b1.test.x, b3.test.x)
    every = np.vstack([b1.train.x, b1.val.x, b1.test.x])
    assert len(np.unique(every, axis=0)) == 100
    assert "a seeded random 0.2 of the rows (20)" in b1.split


def test_test_and_val_files_are_used_as_given(tmp_path):
    _write_text(tmp_path / "a.csv", _rows(40, 0), ["p", "q", "r", "s"])
    _write_text(tmp_path / "b.csv", _rows(7, 1), ["p", "q", "r", "s"])
    _write_text(tmp_path / "c.csv", _rows(5, 2), ["p", "q", "r", "s"])
    b = load_data(DataConfig(name="table", path=str(tmp_path / "a.csv"), test_path=str(tmp_path / "b.csv"),
                             val_path=str(tmp_path / "c.csv")))
    assert (len(b.train), len(b.val), len(b.test)) == (40, 5, 7)
    np.testing.assert_array_equal(b.test.x.numpy(), _rows(7, 1))


def test_memory_mapped_split_is_in_file_order_and_batches_are_standardised_rows(tmp_path):
    x = _rows(1000)
    np.save(tmp_path / "t.npy", x)
    b = load_data(DataConfig(name="table", path=str(tmp_path / "t.npy"), test_fraction=0.1, val_fraction=0.1))
    assert (len(b.train), len(b.val), len(b.test)) == (810, 90, 100)
    np.testing.assert_array_equal(b.test.x.numpy(), x[900:])
    np.testing.assert_array_equal(b.val.x.numpy(), x[810:900])
    assert "memory-mapped" in b.split
    # no copy: a value written to the file afterwards is seen through the training split
    writer = np.load(tmp_path / "t.npy", mmap_mode="r+")
    writer[3, 1] = 12345.0
    writer.flush()
    assert float(b.train.x[3, 1]) == 12345.0
    writer[3, 1] = x[3, 1]
    writer.flush()
    # statistics of the training rows only, population std (independent reference: numpy)
    np.testing.assert_allclose(b.standardizer.mean, x[:810].mean(0), rtol=1e-12)
    np.testing.assert_allclose(b.standardizer.std, x[:810].std(0), rtol=1e-12)
    batcher = Batcher(b, batch_size=64, seed=0)
    xb, _ = batcher.next()
    idx = batcher.perm[:64].numpy()
    ref = (x[:810][idx] - x[:810].mean(0)) / x[:810].std(0)
    assert xb.dtype == torch.float32
    np.testing.assert_allclose(xb.numpy(), ref, rtol=1e-6, atol=1e-6)


def test_column_moments_are_chunked_and_exact_with_large_offsets():
    x = np.random.default_rng(0).normal(size=(200_000, 2)) + [1e6, -3.0]
    mean, std = column_moments(x)
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(std, x.std(0), rtol=1e-9)


def test_standardizer_jacobian_matches_finite_differences_and_inverse():
    x = torch.tensor([[1.0, 10.0, 100.0], [3.0, 30.0, 500.0]], dtype=torch.float64)
    s = Standardizer.fit(x, ["a", "b", "c"])
    u = s.transform(x)
    np.testing.assert_allclose(s.inverse(u).numpy(), x.numpy(), rtol=1e-6)
    # d u / d x by central finite differences: the log-determinant of the (diagonal) Jacobian
    eps = 1e-3
    jac = torch.stack([(s.transform(x[:1] + eps * e).double() - s.transform(x[:1] - eps * e).double())[0] / (2 * eps)
                       for e in torch.eye(3, dtype=torch.float64)], 1)
    assert math.isclose(float(torch.linalg.slogdet(jac)[1]), s.log_abs_det, rel_tol=1e-3)


def test_evaluation_reports_nats_in_the_data_units(tmp_path):
    """An identity flow (zero velocity) with a standard normal prior is N(mean, diag std^2) in the
    user's units: evaluation's NLL must equal scipy's Gaussian NLL of the test rows."""
    from scipy.stats import norm

    from fastcnf import CNFBlock, ConcatSquashMLP, FlowModel, SequentialFlow
    from fastcnf.config import EvalConfig
    from fastcnf.evaluation.metrics import evaluate_density

    x = _rows(200)
    np.save(tmp_path / "t.npy", x)
    b = load_data(DataConfig(name="table", path=str(tmp_path / "t.npy")))
    model = FlowModel(SequentialFlow([CNFBlock(ConcatSquashMLP(4))], input_shape=(4,)))
    for p in model.parameters():
        p.data.zero_()
    nll = evaluate_density(model, b, EvalConfig())["test_nll_nats"]
    ref = -norm.logpdf(x[160:], b.standardizer.mean, b.standardizer.std).sum(1).mean()
    assert math.isclose(nll, ref, rel_tol=1e-5)
    assert torch.equal(model_scale(b, b.test.x), b.standardizer.transform(b.test.x))


def _correlated(n=300, seed=1):
    g = np.random.default_rng(seed)
    a = np.array([[2.0, 0.0, 0.0], [1.5, 0.5, 0.0], [-1.0, 3.0, 0.2]])
    return g.normal(size=(n, 3)) @ a.T + [5.0, -2.0, 40.0]


def test_whitening_decorrelates_the_training_rows_and_its_log_jacobian_is_the_brute_force_one():
    x = _correlated()
    s = Standardizer.fit(x, ["a", "b", "c"], whiten=True)
    u = s.transform(torch.from_numpy(x)).double().numpy()
    np.testing.assert_allclose(u.mean(0), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.cov(u.T, bias=True), np.eye(3), atol=1e-5)
    # the map is affine: its Jacobian column by column, from differences of far-apart points
    # (exact up to float32 rounding of the output), against the stored log-determinant
    x0 = torch.from_numpy(x[:1])
    jac = torch.stack([(s.transform(x0 + 10.0 * e).double() - s.transform(x0).double())[0] / 10.0
                       for e in torch.eye(3, dtype=torch.float64)], 1)
    assert math.isclose(float(torch.linalg.slogdet(jac)[1]), s.log_abs_det, rel_tol=1e-5)
    # and against the closed form: -1/2 log det of the training rows' covariance
    assert math.isclose(s.log_abs_det, -0.5 * np.linalg.slogdet(np.cov(x.T, bias=True))[1], rel_tol=1e-10)
    np.testing.assert_allclose(s.inverse(s.transform(torch.from_numpy(x))).numpy(), x, rtol=1e-6, atol=1e-5)
    t = Standardizer.from_dict(s.to_dict())
    assert t.log_abs_det == s.log_abs_det and torch.equal(t.transform(x0), s.transform(x0))
    assert Standardizer.from_dict(Standardizer.fit(x, ["a", "b", "c"]).to_dict()).chol is None


def test_whitened_identity_flow_is_the_training_rows_full_covariance_gaussian(tmp_path):
    """A zero-velocity flow on whitened data is N(mean, cov) of the training rows in the user's
    units: evaluation's NLL must equal scipy's multivariate normal NLL of the test rows."""
    from scipy.stats import multivariate_normal

    from fastcnf import CNFBlock, ConcatSquashMLP, FlowModel, SequentialFlow
    from fastcnf.config import EvalConfig
    from fastcnf.evaluation.metrics import evaluate_density

    x = _correlated(250)
    np.save(tmp_path / "t.npy", x)
    b = load_data(DataConfig(name="table", path=str(tmp_path / "t.npy"), standardize="whiten"))
    model = FlowModel(SequentialFlow([CNFBlock(ConcatSquashMLP(3))], input_shape=(3,)))
    for p in model.parameters():
        p.data.zero_()
    nll = evaluate_density(model, b, EvalConfig())["test_nll_nats"]
    train = x[:200]
    ref = -multivariate_normal(train.mean(0), np.cov(train.T, bias=True)).logpdf(x[200:]).mean()
    assert math.isclose(nll, ref, rel_tol=1e-5)


def test_whitening_names_a_linearly_dependent_column_and_rejects_unknown_modes(tmp_path):
    from fastcnf.config.errors import ConfigError

    x = _correlated()
    x = np.concatenate([x, x[:, :1] - 2.0 * x[:, 1:2]], 1)
    with pytest.raises(DataError, match=r"column 'd' of .* linear combination") as e:
        Standardizer.fit(x, ["a", "b", "c", "d"], whiten=True)
    assert "\n" not in str(e.value)
    Standardizer.fit(x, ["a", "b", "c", "d"])  # per-column standardisation does not need full rank
    np.save(tmp_path / "t.npy", x)
    with pytest.raises(DataError, match=r"column '3' of the training split of .*t\.npy"):
        load_data(DataConfig(name="table", path=str(tmp_path / "t.npy"), standardize="whiten"))
    with pytest.raises(ConfigError, match="true, false or whiten"):
        DataConfig(name="table", path="t.npy", standardize="zca").check()


def test_the_split_line_of_a_wide_table_lists_its_first_and_last_columns(tmp_path):
    x = np.random.default_rng(0).normal(size=(40, 30))
    _write_text(tmp_path / "wide.csv", x, [f"c{j}" for j in range(30)])
    b = load_data(DataConfig(name="table", path=str(tmp_path / "wide.csv")), seed=0)
    assert "(30 columns: c0, c1, c2, c3, c4, c5, c6, c7, c8, ..., c28, c29)" in b.split
    assert b.columns == [f"c{j}" for j in range(30)]  # all of them where they are used
    _write_text(tmp_path / "narrow.csv", x[:, :12], [f"c{j}" for j in range(12)])
    b = load_data(DataConfig(name="table", path=str(tmp_path / "narrow.csv")), seed=0)
    assert "(12 columns: " + ", ".join(f"c{j}" for j in range(12)) + ")" in b.split


def test_a_label_column_of_class_names_maps_them_in_sorted_order_and_held_out_files_use_the_training_map(tmp_path):
    rng = np.random.default_rng(0)
    names = np.array(["virginica", "setosa", "versicolor"])
    k = rng.integers(0, 3, 60)
    x = rng.normal(size=(60, 2))

    def write(path, rows, kinds):
        with open(path, "w") as fh:
            fh.write("a,b,kind\n")
            for r, c in zip(rows, kinds):
                fh.write(f"{float(r[0])!r},{float(r[1])!r},{c}\n")
        return str(path)

    train = write(tmp_path / "train.csv", x, names[k])
    t = read_table(train, label_column="kind")
    _, y, cols = select_columns(t, None, "kind")
    assert cols == ["a", "b"] and t.classes == ["setosa", "versicolor", "virginica"]
    np.testing.assert_array_equal(y, np.array([2, 0, 1])[k])  # sorted: setosa 0, versicolor 1, virginica 2
    # a test file with only one of the classes keeps the training file's numbers
    test = write(tmp_path / "test.csv", x[:5], ["virginica"] * 5)
    b = load_data(DataConfig(name="table", path=train, test_path=test, label_column="kind", val_fraction=0.0), seed=0)
    assert b.num_classes == 3 and b.test.y.tolist() == [2] * 5
    assert "labels setosa=0, versicolor=1, virginica=2" in b.split
    np.testing.assert_array_equal(b.train.x.numpy(), x)  # every training row, in file order
    bad = write(tmp_path / "bad.csv", x[:3], ["setosa", "daisy", "setosa"])
    with pytest.raises(DataError, match=r"bad.csv data row 2, label column 'kind': class 'daisy' is not one of the "
                                        r"training file's \(setosa, versicolor, virginica\)"):
        load_data(DataConfig(name="table", path=train, test_path=bad, label_column="kind"), seed=0)
    empty = write(tmp_path / "empty.csv", x[:3], ["setosa", "", "setosa"])
    with pytest.raises(DataError, match=r"empty.csv data row 2, label column 'kind': the label is empty"):
        read_rows_like(empty, None, None, "kind")


def test_a_byte_order_mark_windows_line_ends_and_latin1_text_cells_read_as_the_plain_file(tmp_path):
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfa,b,c\r\n1,2,3\r\n4,5,6.5\r\n")  # a spreadsheet's "CSV UTF-8"
    t = read_table(tmp_path / "bom.csv", columns=["a", "c"])
    assert t.names == ["a", "b", "c"] and t.values[:, [0, 2]].tolist() == [[1.0, 3.0], [4.0, 6.5]]
    (tmp_path / "bom2.csv").write_bytes(b"\xef\xbb\xbf1,2\r\n3,4\r\n")  # no header
    t = read_table(tmp_path / "bom2.csv")
    assert not t.header and t.values.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    (tmp_path / "latin1.csv").write_bytes(b"a,name,b\n1,Jos\xe9,2\n3,Ann,4\n")  # not UTF-8, in a column left out
    t = read_table(tmp_path / "latin1.csv", columns=["a", "b"])
    assert t.values[:, [0, 2]].tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_a_csv_separated_by_semicolons_or_tabs_is_read_with_its_separator(tmp_path):
    x = _rows()
    for name, sep in (("semi.csv", ";"), ("tabs.csv", "\t")):
        _write_text(tmp_path / name, x, ["a", "b", "c", "d"], delim=sep)
        t = read_table(tmp_path / name)
        assert t.names == ["a", "b", "c", "d"]
        np.testing.assert_array_equal(t.values, x)
    _write_text(tmp_path / "one.csv", x[:, :1], ["a"])  # one column: no separator at all
    np.testing.assert_array_equal(read_table(tmp_path / "one.csv").values, x[:, :1])


def test_class_names_that_look_like_numbers_keep_the_training_files_numbers_in_a_held_out_file(tmp_path):
    x = np.random.default_rng(1).normal(size=(12, 2))
    (tmp_path / "train.csv").write_text("a,b,kind\n" + "".join(
        f"{float(r[0])!r},{float(r[1])!r},{'b' if i % 2 else '7'}\n" for i, r in enumerate(x)))
    (tmp_path / "test.csv").write_text("a,b,kind\n" + "".join(f"{float(r[0])!r},{float(r[1])!r},7\n" for r in x[:3]))
    b = load_data(DataConfig(name="table", path=str(tmp_path / "train.csv"), test_path=str(tmp_path / "test.csv"),
                             label_column="kind", val_fraction=0.0), seed=0)
    assert b.class_names == ["7", "b"] and b.test.y.tolist() == [0, 0, 0]  # '7' is class 0, not the number 7
