"""`fastcnf score`, `fastcnf.load_run` and every bad input of the data-from-files feature, each
through the command line: one line naming the file, exit code 2, nothing written."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastcnf.cli import main

TINY = ["train.iterations=30", "threads=1", "model.hidden_dims=[16,16]", "train.batch_size=64",
        "eval.max_examples=0", "train.checkpoint_every=30"]


def _csv(path, x, header=("a", "b", "c")):
    with open(path, "w") as fh:
        if header:
            fh.write(",".join(header) + "\n")
        for r in x:
            fh.write(",".join(repr(float(v)) for v in r) + "\n")
    return path


@pytest.fixture(scope="module")
def table_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("score")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3)) * [1.0, 5.0, 50.0] + [0.0, 3.0, 1000.0]
    _csv(d / "train.csv", x[:300])
    _csv(d / "test.csv", x[300:])
    rc = main(["train", "tabular-fm", "--quiet", "--out", str(d / "run"), "--set", f"data.path={d / 'train.csv'}",
               f"data.test_path={d / 'test.csv'}", *TINY])
    assert rc == 0
    return d


def test_score_equals_eval_on_the_same_rows(table_run, capsys):
    d = table_run
    assert main(["eval", str(d / "run")]) == 0
    capsys.readouterr()
    nll = json.loads((d / "run" / "metrics.json").read_text())["test_nll_nats"]
    assert main(["score", str(d / "run"), "--data", str(d / "test.csv"), "--out", str(d / "s.npy"), "--quiet",
                 "--error-control", "batch"]) == 0
    out = capsys.readouterr().out
    assert "exact trace" in out and "atol=1e-05" in out
    scores = np.load(d / "s.npy")
    assert scores.shape == (100,) and scores.dtype == np.float64
    assert math.isclose(-scores.mean(), nll, rel_tol=1e-6)
    # per-row error control (the default): the same log-densities to the tolerance, and the stated check
    assert main(["score", str(d / "run"), "--data", str(d / "test.csv"), "--out", str(d / "r.npy"), "--quiet",
                 "--check-rows", "30"]) == 0
    out = capsys.readouterr().out
    rows = np.load(d / "r.npy")
    assert np.abs(rows - scores).max() < 1e-2 and abs(rows.mean() - scores.mean()) < 1e-3
    check = json.loads((d / "r_check.json").read_text())
    assert check["rows"] == 30 and check["reference_atol"] == 1e-6 and "differ by at most" in out
    assert 0 <= check["mean_abs_diff_nats"] <= check["max_abs_diff_nats"] < 1e-2


def test_fixed_step_score_equals_eval_with_the_same_steps_and_its_check_file_is_recomputable(table_run, capsys):
    d = table_run
    assert main(["eval", str(d / "run"), "--steps", "5", "--method", "rk4"]) == 0
    capsys.readouterr()
    nll = json.loads((d / "run" / "metrics.json").read_text())["fixed_steps"]["rk4-5"]["test_nll_nats"]
    assert main(["score", str(d / "run"), "--data", str(d / "test.csv"), "--out", str(d / "f.npy"), "--quiet",
                 "--steps", "5", "--check-rows", "40"]) == 0
    out = capsys.readouterr().out
    assert "rk4, 5 fixed steps (20 evaluations per row)" in out and "differ by at most" in out
    fixed = np.load(d / "f.npy")
    assert math.isclose(-fixed.mean(), nll, rel_tol=1e-6)
    # the check: the same 40 random rows scored by the adaptive per-row solve at 10x tighter tolerances
    assert main(["score", str(d / "run"), "--data", str(d / "test.csv"), "--out", str(d / "t.npy"), "--quiet",
                 "--check-rows", "0", "--set", "eval.atol=1e-6", "eval.rtol=1e-6"]) == 0
    check = json.loads((d / "f_check.json").read_text())
    idx = np.sort(np.random.default_rng(0).choice(100, size=40, replace=False))
    diff = np.abs(fixed[idx] - np.load(d / "t.npy")[idx])
    assert check["steps"] == 5 and check["method"] == "rk4" and check["reference_method"] == "dopri5"
    assert check["reference_atol"] == 1e-6 and check["rows"] == 40
    assert math.isclose(check["max_abs_diff_nats"], diff.max(), rel_tol=1e-4, abs_tol=1e-6)
    assert math.isclose(check["mean_abs_diff_nats"], diff.mean(), rel_tol=1e-4, abs_tol=1e-6)
    assert check["max_abs_diff_nats"] > 0
    assert main(["score", str(d / "run"), "--data", str(d / "test.csv"), "--out", str(d / "g.npy"), "--quiet",
                 "--steps", "0"]) == 2
    assert "steps" in capsys.readouterr().err and not (d / "g.npy").exists()


def test_npy_memory_map_scores_the_same_and_hutchinson_gives_a_standard_error(table_run, capsys):
    d = table_run
    x = np.loadtxt(d / "test.csv", delimiter=",", skiprows=1)
    np.save(d / "test.npy", x)
    main(["score", str(d / "run"), "--data", str(d / "test.csv"), "--out", str(d / "a.npy"), "--quiet"])
    assert main(["score", str(d / "run"), "--data", str(d / "test.npy"), "--out", str(d / "b.npy"), "--quiet",
                 "--batch-size", "7"]) == 0
    np.testing.assert_allclose(np.load(d / "b.npy"), np.load(d / "a.npy"), rtol=1e-4)
    assert main(["score", str(d / "run"), "--data", str(d / "test.npy"), "--out", str(d / "h.npy"), "--quiet",
                 "--trace", "hutchinson", "--probes", "16"]) == 0
    h, se, exact = np.load(d / "h.npy"), np.load(d / "h_stderr.npy"), np.load(d / "a.npy")
    assert se.shape == (100,) and (se > 0).all()
    # the Hutchinson estimate is unbiased: its mean error is within a few standard errors of 0
    assert abs((h - exact).mean()) < 4 * math.sqrt((se ** 2).sum()) / 100 + 1e-3


def _in_data_units(s, u):
    """``mean + std * (u L^T)`` (``L``: the whitening's Cholesky factor; identity per column)."""
    return s.mean + s.std * (u if s.chol is None else u @ s.chol.T)


def test_load_run_scores_and_samples_in_the_data_units(table_run):
    from fastcnf import load_run

    d = table_run
    run = load_run(d / "run")
    x = torch.from_numpy(np.loadtxt(d / "test.csv", delimiter=",", skiprows=1))
    main(["score", str(d / "run"), "--data", str(d / "test.csv"), "--out", str(d / "c.npy"), "--quiet",
          "--error-control", "batch"])
    with torch.no_grad():
        np.testing.assert_allclose(run.log_prob(x).double().numpy(), np.load(d / "c.npy"), rtol=1e-5)
    s = run.standardizer
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    with torch.no_grad():
        samples = run.sample(5, generator=g1)
        u = run.flow.sample(5, generator=g2)
    np.testing.assert_allclose(samples.numpy(), _in_data_units(s, u.double().numpy()), rtol=1e-6)


def _fails(capsys, argv, *needles):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("fastcnf: error:"), err
    for n in needles:
        assert n in err, err
    return err


def _train_fails(capsys, tmp_path, sets, *needles, recipe="tabular"):
    out = tmp_path / "out"
    _fails(capsys, ["train", recipe, "--quiet", "--out", str(out), "--set", *sets, "threads=1"], *needles)
    assert not out.exists()  # nothing written


def test_bad_tables_each_give_one_line_and_exit_2(tmp_path, capsys):
    _train_fails(capsys, tmp_path, [f"data.path={tmp_path / 'missing.csv'}"], "missing.csv", "no such file")
    (tmp_path / "t.xls").write_text("1,2\n")
    _train_fails(capsys, tmp_path, [f"data.path={tmp_path / 't.xls'}"], "t.xls", "unknown extension '.xls'")
    (tmp_path / "empty.csv").write_text("")
    _train_fails(capsys, tmp_path, [f"data.path={tmp_path / 'empty.csv'}"], "empty.csv", "is empty")
    (tmp_path / "cell.csv").write_text("a,b\n1,2\n3,x7\n")
    _train_fails(capsys, tmp_path, [f"data.path={tmp_path / 'cell.csv'}"], "cell.csv line 3, column 'b'",
                 "'x7' is not a number")
    x = np.random.default_rng(0).normal(size=(50, 2))
    x[[4, 9], 1] = np.nan
    x[20, 0] = np.inf
    _csv(tmp_path / "nan.csv", x, ("a", "b"))
    _train_fails(capsys, tmp_path, [f"data.path={tmp_path / 'nan.csv'}"], "nan.csv",
                 "3 missing (empty, NA), NaN or inf value(s)",
                 "first in data row 5", "data.drop_nonfinite: true")
    x = np.random.default_rng(0).normal(size=(50, 3))
    x[:, 1] = 7.0
    _csv(tmp_path / "const.csv", x, ("a", "flat", "c"))
    _train_fails(capsys, tmp_path, [f"data.path={tmp_path / 'const.csv'}"], "column 'flat'", "const.csv", "constant")
    x = np.random.default_rng(0).normal(size=(50, 3))
    x[:, 2] = np.arange(50) % 2 + 0.5
    _csv(tmp_path / "lab.csv", x, ("a", "b", "y"))
    _train_fails(capsys, tmp_path, [f"data.path={tmp_path / 'lab.csv'}", "data.label_column=y"], "lab.csv",
                 "label column 'y'", "not an integer")


def test_a_path_given_to_a_data_set_that_ignores_it_is_refused(tmp_path, capsys):
    _train_fails(capsys, tmp_path, ["data.name=8gaussians", f"data.path={tmp_path / 'x.csv'}"], "data.path",
                 "'8gaussians' ignores them")


def test_drop_nonfinite_drops_those_rows(tmp_path):
    from fastcnf.config import DataConfig
    from fastcnf.data import load_data

    x = np.random.default_rng(0).normal(size=(50, 2))
    x[[4, 9], 1] = np.nan
    _csv(tmp_path / "nan.csv", x, ("a", "b"))
    b = load_data(DataConfig(name="table", path=str(tmp_path / "nan.csv"), drop_nonfinite=True))
    assert len(b.train) + len(b.test) == 48 and torch.isfinite(b.train.x).all()


def _images(root, n=6, size=(8, 8), mode="L"):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)).convert(mode).save(
                root / c / f"{i}.png")
    return root


def test_bad_image_folders_each_give_one_line_and_exit_2(tmp_path, capsys):
    _train_fails(capsys, tmp_path, [f"data.path={tmp_path / 'nowhere'}"], "nowhere", "no such folder",
                 recipe="images-folder")
    (tmp_path / "empty").mkdir()
    _train_fails(capsys, tmp_path, [f"data.path={tmp_path / 'empty'}"], "empty", "holds no PNG / JPEG images",
                 recipe="images-folder")
    _images(tmp_path / "sizes")
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(tmp_path / "sizes" / "b" / "odd.png")
    _train_fails(capsys, tmp_path, [f"data.path={tmp_path / 'sizes'}"], "mixes image sizes", "a/0.png",
                 "b/odd.png", recipe="images-folder")
    _images(tmp_path / "modes")
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(tmp_path / "modes" / "b" / "deep.png")
    _train_fails(capsys, tmp_path, [f"data.path={tmp_path / 'modes'}"], "b/deep.png", "'I;16'", "8-bit",
                 recipe="images-folder")
    _images(tmp_path / "broken")
    (tmp_path / "broken" / "a" / "z.png").write_bytes(b"\x89PNG garbage")
    _train_fails(capsys, tmp_path, [f"data.path={tmp_path / 'broken'}"], "z.png", "not a readable image",
                 recipe="images-folder")


def test_score_to_csv_writes_the_npy_values_in_one_file_and_reads_past_a_text_column(table_run, tmp_path):
    import csv

    d = table_run
    x = np.loadtxt(d / "test.csv", delimiter=",", skiprows=1)
    base = ["score", str(d / "run"), "--quiet", "--check-rows", "0"]
    assert main([*base, "--data", str(d / "test.csv"), "--out", str(tmp_path / "a.npy")]) == 0
    assert main([*base, "--data", str(d / "test.csv"), "--out", str(tmp_path / "a.csv")]) == 0
    lines = (tmp_path / "a.csv").read_text().splitlines()
    assert lines[0] == "log_prob" and len(lines) == 101
    np.testing.assert_array_equal(np.array([float(v) for v in lines[1:]]), np.load(tmp_path / "a.npy"))  # exactly
    assert not (tmp_path / "a_check.json").exists()
    # Hutchinson: the standard error is the second column
    assert main([*base, "--data", str(d / "test.csv"), "--trace", "hutchinson", "--probes", "4",
                 "--out", str(tmp_path / "h.csv")]) == 0
    assert main([*base, "--data", str(d / "test.csv"), "--trace", "hutchinson", "--probes", "4",
                 "--out", str(tmp_path / "h.npy")]) == 0
    h = np.loadtxt(tmp_path / "h.csv", delimiter=",", skiprows=1)
    assert (tmp_path / "h.csv").read_text().startswith("log_prob,stderr\n")
    np.testing.assert_array_equal(h, np.column_stack([np.load(tmp_path / "h.npy"), np.load(tmp_path / "h_stderr.npy")]))
    # a file with an id and a quoted name between the columns: a run trained on it with data.columns scores
    # its rows as it scores the same rows without those columns
    def named(path, rows):
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "a", "name", "b", "c"])
            for i, r in enumerate(rows):
                w.writerow([f"row-{i}", repr(float(r[0])), f"Doe, J{i}", repr(float(r[1])), repr(float(r[2]))])
        return path

    train = np.loadtxt(d / "train.csv", delimiter=",", skiprows=1)
    assert main(["train", "tabular-fm", "--quiet", "--out", str(tmp_path / "run"), "--set",
                 f"data.path={named(tmp_path / 'train.csv', train)}", "data.columns=[a,b,c]",
                 f"data.test_path={named(tmp_path / 'test.csv', x)}", *TINY]) == 0
    run = ["score", str(tmp_path / "run"), "--quiet", "--check-rows", "0"]
    assert main([*run, "--data", str(tmp_path / "test.csv"), "--out", str(tmp_path / "n.npy")]) == 0
    assert main([*run, "--data", str(d / "test.csv"), "--out", str(tmp_path / "p.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "n.npy"), np.load(tmp_path / "p.npy"))


def test_score_refuses_files_unlike_the_run_and_writes_nothing(table_run, tmp_path, capsys):
    d = table_run
    out = tmp_path / "s.npy"
    x = np.random.default_rng(1).normal(size=(10, 4))
    _csv(tmp_path / "four.csv", x, ("a", "b", "c", "d"))
    _fails(capsys, ["score", str(d / "run"), "--data", str(tmp_path / "four.csv"), "--out", str(out)],
           "four.csv", "4 feature column(s)", "trained on 3 (a, b, c)")
    _csv(tmp_path / "renamed.csv", x[:, :3], ("a", "c", "b"))
    _fails(capsys, ["score", str(d / "run"), "--data", str(tmp_path / "renamed.csv"), "--out", str(out)],
           "renamed.csv", "a, c, b", "trained on a, b, c")
    _fails(capsys, ["score", str(d / "run"), "--data", str(tmp_path / "nope.npy"), "--out", str(out)],
           "nope.npy", "no such file")
    assert not out.exists()


def test_image_folder_run_scores_in_bits_per_dim_and_checks_the_size(tmp_path, capsys):
    root = _images(tmp_path / "imgs")
    run = tmp_path / "run"
    assert main(["train", "images-folder", "--quiet", "--out", str(run), "--set", f"data.path={root}",
                 "train.iterations=2", "threads=1", "model.unet.channels=8", "train.batch_size=4",
                 "eval.atol=1e-3", "eval.rtol=1e-3", "eval.max_examples=2", "eval.n_samples=4",
                 "train.checkpoint_every=2", "train.warmup_iterations=0", "flow_matching.coupling=independent"]) == 0
    capsys.readouterr()
    assert main(["score", str(run), "--data", str(root / "a"), "--out", str(tmp_path / "s.npy"), "--quiet",
                 "--trace", "hutchinson", "--probes", "2"]) == 0
    assert json.loads((run / "data.json").read_text())["class_names"] == ["a", "b"]  # the sub-folders
    lp, bpd = np.load(tmp_path / "s.npy"), np.load(tmp_path / "s_bits_per_dim.npy")
    assert lp.shape == (6,) and (tmp_path / "s_stderr.npy").exists()
    np.testing.assert_allclose(bpd, -(lp / 64 - math.log(256)) / math.log(2), rtol=1e-10)
    _images(tmp_path / "big", size=(9, 9))
    _fails(capsys, ["score", str(run), "--data", str(tmp_path / "big" / "a"), "--out", str(tmp_path / "t.npy")],
           "0.png", "the run was trained on 1x8x8")
    assert not (tmp_path / "t.npy").exists()
    _fails(capsys, ["sample", str(run), "--n", "2", "--out", str(tmp_path / "i.csv")], "i.csv", ".png or .npy")
    assert not (tmp_path / "i.csv").exists()


def test_sample_writes_rows_in_the_data_units(table_run, capsys):
    from fastcnf import load_run

    d = table_run
    assert main(["sample", str(d / "run"), "--n", "7", "--seed", "4", "--out", str(d / "x.npy")]) == 0
    run = load_run(d / "run")
    torch.manual_seed(4)
    with torch.no_grad():
        u = run.flow.sample(7).float().double()
    s = run.standardizer
    np.testing.assert_allclose(np.load(d / "x.npy"), _in_data_units(s, u.numpy()), rtol=1e-6)
    # .csv: the same samples under the table's column names, read back exactly
    assert main(["sample", str(d / "run"), "--n", "7", "--seed", "4", "--out", str(d / "x.csv")]) == 0
    lines = (d / "x.csv").read_text().splitlines()
    assert lines[0] == "a,b,c" and len(lines) == 8
    np.testing.assert_array_equal(np.loadtxt(d / "x.csv", delimiter=",", skiprows=1), np.load(d / "x.npy"))


def test_a_label_column_makes_the_class_conditional_model_available(tmp_path, capsys):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = np.column_stack([rng.normal(size=300) + 4 * y, rng.normal(size=300), y])
    _csv(tmp_path / "lab.csv", x, ("a", "b", "label"))
    assert main(["train", "tabular-cnf", "--quiet", "--out", str(tmp_path / "run"), "--set",
                 f"data.path={tmp_path / 'lab.csv'}", "data.label_column=label", "conditioning.kind=ccnf",
                 "train.iterations=2", "threads=1", "model.hidden_dims=[8]", "eval.sample_accuracy_per_class=0"]) == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["test_error"] is not None and "label" not in m["split"].split("columns: ")[1].split(")")[0]
    assert json.loads((tmp_path / "run" / "data.json").read_text())["num_classes"] == 3


def test_a_label_column_of_names_trains_the_conditional_model_and_sample_takes_a_class_by_name(tmp_path, capsys):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = np.column_stack([rng.normal(size=300) + 4 * y, rng.normal(size=300)])
    names = np.array(["low", "mid", "high"])  # sorted: high 0, low 1, mid 2
    with open(tmp_path / "lab.csv", "w") as fh:
        fh.write("a,b,kind\n")
        fh.writelines(f"{float(r[0])!r},{float(r[1])!r},{names[k]}\n" for r, k in zip(x, y))
    run = tmp_path / "run"
    assert main(["train", "tabular-cnf", "--quiet", "--out", str(run), "--set", f"data.path={tmp_path / 'lab.csv'}",
                 "data.label_column=kind", "conditioning.kind=ccnf", "train.iterations=2", "threads=1",
                 "model.hidden_dims=[8]", "eval.sample_accuracy_per_class=0", "train.val_every=0",
                 "train.patience=0"]) == 0
    record = json.loads((run / "data.json").read_text())
    assert record["num_classes"] == 3 and record["class_names"] == ["high", "low", "mid"]
    assert "labels high=0, low=1, mid=2" in json.loads((run / "metrics.json").read_text())["split"]
    assert main(["sample", str(run), "--n", "5", "--seed", "3", "--label", "mid", "--out", str(tmp_path / "m.npy")]) == 0
    assert main(["sample", str(run), "--n", "5", "--seed", "3", "--label", "2", "--out", str(tmp_path / "n.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), np.load(tmp_path / "n.npy"))
    capsys.readouterr()
    _fails(capsys, ["sample", str(run), "--n", "5", "--label", "top", "--out", str(tmp_path / "t.npy")],
           "--label 'top' is not a class of this run (high, low, mid)")
    from fastcnf import load_run

    assert load_run(run).record.class_names == ["high", "low", "mid"]
