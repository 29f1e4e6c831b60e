"""``fastcnf score`` speed and accuracy on a 6-column table, side by side in one process.

Trains ``tabular`` (flow matching, exact-trace likelihood) briefly on a synthetic 6-column table
(a correlated Gaussian mixture, 200,000 rows), then scores the same ``--rows`` rows (one thread)
under each setting: the evaluation tolerance (``eval.atol = eval.rtol``), the batch size and
the solve (the fused exact-trace solve of ``fastcnf.cnf.fused`` vs the unfused path,
``solver.fused=false``). Accuracy: the largest and mean absolute difference from the same rows
scored at 1e-7 (``--check-rows`` rows). Rows per second extrapolate to 1,000,000 rows.

Command (committed results)::

    python benchmarks/score_speed.py --rows 20000 --out benchmarks/results/score_speed.json
"""
from __future__ import annotations

import argparse
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


def score(run_dir: Path, x: np.ndarray, tol: float, batch: int, fused: bool) -> tuple[np.ndarray, float, float]:
    """Scores of ``x`` at ``eval.atol = eval.rtol = tol`` with ``batch`` rows per solve:
    (log p, seconds, evaluations per batch)."""
    run = load_run(run_dir, [f"eval.atol={tol}", f"eval.rtol={tol}", f"solver.fused={str(fused).lower()}"])
    start = time.perf_counter()
    r = run.score(x, batch_size=batch)
    return r.log_prob, time.perf_counter() - start, r.nfe


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--check-rows", type=int, default=5000)
    ap.add_argument("--iterations", type=int, default=3000)
    ap.add_argument("--work", default="/tmp/fastcnf_score_speed")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "score_speed.json"))
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
    ref, ref_s, ref_nfe = score(run_dir, x[:args.check_rows], 1e-7, 10000, True)
    rows = []
    settings = [(1e-5, 10000, False), (1e-5, 10000, True), (1e-5, 50000, True), (1e-5, 2000, True),
                (1e-5, 1000, True), (1e-5, 500, True), (1e-4, 10000, True), (1e-4, 1000, True),
                (1e-3, 10000, True), (1e-3, 1000, True)]
    for tol, batch, fused in settings:
        lp, sec, nfe = score(run_dir, x, tol, batch, fused)
        diff = np.abs(lp[:args.check_rows] - ref)
        row = {"tol": tol, "batch_size": batch, "fused": fused, "seconds": sec, "rows_per_s": len(x) / sec,
               "est_seconds_1M_rows": 1e6 / (len(x) / sec), "nfe_per_batch": nfe,
               "max_abs_diff_vs_1e-7_nats": float(diff.max()), "mean_abs_diff_vs_1e-7_nats": float(diff.mean())}
        rows.append(row)
        print(row, flush=True)
    write_json(args.out, {**meta, "load_average_end": load_average(), "rows": args.rows,
                          "check_rows": args.check_rows, "train_iterations": args.iterations,
                          "reference_1e-7": {"seconds": ref_s, "nfe_per_batch": ref_nfe}, "settings": rows})


if __name__ == "__main__":
    main()
