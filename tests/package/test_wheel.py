"""The package as a user installs it: a wheel built from this tree (a copy of it) holds every recipe, installs into
a fresh virtual environment, and its ``fastcnf`` command lists the recipes and trains.

Offline: the wheel is built without build isolation (setuptools of the running environment) and
installed with ``--no-deps``; the fresh environment sees the running environment's packages (torch,
torchdiffeq, ...) through a ``.pth`` line, which puts them on ``sys.path`` after its own
site-packages without running their ``.pth`` files, so the editable install of this tree stays
invisible and ``fastcnf`` is imported from the wheel.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import fastcnf

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted(p.name for p in (REPO / "src" / "fastcnf" / "recipes").glob("*.yaml"))


def _run(cmd: list[str], cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_wheel_holds_the_recipes_installs_in_a_fresh_venv_and_trains(tmp_path: Path) -> None:
    # build from a copy: an in-tree build would leave build/ (and stale modules in it) in the repository
    tree = tmp_path / "tree"
    shutil.copytree(REPO / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tree / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
          str(tmp_path / "dist"), str(tree)], tmp_path)
    wheel = next((tmp_path / "dist").glob("fastcnf-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert sorted(Path(n).name for n in names if n.startswith("fastcnf/recipes/")) == RECIPES
    assert any(n.endswith("entry_points.txt") for n in names)
    # torch as a range (a user's CUDA build satisfies it), and the optional extras
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert "torch>=2.13" in requires and not any(r.startswith("torch==") for r in requires)
    extras = {line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Provides-Extra:")}
    assert {"ot", "maf", "images", "all"} <= extras

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).strip())
    (site / "_running_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)], tmp_path)

    where = _run([str(python), "-c", "import fastcnf; print(fastcnf.__file__)"], tmp_path).strip()
    assert Path(where).is_relative_to(venv) and not Path(where).is_relative_to(Path(fastcnf.__file__).parents[1])
    listed = _run([str(venv / "bin" / "fastcnf"), "recipes"], tmp_path)
    assert all(name[:-5] in listed for name in RECIPES)
    _run([str(venv / "bin" / "fastcnf"), "train", "toy-ffjord", "--set", "train.iterations=2", "model.hidden_dims=[8]",
          "data.n_train=200", "data.n_test=100", "solver.atol=1e-3", "solver.rtol=1e-3", "eval.figures=false",
          "threads=1", "--out", str(tmp_path / "run"), "--quiet"], tmp_path)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["iterations"] == 2 and metrics["test_nll_nats"] is not None
