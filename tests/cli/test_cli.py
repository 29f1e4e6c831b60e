"""CLI contract: recipes, train/eval/sample/resume end to end, and every bad input (exit 2, one line)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fastcnf.cli import main

FAST = ["--set", "model.hidden_dims=[8,8]", "--set", "data.n_test=100", "--set", "eval.batch_size=100",
        "--set", "train.batch_size=32", "--set", "solver.atol=1e-3", "--set", "solver.rtol=1e-3",
        "--set", "eval.atol=1e-3", "--set", "eval.rtol=1e-3"]


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
    (["train", "toy-ffjord", "--set", "data.name=nope"], "unknown data set 'nope'"),
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
    from fastcnf.data import registry

    real = registry.load_data

    def with_nan(cfg, seed=0):
        bundle = real(cfg, seed)
        bundle.sampler = None
        bundle.train.x[3, 0] = float("nan")
        return bundle

    monkeypatch.setattr("fastcnf.training.trainer.load_data", with_nan)
    code, _, err = run(capsys, "train", "toy-ffjord", "--out", str(tmp_path / "r"), "--set", "train.iterations=2", *FAST)
    assert code == 2 and "training data" in err and "NaN" in err


def test_console_script_debug_shows_traceback(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    p = subprocess.run([sys.executable, "-m", "fastcnf", "train", "nope"], capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "unknown recipe" in p.stderr
    p = subprocess.run([sys.executable, "-m", "fastcnf", "--debug", "train", "nope"], capture_output=True, text=True,
                       env=env)
    assert p.returncode != 0 and "Traceback" in p.stderr
