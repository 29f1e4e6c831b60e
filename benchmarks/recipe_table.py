"""Recipes at their defaults: what ``fastcnf train RECIPE`` reaches and how long it takes.

Each run is ``python -m fastcnf train RECIPE`` with nothing but ``seed``, ``threads=1``, no periodic
checkpoints and no figures (``train.checkpoint_every=0 eval.figures=false``), one process at a time
per invocation; recorded: every number of its ``metrics.json`` (test NLL, bits/dim, sample accuracy,
NFE, ... whatever the recipe reports), its wall time from launch to exit and the child's CPU time
(user + system, ``resource.getrusage``), the load average after. ``images-folder`` needs a folder:
scikit-learn's 8x8 digits written as 8-bit grey PNG files, one sub-folder per class (the
torchvision ImageFolder layout), under ``--work``. Results are saved after every run and an
existing file is resumed (a recipe and seed already recorded is not run again).

    python benchmarks/recipe_table.py --recipes digits-fm digits-glow --seeds 0 --json results/recipe_table.json
    python benchmarks/recipe_table.py --json results/recipe_table.json --table
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, add_resumable_arguments, load_average, load_resumable, run_metadata, source_env, write_json

HERE = Path(__file__).resolve().parent
#: the numbers a row shows first, when the recipe reports them
SHOWN = ("test_nll_nats", "test_bits_per_dim", "test_error", "sample_accuracy", "reconstruction_mse",
         "extrapolation_mse", "eval_nfe_forward", "iterations", "train_seconds")


def digits_image_folder(root: Path) -> Path:
    """scikit-learn's digits as PNG files, ``root/<label>/<index>.png`` (8x8, 8-bit grey)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    folder = root / "digits_png"
    if not folder.exists():
        d = load_digits()
        for i, (img, label) in enumerate(zip(d.images, d.target)):
            (folder / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray((img * 255 / 16).round().astype("uint8")).save(folder / str(label) / f"{i}.png")
    return folder


def run_recipe(recipe: str, seed: int, work: Path, extra: list[str]) -> dict:
    out = work / f"{recipe}-s{seed}"
    sets = [f"seed={seed}", "threads=1", "train.checkpoint_every=0", "eval.figures=false", *extra]
    if recipe == "images-folder":
        sets.append(f"data.path={digits_image_folder(work)}")
    cmd = [sys.executable, "-m", "fastcnf", "train", recipe, "--out", str(out), "--quiet", "--force", "--set", *sets]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(work / f"{recipe}-s{seed}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=source_env(OMP_NUM_THREADS="1"), stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: see {work / f'{recipe}-s{seed}.log'}")
    metrics = json.loads((out / "metrics.json").read_text())
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {"command": " ".join(cmd), "wall_seconds": wall,
            "cpu_seconds": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "load_average_after": load_average(), "metrics": numbers}


def table(results: dict) -> str:
    lines = ["| recipe | seed | " + " | ".join(SHOWN) + " | CPU s | wall s |", "|---" * (len(SHOWN) + 4) + "|"]
    for key, r in results["runs"].items():
        recipe, seed = key.rsplit("/", 1)
        cells = [format(r["metrics"][k], ".4g") if k in r["metrics"] else "-" for k in SHOWN]
        lines.append(f"| {recipe} | {seed} | " + " | ".join(cells) + f" | {r['cpu_seconds']:.1f} | {r['wall_seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="+", default=[])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    add_resumable_arguments(p, HERE / "results" / "recipe_table.json", "/tmp/recipe_table")
    args = p.parse_args(argv)
    results = load_resumable(args.json)
    if args.table:
        print(table(results))
        return
    results["invocations"].append(run_metadata(__file__, argv))
    args.work.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for recipe in args.recipes:
            key = f"{recipe}/{seed}"
            if key in results["runs"]:
                print(f"{key}: recorded, skipped", flush=True)
                continue
            results["runs"][key] = r = run_recipe(recipe, seed, args.work, args.set)
            shown = ", ".join(f"{k} {r['metrics'][k]:.4g}" for k in SHOWN if k in r["metrics"])
            print(f"{key}: {shown}; CPU {r['cpu_seconds']:.1f} s, wall {r['wall_seconds']:.1f} s", flush=True)
            write_json(args.json, results)


if __name__ == "__main__":
    main()
