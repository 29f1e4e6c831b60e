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

``--kernel-baseline COMMIT`` times the exact-trace kernel without gradients (``trace_rows_kernel``,
one time per row) of that commit and of the working tree side by side, interleaved, in this process
(microseconds of CPU per row and evaluation, the least and the median of ``--kernel-reps`` rounds).
Fixed-step settings (``rk4-N``: ``fastcnf score --steps N --method rk4``) sit beside the adaptive
ones; ``--grids`` compares, for RK4 (3/8 rule, torchdiffeq's ``rk4``) with N steps, the uniform grid
with a grid calibrated on separate rows (the density of the accepted steps of per-row adaptive
dopri5 solves at 1e-6, first steps excluded, inverted into N steps of equal mass).

Command (committed results)::

    python benchmarks/score_speed.py --rows 20000 --check-rows 5000 --kernel-baseline b7b8bca --grids \
        --million 1e-5:2000 2e-5:2000 rk4-6:2000 --out benchmarks/results/score_speed_fixed_steps.json
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
          rows: bool = False, steps: int | None = None, method: str = "rk4") -> tuple[np.ndarray, float, float, float]:
    """Scores of ``x`` at ``eval.atol = eval.rtol = tol`` with ``batch`` rows per solve and per-row
    error control (``rows``), or ``steps`` fixed steps of ``method``: (log p, wall seconds, CPU
    seconds, evaluations per batch or per row)."""
    overrides = [f"eval.atol={tol}", f"eval.rtol={tol}"]
    # the unfused path: ``solver.gradient`` is refused under flow matching (nothing solved in training)
    run = load_run(run_dir, overrides if fused else overrides + ["solver.gradient=direct"])
    start, cpu = time.perf_counter(), time.process_time()
    r = run.score(x, batch_size=batch, row_steps=rows, steps=steps, method=method)
    return r.log_prob, time.perf_counter() - start, time.process_time() - cpu, r.nfe


def kernel_times(run_dir: Path, baseline: str, reps: int) -> list[dict]:
    """``trace_rows_kernel`` of commit ``baseline`` and of the working tree on the run's network, side
    by side: CPU microseconds per row and evaluation (least and median of ``reps`` rounds)."""
    import importlib.util
    import tempfile

    from fastcnf.cnf import trace_kernel as new

    src = subprocess.run(["git", "show", f"{baseline}:src/fastcnf/cnf/trace_kernel.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(src)
    spec = importlib.util.spec_from_file_location("baseline_trace_kernel", fh.name)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    net = next(iter(load_run(run_dir).flow.cnf_blocks())).net
    kernels = {baseline: (old.trace_rows_kernel, old._get_packed(net)), "new": (new.trace_rows_kernel, new._get_packed(net))}
    out = []
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for b in (500, 2000):
            z, t = torch.randn(b, 6, generator=gen), torch.rand(b, generator=gen)
            f0, tr0 = kernels[baseline][0](kernels[baseline][1], t, z)
            f1, tr1 = kernels["new"][0](kernels["new"][1], t, z)
            times: dict[str, list[float]] = {k: [] for k in kernels}
            n = max(20, 100_000 // b)
            for _ in range(reps):
                for name, (fn, pk) in kernels.items():
                    fn(pk, t, z)
                    c = time.process_time()
                    for _ in range(n):
                        fn(pk, t, z)
                    times[name].append((time.process_time() - c) / n / b * 1e6)
            row = {"batch": b, "max_abs_diff_f": float((f0 - f1).abs().max()),
                   "max_abs_diff_trace": float((tr0 - tr1).abs().max()), "load_average": load_average()}
            for name, v in times.items():
                key = "baseline" if name == baseline else "new"
                row[f"{key}_us_per_row_eval_min"], row[f"{key}_us_per_row_eval_median"] = min(v), float(np.median(v))
            out.append(row)
            print(row, flush=True)
    return out


def batch_profile(run_dir: Path, x: np.ndarray, tol: float = 1e-5) -> dict:
    """One per-row solve of the ``len(x)`` rows of ``x``: the evaluations each row took (mean) against
    the calls of the kernel (the evaluations of the slowest row, what a solve that kept every row in
    the batch to the end would spend per row), and the share of row evaluations made in calls on
    fewer rows than the batch (rows finish and leave it)."""
    import fastcnf.cnf.fused as fused

    sizes: list[int] = []
    kernel = fused.trace_rows_kernel

    def counted(pk, t, z):
        sizes.append(z.shape[0])
        return kernel(pk, t, z)

    fused.trace_rows_kernel = counted
    try:
        score(run_dir, x, tol, len(x), True, True)
    finally:
        fused.trace_rows_kernel = kernel
    n = np.array(sizes)
    return {"batch": len(x), "tol": tol, "mean_evaluations_per_row": float(n.sum() / len(x)),
            "kernel_calls": len(n), **{f"share_of_row_evaluations_in_calls_under_{k}_rows": float(n[n < k].sum() / n.sum())
                                       for k in (250, 500, 1000)}}


_RK38 = (((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)), (1 / 8, 3 / 8, 3 / 8, 1 / 8), (0.0, 1 / 3, 2 / 3, 1.0))


def grid_experiment(run_dir: Path, x: np.ndarray, ref: np.ndarray, steps: list[int], calib_rows: int = 200) -> dict:
    """RK4 (3/8 rule) with N steps on a uniform and on a calibrated grid (module docstring), on the
    fused kernel directly: largest / mean difference from the 1e-7 scores ``ref`` of ``x``."""
    from fastcnf.cnf.trace_kernel import _get_packed, trace_rows_kernel
    from fastcnf.ode.fast_solvers import DOPRI5, solve_adaptive

    run = load_run(run_dir)
    block = next(iter(run.flow.cnf_blocks()))
    pk, T = _get_packed(block.net), float(block.end_time)
    s = run.standardizer

    def rhs(tau, y):
        f, tr = trace_rows_kernel(pk, torch.as_tensor(float(tau) * T), y[0])
        return f * T, tr * T

    fine = np.linspace(0.0, 1.0, 1001)
    density = np.zeros_like(fine)
    calib = s.transform(torch.as_tensor(table(calib_rows, seed=7))).float()
    with torch.no_grad():
        for i in range(calib_rows):
            rec: list = []
            solve_adaptive(rhs, (calib[i:i + 1], torch.zeros(1)), [0.0, 1.0], DOPRI5, 1e-6, 1e-6,
                           lambda *a: None, record=rec)
            for st in rec[1:]:  # the first step is the initial-step heuristic's, not the field's
                inside = (fine >= st.tau0) & (fine < min(st.tau1, 1.0 + 1e-12))
                density[inside] += 1.0 / (st.tau1 - st.tau0)
        density[density == 0] = density[density > 0].min()
        mass = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(fine))])
        mass /= mass[-1]
        u = s.transform(torch.as_tensor(x)).float()
        a, b, c = _RK38
        out = {"calibration_rows": calib_rows, "density_at_0.0_0.1_..._1.0": density[::100].tolist(), "settings": []}
        for n in steps:
            for name, grid in (("uniform", np.linspace(0, 1, n + 1)), ("calibrated", np.interp(np.linspace(0, 1, n + 1), mass, fine))):
                z, logdet = u.clone(), torch.zeros(len(u))
                for s0, s1 in zip(grid[:-1], grid[1:]):
                    h, ks = float(s1 - s0), []
                    for i in range(4):
                        zi = z + h * sum(w * k[0] for w, k in zip(a[i], ks)) if i else z
                        ks.append(rhs(s0 + c[i] * h, (zi,)))
                    z = z + h * sum(w * k[0] for w, k in zip(b, ks))
                    logdet = logdet + h * sum(w * k[1] for w, k in zip(b, ks))
                lp = (run.flow.prior.log_prob(z) + logdet).double().numpy() + s.log_abs_det
                diff = np.abs(lp - ref)
                row = {"steps": n, "grid": name, "points": [round(float(v), 4) for v in grid],
                       "max_abs_diff_vs_1e-7_nats": float(diff.max()), "mean_abs_diff_vs_1e-7_nats": float(diff.mean()),
                       "rows_over_0.01_nats": float((diff > 0.01).mean())}
                out["settings"].append(row)
                print(row, flush=True)
    return out


def million(run_dir: Path, work: Path, setting: str, ref_rows: int) -> dict:
    """``fastcnf score`` on a memory-mapped 1,000,000 x 6 file under ``/usr/bin/time -v``."""
    solver, batch = setting.split(":")
    path = work / "million.npy"
    if not path.exists():
        np.save(path, table(1_000_000, seed=1))
    out = work / f"million_{solver}_{batch}.npy"
    if solver[0].isalpha():  # METHOD-N: fixed steps, checked against the adaptive solve at 1e-6
        method, steps = solver.split("-")
        how, tol = ["--steps", steps, "--method", method], "1e-5"
    else:
        how, tol = [], solver
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "fastcnf", "score", str(run_dir), "--data", str(path),
           "--out", str(out), "--quiet", "--batch-size", batch, "--check-rows", "1000", *how, "--set",
           f"eval.atol={tol}", f"eval.rtol={tol}", "threads=1"]
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    field = lambda name: re.search(rf"{name}: (.*)", p.stderr).group(1).strip()  # noqa: E731
    wall = [float(v) for v in field(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\)").split(":")]
    x = np.load(path, mmap_mode="r")[:ref_rows]
    ref = score(run_dir, np.asarray(x), 1e-7, 10000, True)[0]
    diff = np.abs(np.load(out)[:ref_rows] - ref)
    row = {"solver": solver if how else f"dopri5 {tol}", "batch_size": int(batch),
           "error_control": "fixed steps" if how else "rows", "rows": 1_000_000,
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
    ap.add_argument("--million", nargs="*", default=[], metavar="TOL:BATCH|METHOD-N:BATCH")
    ap.add_argument("--kernel-baseline", default=None, metavar="COMMIT")
    ap.add_argument("--kernel-reps", type=int, default=5)
    ap.add_argument("--grids", action="store_true")
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
    kernel = kernel_times(run_dir, args.kernel_baseline, args.kernel_reps) if args.kernel_baseline else []
    x = table(args.rows, seed=1)
    ref, ref_s, _, ref_nfe = score(run_dir, x[:args.check_rows], 1e-7, 10000, True)
    rows = []
    # (tol, batch, per-row error control, fixed steps, method)
    settings = [(1e-5, 2000, False, None, ""), (1e-5, 2000, True, None, ""), (2e-5, 2000, True, None, ""),
                (1e-4, 2000, True, None, ""), (1e-5, 500, True, None, ""),
                *((1e-5, 2000, False, n, "rk4") for n in (6, 8, 12, 16)), (1e-5, 2000, False, 24, "midpoint")]
    for tol, batch, per_row, steps, method in settings:
        lp, sec, cpu, nfe = score(run_dir, x, tol, batch, True, per_row, steps, method)
        diff = np.abs(lp[:args.check_rows] - ref)
        row = {"solver": f"{method}-{steps}" if steps else f"dopri5 {tol:g}", "batch_size": batch,
               "error_control": "fixed steps" if steps else ("rows" if per_row else "batch"),
               "seconds": sec, "cpu_seconds": cpu, "rows_per_cpu_s": len(x) / cpu,
               "est_cpu_seconds_1M_rows": 1e6 / (len(x) / cpu),
               ("nfe_per_row" if per_row or steps else "nfe_per_batch"): nfe,
               "us_per_row_eval": cpu / len(x) / nfe * 1e6,
               "max_abs_diff_vs_1e-7_nats": float(diff.max()), "mean_abs_diff_vs_1e-7_nats": float(diff.mean()),
               "rows_over_0.01_nats": float((diff > 0.01).mean()), "load_average": load_average()}
        rows.append(row)
        print(row, flush=True)
    profile = batch_profile(run_dir, x[:2000])
    print(profile, flush=True)
    grids = grid_experiment(run_dir, x[:args.check_rows], ref, [6, 8, 12]) if args.grids else None
    big = []
    for setting in args.million:
        big.append(million(run_dir, work, setting, args.check_rows))
        print(big[-1], flush=True)
    write_json(args.out, {**meta, "load_average_end": load_average(), "rows": args.rows,
                          "check_rows": args.check_rows, "train_iterations": args.iterations,
                          "reference_1e-7": {"seconds": ref_s, "nfe_per_batch": ref_nfe}, "kernel": kernel,
                          "settings": rows, "batch_profile": profile, "grids": grids, "million_rows": big})


if __name__ == "__main__":
    main()
