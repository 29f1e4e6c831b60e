"""OT-CFM vs independent CFM per training step at batch 256 on the 2-D toys, side by side in one run.

Sides (each its own copy of ``toy-otcfm``'s network and Adam, the same batches):

* ``independent``: I-CFM (``IndependentCoupling``), the reference;
* ``exact``: exact minibatch OT paired in line (scipy's ``linear_sum_assignment``), today's OT-CFM step;
* ``exact-background``: the same pairs computed for the next batch in a worker thread while the
  current step runs (``BackgroundPairing``; the indices are checked equal to ``exact``'s);
* ``sinkhorn-pot`` / ``sinkhorn-torch``: entropic OT (epsilon 0.05 of the largest cost), POT's plain
  iteration vs fastcnf's log-domain torch iteration.

The sides run in blocks of ``--block`` consecutive steps, in rotation, so that load on the shared
machine hits all alike and no side's worker overlaps another side's step; a block's first step is not
timed. Per side: the median step time; the ratio to ``independent``'s.

    .venv/bin/python benchmarks/ot_pairing.py --steps 300 --json benchmarks/results/ot_pairing.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fastcnf import load_recipe  # noqa: E402
from fastcnf.flow_matching.pairing import (BackgroundPairing, ExactOTCoupling, IndependentCoupling,  # noqa: E402
                                           SinkhornCoupling)
from fastcnf.flow_matching.loss import flow_matching_loss  # noqa: E402
from fastcnf.flow_matching.paths import IndependentCFMPath  # noqa: E402
from fastcnf.cnf.dynamics import ConcatSquashMLP  # noqa: E402
from fastcnf.data import load_data  # noqa: E402

SIDES = ("independent", "exact", "exact-background", "sinkhorn-pot", "sinkhorn-torch")


def make_coupling(side: str):
    return {"independent": IndependentCoupling, "exact": ExactOTCoupling,
            "exact-background": lambda: BackgroundPairing(ExactOTCoupling()),
            "sinkhorn-pot": lambda: SinkhornCoupling(0.05),
            "sinkhorn-torch": lambda: SinkhornCoupling(0.05, method="torch")}[side]()


def run(data: str, steps: int, block: int, seed: int, batch: int) -> dict:
    cfg = load_recipe("toy-otcfm", [f"data.name={data}", f"train.batch_size={batch}"])
    bundle = load_data(cfg.data, seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    n_batches = steps + 1
    xs = [bundle.sampler(batch, rng)[0].float() for _ in range(n_batches)]
    noises = [torch.randn(batch, 2, generator=gen) for _ in range(n_batches)]
    sides = {}
    for side in SIDES:
        torch.manual_seed(seed)
        net = ConcatSquashMLP(2, tuple(cfg.model.hidden_dims), cfg.model.activation)
        sides[side] = dict(net=net, opt=torch.optim.Adam(net.parameters(), lr=cfg.train.lr),
                           coupling=make_coupling(side), times=[], k=0, indices=[])
    path = IndependentCFMPath(0.0)
    checked = {"equal_to_in_line": True}

    def step(s: dict) -> None:
        k = s["k"]
        coupling = s["coupling"]
        if isinstance(coupling, BackgroundPairing):
            coupling.upcoming = (lambda ahead, k=k: (xs[k + ahead], noises[k + ahead], None)
                                 if k + ahead < n_batches else None)
        s["opt"].zero_grad()
        recorded = {}

        def recording(x, n, labels=None, generator=None):
            recorded["index"] = coupling(x, n, labels=labels, generator=generator)
            return recorded["index"]

        tg = torch.Generator().manual_seed(seed * 100003 + k)  # the same times on every side
        loss = flow_matching_loss(s["net"], xs[k], noises[k], path, recording, generator=tg)
        loss.backward()
        s["opt"].step()
        s["indices"].append(recorded["index"])
        s["k"] = k + 1

    done = 0
    while done < steps:
        n = min(block, steps - done)
        for side in SIDES:
            s = sides[side]
            if isinstance(s["coupling"], BackgroundPairing):
                s["coupling"].drop()
            for i in range(n):
                t0 = time.perf_counter()
                step(s)
                if i > 0:
                    s["times"].append(time.perf_counter() - t0)
        done += n
    for k, (a, b) in enumerate(zip(sides["exact"]["indices"], sides["exact-background"]["indices"])):
        if not torch.equal(a, b):
            checked["equal_to_in_line"] = False
    bg = sides["exact-background"]["coupling"]
    checked["prefetched"] = bg.prefetched
    bg.close()
    ref = statistics.median(sides["independent"]["times"])
    out = {"data": data, "batch": batch, "steps": steps, "seed": seed, "check": checked, "sides": {}}
    for side in SIDES:
        med = statistics.median(sides[side]["times"])
        out["sides"][side] = {"median_ms": med * 1e3, "mean_ms": statistics.fmean(sides[side]["times"]) * 1e3,
                              "ratio_to_independent": med / ref, "timed_steps": len(sides[side]["times"])}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", default=["8gaussians", "checkerboard"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--block", type=int, default=25)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {"command": " ".join(["benchmarks/ot_pairing.py", *(argv or sys.argv[1:])]),
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "load_before": os.getloadavg(), "torch": torch.__version__, "threads": args.threads},
              "results": []}
    for data in args.data:
        r = run(data, args.steps, args.block, args.seed, args.batch)
        report["results"].append(r)
        print(data, json.dumps(r["check"]), ", ".join(f"{k} {v['median_ms']:.2f} ms ({v['ratio_to_independent']:.2f}x)"
                                                     for k, v in r["sides"].items()), flush=True)
    report["machine"]["load_after"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
