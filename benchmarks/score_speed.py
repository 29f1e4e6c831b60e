"""``fastcnf score`` speed and accuracy on a 6-column table, side by side in one process.

Trains ``tabular`` (flow matching, exact-trace likelihood) briefly on a synthetic 6-column table
(a correlated Gaussian mixture, 200,000 rows), then scores the same ``--rows`` rows (one thread)
under each setting: the evaluation tolerance (``eval.atol = eval.rtol``), the batch size, the
error control (``rows``: every row with its own error test and step size, ``fastcnf score``'s
default; ``batch``: one step size per batch, as ``eval``). The solve is the fused exact-trace solve
of ``fastcnf.cnf.fused`` (the unfused comparison of earlier results is no longer expressible for a
flow-matching run, whose configuration refuses ``solver.gradient``). Accuracy: the largest
and mean absolute difference from the same rows scored at 1e-7 (``--check-rows`` rows). Rows per
second (CPU time of this single-threaded process) extrapolate to 1,000,000 rows.

``--million TOL:BATCH ...`` then writes a 1,000,000 x 6 ``.npy`` table and scores it end to end
with ``fastcnf score`` (memory-mapped, ``--check-rows 1000``) under ``/usr/bin/time -v`` per
setting: CPU seconds, wall seconds, peak RSS, the command's own accuracy check and the difference
of its first ``--check-rows`` scores from 1e-7.

Command (committed results)::

    python benchmarks/score_speed.py --rows 20000 --check-rows 5000 --million 1e-4:2000 1e-5:2000 \
        --out benchmarks/results/score_speed.json
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import ROOT, load_average, run_metadata, write_json

from fastcnf import load_run
from fastcnf.cli import main as cli_main


def table(n: int, seed: int = 0) -> np.ndarray:
    """``n`` rows of a 6-column correlated two-component Gaussian mixture in mixed units."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(6, 6)) / 2
    comp = rng.integers(0, 2, size=n)[:, None]
    x = rng.normal(size=(n, 6)) @ a + np.where(comp == 1, 2.0, -1.0)
    return x * np.array([1.0, 10.0, 0.1, 100.0, 1.0, 5.0]) + np.array([0.0, 50.0, -3.0, 1e3, 7.0, 0.0])


def score(run_dir: Path, x: np.ndarray, tol: float, batch: int, fused: bool,
          rows: bool = False) -> tuple[np.ndarray, float, float, float]:
    """Scores of ``x`` at ``eval.atol = eval.rtol = tol`` with ``batch`` rows per solve and per-row
    error control (``rows``): (log p, wall seconds, CPU seconds, evaluations per batch or per row)."""
    overrides = [f"eval.atol={tol}", f"eval.rtol={tol}"]
    # the unfused path: ``solver.gradient`` is refused under flow matching (nothing solved in training)
    run = load_run(run_dir, overrides if fused else overrides + ["solver.gradient=direct"])
    start, cpu = time.perf_counter(), time.process_time()
    r = run.score(x, batch_size=batch, row_steps=rows)
    return r.log_prob, time.perf_counter() - start, time.process_time() - cpu, r.nfe


def million(run_dir: Path, work: Path, setting: str, ref_rows: int) -> dict:
    """``fastcnf score`` on a memory-mapped 1,000,000 x 6 file under ``/usr/bin/time -v``."""
    tol, batch = setting.split(":")
    path = work / "million.npy"
    if not path.exists():
        np.save(path, table(1_000_000, seed=1))
    out = work / f"million_{tol}_{batch}.npy"
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "fastcnf", "score", str(run_dir), "--data", str(path),
           "--out", str(out), "--quiet", "--batch-size", batch, "--check-rows", "1000", "--set", f"eval.atol={tol}",
           f"eval.rtol={tol}", "threads=1"]
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    field = lambda name: re.search(rf"{name}: (.*)", p.stderr).group(1).strip()  # noqa: E731
    wall = [float(v) for v in field(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\)").split(":")]
    x = np.load(path, mmap_mode="r")[:ref_rows]
    ref = score(run_dir, np.asarray(x), 1e-7, 10000, True)[0]
    diff = np.abs(np.load(out)[:ref_rows] - ref)
    row = {"tol": float(tol), "batch_size": int(batch), "error_control": "rows", "rows": 1_000_000,
           "cpu_seconds": float(field("User time \\(seconds\\)")) + float(field("System time \\(seconds\\)")),
           "wall_seconds": sum(v * 60 ** i for i, v in enumerate(reversed(wall))),
           "peak_rss_mib": int(field("Maximum resident set size \\(kbytes\\)")) / 1024,
           "command_output": p.stdout.strip().splitlines(),
           "check": json.loads(out.with_name(out.stem + "_check.json").read_text()),
           f"max_abs_diff_vs_1e-7_nats_first_{ref_rows}_rows": float(diff.max()),
           f"mean_abs_diff_vs_1e-7_nats_first_{ref_rows}_rows": float(diff.mean()), "load_average": load_average()}
    out.unlink()
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--check-rows", type=int, default=5000)
    ap.add_argument("--iterations", type=int, default=3000)
    ap.add_argument("--work", default="/tmp/fastcnf_score_speed")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "score_speed.json"))
    ap.add_argument("--million", nargs="*", default=[], metavar="TOL:BATCH")
    args = ap.parse_args(argv)
    meta = run_metadata(__file__, argv)
    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "run"
    if not (run_dir / "metrics.json").exists():
        np.save(work / "train.npy", table(200_000, seed=0))
        assert cli_main(["train", "tabular", "--quiet", "--out", str(run_dir), "--set", f"data.path={work / 'train.npy'}",
                         f"train.iterations={args.iterations}", "threads=1", "eval.max_examples=2000",
                         "train.val_every=0", "train.patience=0"]) == 0
    x = table(args.rows, seed=1)
    ref, ref_s, _, ref_nfe = score(run_dir, x[:args.check_rows], 1e-7, 10000, True)
    rows = []
    settings = [(1e-5, 10000, True, False), (1e-5, 2000, True, False),
                (1e-5, 10000, True, True), (1e-5, 4000, True, True), (1e-5, 2000, True, True), (1e-5, 1000, True, True),
                (1e-4, 2000, True, False), (1e-4, 2000, True, True), (1e-3, 2000, True, False),
                (1e-3, 2000, True, True)]
    for tol, batch, fused, per_row in settings:
        lp, sec, cpu, nfe = score(run_dir, x, tol, batch, fused, per_row)
        diff = np.abs(lp[:args.check_rows] - ref)
        row = {"tol": tol, "batch_size": batch, "fused": fused, "error_control": "rows" if per_row else "batch",
               "seconds": sec, "cpu_seconds": cpu, "rows_per_cpu_s": len(x) / cpu,
               "est_cpu_seconds_1M_rows": 1e6 / (len(x) / cpu),
               ("nfe_per_row" if per_row else "nfe_per_batch"): nfe,
               "max_abs_diff_vs_1e-7_nats": float(diff.max()), "mean_abs_diff_vs_1e-7_nats": float(diff.mean())}
        rows.append(row)
        print(row, flush=True)
    big = []
    for setting in args.million:
        big.append(million(run_dir, work, setting, args.check_rows))
        print(big[-1], flush=True)
    write_json(args.out, {**meta, "load_average_end": load_average(), "rows": args.rows,
                          "check_rows": args.check_rows, "train_iterations": args.iterations,
                          "reference_1e-7": {"seconds": ref_s, "nfe_per_batch": ref_nfe}, "settings": rows,
                          "million_rows": big})


if __name__ == "__main__":
    main()
