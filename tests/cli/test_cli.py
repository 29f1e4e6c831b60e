"""CLI contract (fastcnf.cli): recipes, train/eval/sample/resume end to end, ``--set`` forms, plain
progress lines off a terminal, and every bad input (exit 2, one line)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from fastcnf.cli import main

FAST_VALUES = ["model.hidden_dims=[8,8]", "data.n_test=100", "eval.batch_size=100", "train.batch_size=32",
               "solver.atol=1e-3", "solver.rtol=1e-3", "eval.atol=1e-3", "eval.rtol=1e-3", "threads=1"]
FAST = ["--set", *FAST_VALUES]
SRC = str(Path(__file__).resolve().parents[2] / "src")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_recipes_lists_one_line_per_recipe(capsys) -> None:
    code, out, _ = run(capsys, "recipes")
    assert code == 0
    names = [line.split()[0] for line in out.strip().splitlines()]
    assert "toy-ffjord" in names and "digits-cnf" in names
    assert all(len(line.split(None, 1)) == 2 for line in out.strip().splitlines())  # name + description


def test_show_prints_resolved_configuration(capsys) -> None:
    code, out, _ = run(capsys, "train", "toy-ffjord", "--set", "train.lr=0.01", "--set", "data.name=moons", "--show")
    assert code == 0
    cfg = yaml.safe_load(out)
    assert cfg["train"]["lr"] == 0.01 and cfg["data"]["name"] == "moons" and cfg["recipe"] == "toy-ffjord"
    for key in ("iterations", "batch_size", "lr"):
        assert key in cfg["train"]
    assert "root" in cfg["data"] and "seed" in cfg and "device" in cfg


def test_train_eval_sample_resume_end_to_end(tmp_path: Path, capsys) -> None:
    out_dir = tmp_path / "run"
    code, out, _ = run(capsys, "train", "toy-ffjord", "--out", str(out_dir), "--quiet",
                       "--set", "train.iterations=4", "--set", "train.checkpoint_every=2", *FAST)
    assert code == 0 and "metrics:" in out
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["iterations"] == 4
    # re-evaluate at another tolerance
    code, out, _ = run(capsys, "eval", str(out_dir), "--set", "eval.atol=1e-5", "--set", "eval.rtol=1e-5")
    assert code == 0
    assert json.loads((out_dir / "metrics.json").read_text())["eval_tol"] == 1e-5
    assert abs(json.loads(out)["test_nll_nats"] - metrics["test_nll_nats"]) < 0.05
    code, out, _ = run(capsys, "sample", str(out_dir), "--n", "50", "--out", str(tmp_path / "s.png"))
    assert code == 0 and (tmp_path / "s.png").stat().st_size > 0
    # raw samples: an array of shape (N, *data shape); any other suffix is one line and exit code 2
    code, _, _ = run(capsys, "sample", str(out_dir), "--n", "7", "--out", str(tmp_path / "s.npy"))
    assert code == 0 and np.load(tmp_path / "s.npy").shape == (7, 2)
    code, out, err = run(capsys, "sample", str(out_dir), "--n", "7", "--out", str(tmp_path / "s.txt"))
    assert code == 2 and err.count("\n") == 1 and ".npy" in err and not (tmp_path / "s.txt").exists()
    # continue the run to more iterations
    code, _, _ = run(capsys, "train", "--resume", str(out_dir), "--set", "train.iterations=6", "--quiet")
    assert code == 0
    assert json.loads((out_dir / "metrics.json").read_text())["iterations"] == 6
    # starting over in a run directory needs --force
    code, _, err = run(capsys, "train", "toy-ffjord", "--out", str(out_dir), *FAST)
    assert code == 2 and "--resume" in err


@pytest.mark.parametrize("argv, message", [
    (["train", "toy-ffjrd"], "unknown recipe 'toy-ffjrd' (did you mean 'toy-ffjord'?); available:"),
    (["train", "toy-ffjord", "--set", "train.iteration=3"], "did you mean 'train.iterations'"),
    (["train", "toy-ffjord", "--set", "train.lr=fast"], "'train.lr' expects a number"),
    (["train", "toy-ffjord", "--set", "train.lr"], "malformed override 'train.lr'"),
    (["train", "toy-ffjord", "--set", "data.name=nope"], "data.name='nope' is not valid"),
    (["train", "toy-ffjord", "--set", "data.name=mnist", "--set", "data.root=/no/such/dir"], "/no/such/dir"),
    (["train", "toy-ffjord", "--set", "solver.method=dopri"], "accepted: dopri5"),
    (["train", "toy-ffjord", "--set", "model.divergence=exactly"], "accepted: exact, hutchinson"),
    (["train", "--resume", "/no/such/run"], "/no/such/run"),
])
def test_bad_input_is_one_clear_line_and_exit_code_2(capsys, argv, message) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("fastcnf: error:")
    assert message in err
    assert "Traceback" not in err


def test_missing_mnist_files_name_path_and_expected_files(tmp_path: Path, capsys) -> None:
    code, _, err = run(capsys, "train", "toy-ffjord", "--set", "data.name=mnist", "--set", f"data.root={tmp_path}")
    assert code == 2
    assert str(tmp_path) in err and "train-images-idx3-ubyte" in err


def test_corrupt_checkpoint_is_a_clear_error(tmp_path: Path, capsys) -> None:
    out_dir = tmp_path / "run"
    assert main(["train", "toy-ffjord", "--out", str(out_dir), "--quiet", "--set", "train.iterations=2", *FAST]) == 0
    ckpt = out_dir / "checkpoints" / "last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    capsys.readouterr()
    code, _, err = run(capsys, "eval", str(out_dir))
    assert code == 2 and "corrupt or truncated" in err


def test_nan_in_data_is_a_clear_error(tmp_path: Path, capsys, monkeypatch) -> None:
    from fastcnf.data import load_data as real

    def with_nan(cfg, seed=0):
        bundle = real(cfg, seed)
        bundle.sampler = None
        bundle.train.x[3, 0] = float("nan")
        return bundle

    monkeypatch.setattr("fastcnf.training.trainer.load_data", with_nan)
    code, _, err = run(capsys, "train", "toy-ffjord", "--out", str(tmp_path / "r"), "--set", "train.iterations=2", *FAST)
    assert code == 2 and "training data" in err and "NaN" in err


def test_console_script_debug_shows_traceback(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=SRC)
    p = subprocess.run([sys.executable, "-m", "fastcnf", "train", "nope"], capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "unknown recipe" in p.stderr
    p = subprocess.run([sys.executable, "-m", "fastcnf", "--debug", "train", "nope"], capture_output=True, text=True,
                       env=env)
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_a_reader_that_leaves_early_ends_the_command_quietly_with_status_141() -> None:
    """``fastcnf recipes | head -1``: the pipe closes before the listing is written; no traceback."""
    env = dict(os.environ, PYTHONPATH=SRC)
    p = subprocess.Popen([sys.executable, "-m", "fastcnf", "recipes"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # the reader is gone before the first write
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and err == "", err


def test_one_set_flag_with_several_values_equals_repeated_flags(capsys) -> None:
    _, one, _ = run(capsys, "train", "toy-ffjord", "--set", "train.lr=0.01", "data.name=moons", "--show")
    _, two, _ = run(capsys, "train", "toy-ffjord", "--set", "train.lr=0.01", "--set", "data.name=moons", "--show")
    assert one == two and yaml.safe_load(one)["data"]["name"] == "moons"
    # the recipe may follow the values of --set
    _, after, _ = run(capsys, "train", "--set", "train.lr=0.01", "data.name=moons", "toy-ffjord", "--show")
    assert after == one


def test_eval_and_sample_load_the_model_without_a_trainer(tmp_path: Path, capsys, monkeypatch) -> None:
    out_dir = tmp_path / "run"
    assert main(["train", "toy-ffjord", "--out", str(out_dir), "--quiet", "--set", "train.iterations=1",
                 "eval.figures=false", *FAST_VALUES]) == 0

    def no_trainer(*args, **kwargs):
        raise AssertionError("eval and sample must not build a Trainer")

    monkeypatch.setattr("fastcnf.training.trainer.Trainer.__init__", no_trainer)
    capsys.readouterr()
    assert run(capsys, "eval", str(out_dir))[0] == 0
    assert run(capsys, "sample", str(out_dir), "--n", "3", "--out", str(tmp_path / "s.npy"))[0] == 0


def test_train_in_a_subprocess_prints_plain_progress_lines_to_a_pipe(tmp_path: Path) -> None:
    """``fastcnf train --set train.iterations=3 ... toy-ffjord`` with stderr a pipe (not a terminal):
    one plain line per logged iteration, no carriage returns (no progress-bar states)."""
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "fastcnf", "train", "--set", "train.iterations=3", "train.log_every=1",
                        "eval.figures=false", "train.checkpoint_every=0", *FAST_VALUES, "toy-ffjord",
                        "--out", str(tmp_path / "run")],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, timeout=300)
    stderr = p.stderr.decode()  # bytes: text mode would turn carriage returns into newlines
    assert p.returncode == 0, stderr[-2000:]
    assert "\r" not in stderr
    progress = [line for line in stderr.split("\n") if line.startswith("iter ")]
    assert [line.split()[1] for line in progress] == ["1/3", "2/3", "3/3"]
    assert "metrics:" in p.stdout.decode()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["iterations"] == 3
