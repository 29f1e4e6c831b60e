"""OT-CFM vs independent CFM per training step through the real trainer (``Trainer.train_step``),
side by side in one run, batch 256, one whole-batch assignment (``flow_matching.ot_batch_size=0``).

Sides: ``independent`` (``toy-fm``), ``exact`` (``toy-otcfm``, pairing in line,
``flow_matching.background_pairing=false``), ``exact-background`` (``toy-otcfm``, the next batch
paired in one worker thread while the step runs, ``pairing_workers=1``) and ``exact-background-2``
(two workers, the next two batches in flight: ``flow_matching.pairing_workers=2``); ``--sides``
picks some. The sides run in blocks of ``--block`` steps in rotation, so load on the shared machine
hits all alike; a block's first step is not timed and a side's pending pairings are finished before
the next side runs (no worker overlaps another side's step). Per side: median wall and process CPU
time (all threads) per step, and the ratio to ``independent``'s.

    PYTHONPATH=src .venv/bin/python benchmarks/ot_pairing_trainer.py --steps 200 \
        --json benchmarks/results/ot_pairing_trainer.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fastcnf.methods import load_recipe  # noqa: E402
from fastcnf.training.trainer import Trainer  # noqa: E402

SIDES = {"independent": ("toy-fm", []),
         "exact": ("toy-otcfm", ["flow_matching.background_pairing=false"]),
         "exact-background": ("toy-otcfm", ["flow_matching.background_pairing=true",
                                            "flow_matching.pairing_workers=1"]),
         "exact-background-2": ("toy-otcfm", ["flow_matching.background_pairing=true",
                                              "flow_matching.pairing_workers=2"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="8gaussians")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200, help="timed steps per side")
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--ot-batch-size", type=int, default=0,
                    help="flow_matching.ot_batch_size (0: one whole-batch assignment; toy-otcfm's default: 256)")
    ap.add_argument("--device", default="cpu", help="the trainer's device (the assignment runs on the CPU)")
    ap.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES))
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    sides = {s: SIDES[s] for s in dict.fromkeys(["independent", *a.sides])}
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    trainers = {}
    for side, (recipe, extra) in sides.items():
        cfg = load_recipe(recipe, ["threads=1", f"device={a.device}", f"data.name={a.data}",
                                   f"train.batch_size={a.batch}",
                                   f"flow_matching.ot_batch_size={a.ot_batch_size}", "train.checkpoint_every=0",
                                   "eval.figures=false", "train.iterations=100000"] + extra)
        trainers[side] = Trainer(cfg, tmp / side, progress=False)
    wall = {s: [] for s in sides}
    cpu = {s: [] for s in sides}
    t_start, load0 = time.time(), os.getloadavg()
    while min(len(v) for v in wall.values()) < a.steps:
        for side, tr in trainers.items():
            for k in range(a.block + 1):
                w0, c0 = time.perf_counter(), time.process_time()
                tr.train_step()
                tr.iteration += 1
                w1, c1 = time.perf_counter(), time.process_time()
                if k:
                    wall[side].append(w1 - w0)
                    cpu[side].append(c1 - c0)
            bg = tr.task.objective.background
            if bg is not None:
                bg.wait()  # finish this side's prefetches before another side runs
    rows = {}
    for side in sides:
        rows[side] = {"wall_ms": 1e3 * statistics.median(wall[side]), "cpu_ms": 1e3 * statistics.median(cpu[side]),
                      "steps": len(wall[side])}
    for side in sides:
        rows[side]["ratio_wall"] = rows[side]["wall_ms"] / rows["independent"]["wall_ms"]
        rows[side]["ratio_cpu"] = rows[side]["cpu_ms"] / rows["independent"]["cpu_ms"]
    prefetched = {side: tr.task.objective.background.prefetched for side, tr in trainers.items()
                  if tr.task.objective.background is not None}
    out = {"data": a.data, "device": a.device, "batch": a.batch, "ot_batch_size": a.ot_batch_size, "block": a.block,
           "rows": rows, "prefetched": prefetched,
           "seconds": time.time() - t_start, "load_before": load0, "load_after": os.getloadavg(),
           "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    for side, r in rows.items():
        print(f"{side:18s} wall {r['wall_ms']:7.2f} ms ({r['ratio_wall']:.2f}x)  cpu {r['cpu_ms']:7.2f} ms "
              f"({r['ratio_cpu']:.2f}x)")
    print(f"prefetched {prefetched}; load {load0} -> {out['load_after']}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
