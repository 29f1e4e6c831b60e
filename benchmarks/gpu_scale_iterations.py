"""Seconds per training iteration of GPU-scale recipes at their defaults on this CPU, and what their
length would cost here. They cannot be run to the end on this machine (their data files are not here,
and their papers' lengths are GPU work), so each runs a few iterations on stand-in data; everything
else is the recipe's (model, batch, objective, solver and tolerances, ``solver.gradient``):

* ``maf-*``: a synthetic table of the MAF set's rows and columns (``tabular.synthetic_table``) given as
  ``data.name=table`` (standardised per column, as MAF's loaders standardise their sets);
* ``mnist-*``: MNIST's 10,000 test images (``data.name=mnist-test-split``, ``--mnist-root``), real digits;
* ``cifar10-*``: random bytes in CIFAR-10's binary format, only for recipes whose training solves no ODE
  (Glow, flow matching), whose cost does not depend on the pixels.

Recorded per recipe: the median seconds of iterations 2..K (the first includes ``auto``'s probe), the
forward / backward NFE, and ``iterations x median``, a lower bound of the training time to the
recipe's ``train.iterations`` (the NFE of a likelihood-trained CNF grows as it trains, and the
validations every 200 iterations are not counted; early stopping may end a run sooner).

    python benchmarks/gpu_scale_iterations.py --recipes maf-power maf-power-fm --json benchmarks/results/maf_iterations.json
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import ROOT, read_log, run_metadata, source_env, write_json
from tabular import SYNTH, synthetic_table

RECIPES = ("maf-power", "maf-power-fm", "maf-gas", "maf-gas-fm", "maf-hepmass", "maf-hepmass-fm",
           "maf-miniboone", "maf-miniboone-fm", "maf-bsds300", "maf-bsds300-fm",
           "mnist-fm", "mnist-glow", "mnist-ffjord-1block", "cifar10-glow")


def cifar10_files(work: Path) -> Path:
    """Random records in CIFAR-10's binary format (1 label byte + 3,072 pixel bytes), written once."""
    root = work / "cifar10"
    if not root.exists():
        root.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
            rec = np.concatenate([rng.integers(0, 10, (2000, 1)), rng.integers(0, 256, (2000, 3072))], 1)
            (root / name).write_bytes(rec.astype(np.uint8).tobytes())
    return root


def table_files(name: str, work: Path) -> dict[str, Path]:
    """The synthetic table of MAF set ``name`` as three ``.npy`` files under ``work`` (written once)."""
    files = {k: work / f"{name}_{k}.npy" for k in ("train", "val", "test")}
    if not all(f.exists() for f in files.values()):
        for f, part in zip(files.values(), synthetic_table(f"synth-{name}")):
            np.save(f, part)
    return files


def data_sets(recipe: str, cfg, work: Path, mnist_root: str) -> tuple[list[str], str]:
    """The ``--set`` entries of the stand-in data of ``recipe``, and a line saying what it is."""
    if cfg.data.name == "mnist":
        return ["data.name=mnist-test-split", f"data.root={mnist_root}"], "MNIST's 10,000 test images (9,000 train)"
    if cfg.data.name == "cifar10":
        if cfg.train.objective == "likelihood" and cfg.model.arch != "glow":
            raise ValueError(f"{recipe}: random pixels would not give a CNF's NFE; only Glow / flow matching here")
        return [f"data.root={cifar10_files(work)}"], "random bytes in CIFAR-10's format (10,000 train)"
    files = table_files(cfg.data.name, work)
    return (["data.name=table", "data.root=null", f"data.path={files['train']}", f"data.val_path={files['val']}",
             f"data.test_path={files['test']}", "data.standardize=true"],
            f"synthetic table of {cfg.data.name.upper()}'s size")


def run(recipe: str, iterations: int, work: Path, eval_rows: int, mnist_root: str) -> dict:
    from fastcnf.methods import load_recipe

    cfg = load_recipe(recipe)
    sets, data = data_sets(recipe, cfg, work, mnist_root)
    out = work / recipe
    cmd = [sys.executable, "-m", "fastcnf", "train", recipe, "--quiet", "--force", "--out", str(out), "--set",
           *sets, f"train.iterations={iterations}", "train.log_every=1", "train.val_every=0", "train.patience=0", "train.checkpoint_every=0", "threads=1",
           f"eval.max_examples={eval_rows}", "eval.figures=false"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=source_env(OMP_NUM_THREADS="1"), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    rows = read_log(out / "log.csv")
    seconds = [float(r["seconds"]) for r in rows]
    per_it = statistics.median(seconds[1:] if len(seconds) > 1 else seconds)
    synth = SYNTH.get(f"synth-{cfg.data.name}", (None, None))
    return {"data": data, "columns": synth[0], "train_rows": synth[1], "batch_size": cfg.train.batch_size, "objective": cfg.train.objective, "iterations_run": len(rows),
            "seconds_per_iteration": seconds, "median_seconds_2_to_k": per_it,
            "nfe_forward": [float(r["nfe_forward"]) for r in rows],
            "nfe_backward": [float(r["nfe_backward"]) for r in rows],
            "recipe_iterations": cfg.train.iterations,
            "projected_training_hours_lower_bound": cfg.train.iterations * per_it / 3600, "wall_s": wall}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    ap.add_argument("--iterations", type=int, default=6, help="iterations per likelihood recipe (K)")
    ap.add_argument("--iterations-fm", type=int, default=30, help="iterations per flow-matching recipe")
    ap.add_argument("--eval-rows", type=int, default=1000, help="test rows of the closing evaluation (not timed)")
    ap.add_argument("--mnist-root", default=str(ROOT.parent / "shared" / "data" / "mnist"),
                    help="MNIST's t10k files, for the mnist-* recipes")
    ap.add_argument("--work", default="/tmp/maf_iterations")
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    meta = run_metadata(__file__, argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for recipe in args.recipes:
        k = args.iterations_fm if recipe.endswith("-fm") else args.iterations
        results[recipe] = r = run(recipe, k, work, args.eval_rows, args.mnist_root)
        print(f"{recipe}: {r['median_seconds_2_to_k']:.3f} s per iteration (median of {k - 1}), NFE "
              f"{r['nfe_forward'][-1]:.0f}+{r['nfe_backward'][-1]:.0f}; {r['recipe_iterations']:,} iterations >= "
              f"{r['projected_training_hours_lower_bound']:.1f} h", flush=True)
        write_json(args.json, {**meta, "settings": vars(args), "recipes": results})


if __name__ == "__main__":
    main()
