"""Benchmark: end-to-end Glow vs Glow trained by parts (Flows by Parts, Bhatt & Inouye 2021: alternate, then end-to-end fine-tuning).

For each data set and seed, trains ``digits-glow`` (end to end) and ``digits-glow-parts`` (2 parts
across blocks, 1_1/2 -> 1_1/2, 2; alternate for the first 2/3 of the iterations, end to end for
the last 1/3, as Flows by Parts' (Bhatt & Inouye 2021) 60 + 30 epochs) with the same iterations, evaluating the test bits/dim
every ``--eval-every`` iterations (evaluation time is not counted). Reports, per seed:

* final test bits/dim of both runs and their difference (target: within 0.01);
* training time (wall and CPU of this process, single-threaded) of both runs;
* time to reach the end-to-end model's final test bits/dim (+ ``--tolerance``): the cumulative
  training time at the first evaluation at or below it (target: >= 30% less for parts).

MNIST (``mnist-test-split`` from ``--mnist-root``) runs only when the files are there.

Usage::

    PYTHONPATH=src python benchmarks/parts.py                       # digits, 3 seeds (+ MNIST if present)
    PYTHONPATH=src python benchmarks/parts.py --datasets digits --seeds 0 --iterations 60   # quick

Writes ``benchmarks/results/parts.json`` (command, commit, machine, every figure) and prints a table.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from common import RESULTS, Timer, load_average, run_metadata, time_to_target, write_json

from fastcnf.methods import load_recipe
from fastcnf.training.trainer import Trainer


def run_one(recipe: str, overrides: list[str], eval_every: int, out_dir: Path) -> dict:
    """Train with the trainer's own step, timing only the steps; evaluate every ``eval_every``."""
    cfg = load_recipe(recipe, overrides)
    trainer = Trainer(cfg, out_dir, progress=False)
    curve = []
    timer = Timer()
    while trainer.iteration < cfg.train.iterations:
        with timer:
            ctx = trainer.train_step()
        trainer.iteration += 1
        if not torch.isfinite(ctx["loss"]):
            raise RuntimeError(f"{recipe}: loss diverged at iteration {trainer.iteration}")
        if trainer.iteration % eval_every == 0 or trainer.iteration == cfg.train.iterations:
            m = trainer.evaluate()
            curve.append({"iteration": trainer.iteration, "wall_s": timer.wall, "cpu_s": timer.cpu,
                          "test_bits_per_dim": m["test_bits_per_dim"]})
    return {"recipe": recipe, "overrides": overrides, "curve": curve, "train_wall_s": timer.wall,
            "train_cpu_s": timer.cpu,
            "final_test_bits_per_dim": curve[-1]["test_bits_per_dim"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="digits,mnist")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--iterations", type=int, default=240, help="digits: iterations of both runs")
    ap.add_argument("--mnist-iterations", type=int, default=120)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--tolerance", type=float, default=0.01, help="bits/dim: 'equal' means within this")
    ap.add_argument("--mnist-root", default="/work/shared/data/mnist")
    ap.add_argument("--mnist-seeds", default="0")
    ap.add_argument("--out", default=str(RESULTS / "parts.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    started = run_metadata(__file__)

    setups = []
    for name in args.datasets.split(","):
        if name == "digits":
            setups.append(("digits", [], args.iterations, [int(s) for s in args.seeds.split(",")]))
        elif name == "mnist":
            if not (Path(args.mnist_root) / "t10k-images-idx3-ubyte.gz").exists():
                print(f"skipping mnist: no MNIST t10k files in {args.mnist_root}")
                continue
            setups.append(("mnist-test-split", ["data.name=mnist-test-split", f"data.root={args.mnist_root}",
                                                "train.batch_size=64", "eval.batch_size=500"],
                           args.mnist_iterations, [int(s) for s in args.mnist_seeds.split(",")]))
        else:
            raise SystemExit(f"unknown data set {name!r}; accepted: digits, mnist")

    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="fastcnf-parts-"))
    for data, extra, iterations, seeds in setups:
        for seed in seeds:
            common = [*extra, f"seed={seed}", f"train.iterations={iterations}", "train.checkpoint_every=0",
                      "threads=1"]
            e2e = run_one("digits-glow", common, args.eval_every, tmp / f"{data}-e2e-{seed}")
            parts = run_one("digits-glow-parts", [*common, f"parts.finetune={iterations // 3}"], args.eval_every,
                            tmp / f"{data}-parts-{seed}")
            target = e2e["final_test_bits_per_dim"] + args.tolerance
            row = {"data": data, "seed": seed, "iterations": iterations,
                   "e2e_bits_per_dim": e2e["final_test_bits_per_dim"],
                   "parts_bits_per_dim": parts["final_test_bits_per_dim"],
                   "bits_per_dim_difference": parts["final_test_bits_per_dim"] - e2e["final_test_bits_per_dim"],
                   "e2e_train_wall_s": e2e["train_wall_s"], "parts_train_wall_s": parts["train_wall_s"],
                   "e2e_train_cpu_s": e2e["train_cpu_s"], "parts_train_cpu_s": parts["train_cpu_s"],
                   "target_bits_per_dim": target}
            for key in ("wall_s", "cpu_s"):
                t_e2e, t_parts = (time_to_target(run["curve"], "test_bits_per_dim", target, key)
                                  for run in (e2e, parts))
                row[f"e2e_time_to_target_{key}"] = t_e2e
                row[f"parts_time_to_target_{key}"] = t_parts
                row[f"time_saving_to_target_{key}"] = (None if t_parts is None or not t_e2e
                                                       else 1.0 - t_parts / e2e[f"train_{key}"])
                row[f"total_time_saving_{key}"] = 1.0 - parts[f"train_{key}"] / e2e[f"train_{key}"]
            row["curves"] = {"e2e": e2e["curve"], "parts": parts["curve"]}
            rows.append(row)
            print(f"{data} seed {seed}: e2e {row['e2e_bits_per_dim']:.4f} bpd in {e2e['train_cpu_s']:.1f} s cpu "
                  f"({e2e['train_wall_s']:.1f} s wall); parts {row['parts_bits_per_dim']:.4f} bpd in "
                  f"{parts['train_cpu_s']:.1f} s cpu ({parts['train_wall_s']:.1f} s wall); parts reach "
                  f"{target:.4f} at {row['parts_time_to_target_cpu_s']} s cpu", flush=True)

    print()
    print(f"{'data':<18}{'seed':>5}{'bpd e2e':>9}{'bpd parts':>10}{'diff':>8}{'cpu e2e':>9}{'cpu parts':>10}"
          f"{'saving':>8}{'to target':>10}")
    for r in rows:
        to_target = r["time_saving_to_target_cpu_s"]
        print(f"{r['data']:<18}{r['seed']:>5}{r['e2e_bits_per_dim']:>9.4f}{r['parts_bits_per_dim']:>10.4f}"
              f"{r['bits_per_dim_difference']:>8.4f}{r['e2e_train_cpu_s']:>9.1f}{r['parts_train_cpu_s']:>10.1f}"
              f"{r['total_time_saving_cpu_s']:>8.1%}{'never' if to_target is None else f'{to_target:.1%}':>10}")
    out = write_json(args.out, {"benchmark": "parts", **started, "load_average_end": load_average(),
                                "settings": vars(args), "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
