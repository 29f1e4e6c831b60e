"""Recipe defaults against the FFJORD baseline, side by side, on FFJORD's 2-D sets.

For each data set and seed, in one invocation and interleaved (one process at a time):

1. **the baseline**, ``benchmarks/ffjord_baseline.py`` (FFJORD's ``train_toy.py`` defaults), 1,000
   iterations, evaluated on fastcnf's test split of the same seed (``data.n_test`` points, 5,000 by
   default, written to a ``.npy`` file): its test NLL is the target;
2. each ``--recipes`` entry (default ``toy-fm``), ``python -m fastcnf train RECIPE`` with nothing but
   the data set, seed, ``threads=1``, ``data.n_test`` and no checkpoints/figures: its test NLL and its
   wall and CPU time from process start until ``metrics.json`` is written;
3. with ``--ffjord``: ``toy-ffjord`` (1,000 iterations, its defaults) the same way, for the
   no-regression check (its whole run >= 3x faster than the baseline's).

Wall time is measured from launch until the metrics file exists; CPU time is the child's user +
system time read from ``/proc/PID/stat`` at that moment (and from ``wait4`` at exit). Targets
(issue "Fast and good by default", benchmarks/README.md): test NLL <= baseline + 0.02 nats on every
set; toy-fm's time to metrics.json <= 1/10 of the baseline's whole run on 8gaussians, <= 1/5 on
checkerboard.

Results are saved after every run (``--json``, default ``benchmarks/results/recipe_defaults.json``)
and an existing file is resumed: a run whose command is already recorded is not repeated.
``--tag T`` records the recipe runs as ``RECIPE+T`` (a variant with ``--set`` overrides beside the
defaults); ``--tight`` also evaluates each recipe run at dopri5 1e-7 (``fastcnf eval``);
``--reuse-baselines FILE`` takes a baseline already recorded on the same test points (the
flow-matching benchmark's JSON, same test split and seed) instead of running it again: its NLL is
the target, its time (another session's) is not compared.

    python benchmarks/recipe_defaults.py --data 8gaussians checkerboard --seeds 0 --ffjord
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import ROOT, add_resumable_arguments, load_average, load_resumable, run_metadata, source_env, write_json

HERE = Path(__file__).resolve().parent
TOYS = ("8gaussians", "checkerboard", "swissroll", "circles", "moons", "pinwheel", "rings", "2spirals")
NLL_SLACK = 0.02
TIME_FRACTION = {"8gaussians": 0.1, "checkerboard": 0.2}
FFJORD_SPEEDUP = 3.0
TICK = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
    except (OSError, IndexError, ValueError):
        return None


def run_timed(cmd: list[str], log_path: Path, metrics_path: Path) -> dict:
    """Run ``cmd``: wall and CPU seconds from launch until ``metrics_path`` exists, and at exit."""
    if metrics_path.exists():
        metrics_path.unlink()
    written = cpu_written = None
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=source_env(), stdout=log, stderr=subprocess.STDOUT)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if written is None and metrics_path.exists():
                written, cpu_written = time.perf_counter() - t0, _proc_cpu(proc.pid)
            time.sleep(0.02)
        ended = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu_end = usage.ru_utime + usage.ru_stime
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}); see {log_path}")
    return {"command": shlex.join(cmd), "wall_to_metrics_seconds": written if written is not None else ended,
            "cpu_to_metrics_seconds": cpu_written if cpu_written is not None else cpu_end,
            "wall_to_exit_seconds": ended, "cpu_to_exit_seconds": cpu_end, "load_average_after": load_average()}


def write_test_split(data: str, seed: int, n_test: int, path: Path) -> int:
    from fastcnf.data.registry import load_data
    from fastcnf.methods import load_recipe

    cfg = load_recipe("toy-fm", overrides=[f"data.name={data}", f"seed={seed}", f"data.n_test={n_test}", "threads=1"])
    bundle = load_data(cfg.data, cfg.seed)
    np.save(path, bundle.test.x.numpy().astype("float32"))
    return len(bundle.test)


def run_baseline(data: str, seed: int, test_file: Path, work: Path) -> dict:
    out = work / f"baseline-{data}-s{seed}.json"
    cmd = [sys.executable, str(HERE / "ffjord_baseline.py"), "--data", data, "--iterations", "1000",
           "--seed", str(seed), "--test-file", str(test_file), "--threads", "1", "--json", str(out)]
    r = run_timed(cmd, work / f"baseline-{data}-s{seed}.log", out)
    m = json.loads(out.read_text())
    r.update(test_nll_nats=m["test_nll_nats"], train_seconds=m["train_seconds"], test_examples=m["test_size"])
    return r


def reused_baseline(paths: list[Path], data: str, seed: int, n_test: int) -> dict | None:
    """The baseline of ``data``/``seed`` on the same ``n_test`` test points (fastcnf's split of that
    seed) recorded in one of ``paths`` (this script's JSON or the flow-matching benchmark's), or None.
    Its NLL is the target; its times, from another session, are not compared (recorded aside)."""
    for path in paths:
        if not path.exists():
            continue
        doc = json.loads(path.read_text())
        if "toys" in doc:  # benchmarks/fm_toys.py
            key = f"toys/runs/{data}/seed{seed}"
            entry = doc["toys"].get("runs", {}).get(f"{data}/seed{seed}") or {}
            base, n = entry.get("baseline"), entry.get("test_examples")
        else:  # this script
            key = f"runs/{data}/{seed}/baseline"
            base = (doc.get("runs", {}).get(f"{data}/{seed}") or {}).get("baseline")
            n = (base or {}).get("test_examples")
        if not base or "reused_from" in base or n != n_test or "--iterations 1000 " not in base["command"]:
            continue
        return {"command": base["command"], "test_nll_nats": base["test_nll_nats"], "test_examples": n_test,
                "wall_to_metrics_seconds": None, "cpu_to_metrics_seconds": None,
                "other_session_wall_seconds": base.get("wall_to_metrics_seconds", base.get("whole_run_seconds")),
                "other_session_cpu_seconds": base.get("cpu_to_metrics_seconds"),
                "reused_from": f"{path.name}: {key}", "load_average_after": None}
    return None


def run_tight(run_dir: Path, log_path: Path, tol: float = 1e-7) -> dict:
    """``fastcnf eval`` of a finished run at dopri5 ``tol``: its test NLL and NFE per batch."""
    cmd = [sys.executable, "-m", "fastcnf", "eval", str(run_dir), "--set", f"eval.atol={tol}", f"eval.rtol={tol}"]
    with open(log_path, "w") as log:
        subprocess.run(cmd, cwd=ROOT, env=source_env(), stdout=log, stderr=subprocess.STDOUT, check=True)
    m = json.loads((run_dir / "metrics.json").read_text())
    return {"tol": tol, "test_nll_nats": m["test_nll_nats"], "eval_nfe_forward": m.get("eval_nfe_forward"),
            "command": shlex.join(cmd)}


def run_recipe(recipe: str, data: str, seed: int, n_test: int, extra: list[str], work: Path, tag: str = "",
               tight: bool = False) -> dict:
    name = f"{recipe}+{tag}" if tag else recipe
    out = work / f"{name}-{data}-s{seed}"
    cmd = [sys.executable, "-m", "fastcnf", "train", recipe, "--out", str(out), "--quiet", "--force"]
    for o in [f"data.name={data}", f"seed={seed}", "threads=1", f"data.n_test={n_test}",
              "train.checkpoint_every=0", "eval.figures=false", *extra]:
        cmd += ["--set", o]
    r = run_timed(cmd, work / f"{name}-{data}-s{seed}.log", out / "metrics.json")
    m = json.loads((out / "metrics.json").read_text())
    r.update(recipe=recipe, test_nll_nats=m["test_nll_nats"], eval_nfe_forward=m.get("eval_nfe_forward"),
             train_seconds=m.get("train_seconds"), overrides=extra)
    if tight:
        r["tight"] = run_tight(out, work / f"{name}-{data}-s{seed}-tight.log")
    return r


def _fraction(r: dict, base: dict, key: str) -> float | None:
    return r[key] / base[key] if base.get(key) else None


def verdicts(results: dict) -> dict:
    out = {}
    for key, e in results["runs"].items():
        data = key.split("/")[0]
        base = e.get("baseline")
        if not base:
            continue
        target = base["test_nll_nats"] + NLL_SLACK
        for name, r in e.items():
            if name == "baseline":
                continue
            recipe = r.get("recipe", name)
            v = {"test_nll_nats": r["test_nll_nats"], "target_nll_nats": target,
                 "nll_met": r["test_nll_nats"] <= target,
                 "wall_fraction_of_baseline": _fraction(r, base, "wall_to_metrics_seconds"),
                 "cpu_fraction_of_baseline": _fraction(r, base, "cpu_to_metrics_seconds")}
            if "tight" in r:
                v["test_nll_nats_tight"] = r["tight"]["test_nll_nats"]
                v["nll_met_tight"] = r["tight"]["test_nll_nats"] <= target
            if recipe == "toy-fm" and data in TIME_FRACTION and v["cpu_fraction_of_baseline"] is not None:
                v["time_target_fraction"] = TIME_FRACTION[data]
                v["time_met_wall"] = v["wall_fraction_of_baseline"] <= TIME_FRACTION[data]
                v["time_met_cpu"] = v["cpu_fraction_of_baseline"] <= TIME_FRACTION[data]
            if recipe == "toy-ffjord" and v["cpu_fraction_of_baseline"] is not None:
                v = {"speedup_wall": 1 / v["wall_fraction_of_baseline"], "speedup_cpu": 1 / v["cpu_fraction_of_baseline"],
                     "met_wall": v["wall_fraction_of_baseline"] <= 1 / FFJORD_SPEEDUP,
                     "met_cpu": v["cpu_fraction_of_baseline"] <= 1 / FFJORD_SPEEDUP}
            out[f"{key}/{name}"] = v
    return out


def table(results: dict) -> str:
    lines = ["| data | seed | run | test NLL (nats) | at 1e-7 | target (baseline + 0.02) | wall to metrics (s) | "
             "CPU (s) | wall / baseline | CPU / baseline | load after |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def num(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for key, e in results["runs"].items():
        data, seed = key.split("/")
        base = e.get("baseline")
        for name, r in e.items():
            frac = (f"{num(_fraction(r, base, 'wall_to_metrics_seconds'), '.3f')} | "
                    f"{num(_fraction(r, base, 'cpu_to_metrics_seconds'), '.3f')}") if base else "- | -"
            tgt = f"{base['test_nll_nats'] + NLL_SLACK:.4f}" if base else "-"
            la = (r.get("load_average_after") or [None])[0]
            label = f"{name} (recorded: {r['reused_from']})" if "reused_from" in r else name
            tight = num(r["tight"]["test_nll_nats"], ".4f") if "tight" in r else "-"
            lines.append(f"| {data} | {seed} | {label} | {r['test_nll_nats']:.4f} | {tight} | {tgt} | "
                         f"{num(r['wall_to_metrics_seconds'], '.1f')} | {num(r['cpu_to_metrics_seconds'], '.1f')} | "
                         f"{frac} | {num(la, '.1f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", default=list(TOYS), choices=TOYS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--recipes", nargs="+", default=["toy-fm"])
    p.add_argument("--ffjord", action="store_true", help="also run toy-ffjord (1,000 iterations) for the 3x check")
    p.add_argument("--no-baseline", action="store_true", help="skip the baseline (reuse a recorded one)")
    p.add_argument("--reuse-baselines", type=Path, nargs="+", default=[],
                   help="take a missing baseline from these JSON files (this script's or the flow-matching "
                        "benchmark's) when one holds it on the same test points")
    p.add_argument("--tag", default="", help="record the recipe runs as RECIPE+TAG (a variant with --set overrides)")
    p.add_argument("--tight", action="store_true", help="also evaluate each recipe run at dopri5 1e-7")
    p.add_argument("--n-test", type=int, default=5000)
    add_resumable_arguments(p, HERE / "results" / "recipe_defaults.json", "/tmp/recipe_defaults")
    args = p.parse_args(argv)
    results = load_resumable(args.json)
    if args.table:
        print(table(results))
        print(json.dumps(verdicts(results), indent=1))
        return
    results["invocations"].append(run_metadata(__file__, argv))
    args.work.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        results["verdicts"] = verdicts(results)
        write_json(args.json, results)

    for seed in args.seeds:
        for data in args.data:
            key = f"{data}/{seed}"
            entry = results["runs"].setdefault(key, {})
            test_file = args.work / f"test-{data}-s{seed}.npy"
            write_test_split(data, seed, args.n_test, test_file)
            names = ([] if args.no_baseline else ["baseline"]) + list(args.recipes) + (["toy-ffjord"] if args.ffjord else [])
            for recipe in names:
                name = f"{recipe}+{args.tag}" if args.tag and recipe not in ("baseline", "toy-ffjord") else recipe
                if name in entry:
                    print(f"{key} {name}: recorded, skipped", flush=True)
                    continue
                if name == "baseline":
                    reused = reused_baseline(args.reuse_baselines, data, seed, args.n_test)
                    entry[name] = reused or run_baseline(data, seed, test_file, args.work)
                else:
                    entry[name] = run_recipe(recipe, data, seed, args.n_test,
                                             args.set if recipe != "toy-ffjord" else ["train.iterations=1000"],
                                             args.work, args.tag if recipe != "toy-ffjord" else "",
                                             args.tight and recipe != "toy-ffjord")
                r = entry[name]
                print(f"{key} {name}: NLL {r['test_nll_nats']:.4f}"
                      + (f" (1e-7: {r['tight']['test_nll_nats']:.4f})" if "tight" in r else "")
                      + (f" recorded in {r['reused_from']}" if "reused_from" in r else
                         f" wall {r['wall_to_metrics_seconds']:.1f} s CPU {r['cpu_to_metrics_seconds']:.1f} s "
                         f"load {r['load_average_after']}"), flush=True)
                save()
    print(table(results))


if __name__ == "__main__":
    main()
