"""Speed of fastcnf against FFJORD's toy training, side by side.

For each 2-D data set, in one invocation:

1. **the baseline**, ``benchmarks/ffjord_baseline.py`` (FFJORD's ``train_toy.py`` defaults in plain
   torch + torchdiffeq: concat-squash 64-64-64 tanh, brute-force exact trace, dopri5 atol = rtol
   = 1e-5, T = 0.5, batch 100, Adam 1e-3, weight decay 1e-5, adjoint), run as its own process:
   the wall time from launch until its metrics file is written is its whole run; its JSON gives
   the per-iteration times, NFE and final test NLL;
2. **fastcnf in process**: ``Trainer(load_recipe("toy-ffjord", ...), out).fit()``, the product
   itself; ``log.csv`` gives the per-iteration times and NFE, ``metrics.json`` the test NLL;
3. **fastcnf's whole run**: ``python -m fastcnf train toy-ffjord --set ... --out DIR --quiet``
   as its own process, from launch until ``metrics.json`` is written (the process then draws its
   figures; the time to its exit is recorded too);
4. with ``--to-quality``: fastcnf trains (recipe plus ``--quality-set`` overrides) until its test
   NLL reaches the baseline's final test NLL; the training time to get there is compared with
   the baseline's training time.

Both sides use the same seed, iterations and data set, and are evaluated on the same points:
fastcnf's test split (20,000 draws) is written to a ``.npy`` file that the baseline evaluates
on. Per-iteration time is the mean over the last 100 iterations of each run's own step timer
(data, forward, backward, optimiser step), NFE the mean over the same iterations. The process CPU
time of the same steps is recorded too: on a shared machine it is the steadier measure.

Run ``python benchmarks/speed_toy.py --json benchmarks/results/speed_toy.json`` (about half an
hour on 2 cores), ``--quick`` for a short check. Results and the machine are described in
``benchmarks/README.md``.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import ROOT, Timer, load_average, read_log, run_metadata, source_env, write_json

HERE = Path(__file__).resolve().parent

TARGETS = {"per_iteration_speedup": 5.0, "nll_gap_nats": 0.05, "whole_run_speedup": 3.0,
           "time_to_quality_fraction": 0.25}


# ---- processes ----------------------------------------------------------------------------------
def run_timed(cmd: list[str], log_path: Path, metrics_path: Path) -> tuple[float, float, int]:
    """Run ``cmd``: the wall time from launch until ``metrics_path`` exists, until exit, and the
    exit status."""
    if metrics_path.exists():
        metrics_path.unlink()
    written = None
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=source_env(), stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if written is None and metrics_path.exists():
                written = time.perf_counter() - t0
            time.sleep(0.02)
        ended = time.perf_counter() - t0
    return (written if written is not None else ended), ended, proc.returncode


def _tail_mean(values: list[float], n: int) -> float:
    tail = values[-n:]
    return float(sum(tail) / max(len(tail), 1))


# ---- the two sides ------------------------------------------------------------------------------
def fastcnf_overrides(data: str, iterations: int, seed: int, extra: list[str]) -> list[str]:
    return [f"data.name={data}", f"train.iterations={iterations}", f"seed={seed}", *extra]


def write_test_split(data: str, seed: int, overrides: list[str], path: Path) -> int:
    """fastcnf's test split of ``data`` (what its trainer evaluates on) as a .npy file."""
    from fastcnf.methods import load_recipe
    from fastcnf.data.registry import load_data

    cfg = load_recipe("toy-ffjord", overrides=fastcnf_overrides(data, 1, seed, overrides))
    bundle = load_data(cfg.data, cfg.seed)
    np.save(path, bundle.test.x.numpy().astype("float32"))
    return len(bundle.test)


def run_baseline(data: str, iterations: int, seed: int, tail: int, test_file: Path, work: Path,
                 threads: int = 0, reuse: bool = False) -> dict:
    out = work / f"baseline-{data}.json"
    cmd = [sys.executable, str(HERE / "ffjord_baseline.py"), "--data", data, "--iterations", str(iterations),
           "--seed", str(seed), "--test-file", str(test_file), "--json", str(out)]
    if threads:
        cmd += ["--threads", str(threads)]
    previous = work / f"baseline-{data}.timing.json"
    reused = reuse and previous.exists() and json.loads(previous.read_text())["command"] == shlex.join(cmd)
    if reused:
        timing = json.loads(previous.read_text())
    else:
        wall, ended, rc = run_timed(cmd, work / f"baseline-{data}.log", out)
        if rc != 0:
            raise RuntimeError(f"baseline failed ({rc}); see {work / f'baseline-{data}.log'}")
        timing = {"command": shlex.join(cmd), "wall": wall, "ended": ended, "load_average": load_average()}
        previous.write_text(json.dumps(timing))
    wall, ended = timing["wall"], timing["ended"]
    with open(out) as fh:
        m = json.load(fh)
    return {
        "reused_from_earlier_run": reused,
        "load_average_after": timing["load_average"],
        "command": shlex.join(cmd),
        "whole_run_seconds": wall,
        "process_seconds": ended,
        "seconds_per_iteration": _tail_mean(m["step_seconds"], tail),
        "cpu_seconds_per_iteration": _tail_mean(m["step_cpu_seconds"], tail),
        "nfe_forward": _tail_mean(m["nfe_forward"], tail),
        "nfe_backward": _tail_mean(m["nfe_backward"], tail),
        "nfe_forward_final": m["nfe_forward_final"],
        "nfe_backward_final": m["nfe_backward_final"],
        "train_seconds": m["train_seconds"],
        "test_nll_nats": m["test_nll_nats"],
        "test_examples": m["test_size"],
        "threads": m["threads"],
        "final_loss": m["loss"][-1],
    }


def _read_log(run_dir: Path) -> dict[str, list[float]]:
    rows = read_log(run_dir / "log.csv")
    return {k: [float(row[k]) for row in rows] for k in ("seconds", "nfe_forward", "nfe_backward", "loss")}


def run_fastcnf_inprocess(data: str, iterations: int, seed: int, tail: int, overrides: list[str], work: Path) -> dict:
    from fastcnf.methods import load_recipe
    from fastcnf.training.trainer import Trainer

    out = work / f"fastcnf-{data}"
    cfg = load_recipe("toy-ffjord", overrides=fastcnf_overrides(data, iterations, seed, overrides))
    with Timer() as whole:
        trainer = Trainer(cfg, out, quiet=True, progress=False)
        cpu_seconds: list[float] = []
        step = trainer.train_step

        def timed_step():  # the process CPU time of each step, next to the trainer's own wall clock
            with Timer() as step_timer:
                ctx = step()
            cpu_seconds.append(step_timer.cpu)
            return ctx

        trainer.train_step = timed_step
        metrics = trainer.fit()
    log = _read_log(out)
    return {
        "overrides": fastcnf_overrides(data, iterations, seed, overrides),
        "in_process_seconds": whole.wall,
        "seconds_per_iteration": _tail_mean(log["seconds"], tail),
        "cpu_seconds_per_iteration": _tail_mean(cpu_seconds, tail),
        "nfe_forward": _tail_mean(log["nfe_forward"], tail),
        "nfe_backward": _tail_mean(log["nfe_backward"], tail),
        "nfe_forward_final": log["nfe_forward"][-1],
        "nfe_backward_final": log["nfe_backward"][-1],
        "train_seconds": metrics["train_seconds"],
        "test_nll_nats": metrics["test_nll_nats"],
        "test_examples": metrics.get("test_examples"),
        "threads": torch.get_num_threads(),
        "final_loss": log["loss"][-1],
    }


def run_fastcnf_cli(data: str, iterations: int, seed: int, overrides: list[str], work: Path) -> dict:
    out = work / f"fastcnf-cli-{data}"
    cmd = [sys.executable, "-m", "fastcnf", "train", "toy-ffjord", "--out", str(out), "--quiet", "--force"]
    for o in fastcnf_overrides(data, iterations, seed, overrides):
        cmd += ["--set", o]
    wall, ended, rc = run_timed(cmd, work / f"fastcnf-cli-{data}.log", out / "metrics.json")
    if rc != 0:
        raise RuntimeError(f"fastcnf CLI failed ({rc}); see {work / f'fastcnf-cli-{data}.log'}")
    with open(out / "metrics.json") as fh:
        m = json.load(fh)
    return {"command": shlex.join(cmd), "whole_run_seconds": wall, "process_seconds": ended,
            "test_nll_nats": m["test_nll_nats"], "train_seconds": m["train_seconds"]}


def run_to_quality(data: str, seed: int, target_nll: float, overrides: list[str], eval_every: int,
                   max_iterations: int, work: Path) -> dict:
    """Train fastcnf until its test NLL is at most ``target_nll``; evaluations are not timed."""
    from fastcnf.methods import load_recipe
    from fastcnf.training.trainer import Trainer

    out = work / f"fastcnf-quality-{data}"
    cfg = load_recipe("toy-ffjord", overrides=fastcnf_overrides(data, max_iterations, seed, overrides))
    t_start = time.perf_counter()
    with Timer() as setup:
        trainer = Trainer(cfg, out, quiet=True, progress=False)
    training, evaluation = Timer(), Timer()
    curve = []
    reached = None
    while trainer.iteration < max_iterations:
        with training:
            trainer.train_step()
            trainer.iteration += 1
        if trainer.iteration % eval_every == 0:
            with evaluation:
                nll = trainer.evaluate()["test_nll_nats"]
            curve.append({"iteration": trainer.iteration, "train_seconds": training.wall, "test_nll": nll})
            if nll is not None and nll <= target_nll:
                reached = trainer.iteration
                break
    return {"overrides": fastcnf_overrides(data, max_iterations, seed, overrides), "target_nll": target_nll,
            "reached_at_iteration": reached, "train_seconds": training.wall if reached else None,
            "monitoring_eval_seconds": evaluation.wall, "setup_seconds": setup.wall,
            "wall_seconds": time.perf_counter() - t_start, "eval_every": eval_every, "curve": curve}


# ---- engine ablation ----------------------------------------------------------------------------
def _ffjord_from_fastcnf(model) -> "torch.nn.Module":
    """The baseline's model carrying the weights of fastcnf's (same architecture, other names)."""
    import ffjord_baseline as fb

    ffjord = fb.build_model()
    state = {}
    for key, value in model.state_dict().items():
        if ".net.layers." in key:
            index, name = key.split(".net.layers.")[1].split(".", 1)
            name = name.replace("layer.", "_layer.").replace("hyper_gate", "_hyper_gate").replace("hyper_bias",
                                                                                                  "_hyper_bias")
            state[f"odefunc.diffeq.layers.{index}.{name}"] = value
    missing = ffjord.load_state_dict(state, strict=False)
    assert not missing.unexpected_keys and all("_num_evals" in k or "sqrt_end_time" in k for k in missing.missing_keys)
    return ffjord


def run_ablation(data: str, seed: int, overrides: list[str], work: Path, repeats: int) -> dict:
    """Per-iteration time of engine variants at the weights of the in-process fastcnf run.

    Every variant trains from the same weights on the same batches, one step each in turn (so a
    change of load on the machine hits all of them alike); the median over ``repeats`` steps.
    """
    import copy

    import ffjord_baseline as fb
    from fastcnf.methods import load_recipe
    from fastcnf.ode.solve import SolverConfig
    from fastcnf.training.checkpoint import load_checkpoint
    from fastcnf.training.trainer import Trainer

    cfg = load_recipe("toy-ffjord", overrides=fastcnf_overrides(data, 1, seed, overrides))
    trainer = Trainer(cfg, work / f"ablation-{data}", quiet=True, progress=False)
    trainer.model.load_state_dict(load_checkpoint(work / f"fastcnf-{data}" / "checkpoints" / "last.pt")["model"])
    variants = {
        "torchdiffeq, autograd trace (fastcnf's first solve path)": dict(backend="torchdiffeq", trace=False),
        "torchdiffeq + forward-mode trace, hand-written VJP": dict(backend="torchdiffeq", trace=True),
        "lean dopri5 + autograd trace": dict(backend="fastcnf", trace=False),
        "lean dopri5 + forward-mode trace, node per evaluation": dict(backend="fastcnf", trace=True, gradient="direct"),
        "fastcnf now: fused solve (one node, discrete adjoint)": dict(backend="fastcnf", trace=True),
        "fastcnf now, adjoint instead of direct": dict(backend="fastcnf", trace=True, gradient="adjoint"),
    }
    models = {}
    for name, v in variants.items():
        model = copy.deepcopy(trainer.model)
        for block in model.cnf_blocks():
            block.solver = SolverConfig(**{**vars(block.solver), "backend": v["backend"],
                                           # a patched trace kernel is not the fused solve's kernel
                                           "gradient": v.get("gradient", "auto" if v["trace"] else "direct")})
            if not v["trace"]:
                block.net.trace_forward = block.net._trace_forward_autograd
        models[name] = (model, torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay))
    ffjord = _ffjord_from_fastcnf(trainer.model)
    models["FFJORD baseline"] = (ffjord, torch.optim.Adam(ffjord.parameters(), lr=cfg.train.lr,
                                                           weight_decay=cfg.train.weight_decay))
    rng = np.random.default_rng(seed + 17)
    sampler = trainer.bundle.sampler
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in models}
    nfe: dict[str, tuple] = {}
    for _ in range(repeats):
        x = sampler(cfg.train.batch_size, rng)[0]
        for name, (model, opt) in models.items():
            with Timer() as step_timer:
                opt.zero_grad(set_to_none=True)
                if name == "FFJORD baseline":
                    loss = fb.compute_loss(model, x)
                    n_forward = model.num_evals()
                    loss.backward()
                    nfe[name] = (n_forward, model.num_evals() - n_forward)
                else:
                    loss = -model.log_prob(x).mean()
                    loss.backward()
                    nfe[name] = model.nfe_last()
                opt.step()
            times[name].append((step_timer.wall, step_timer.cpu))
    out = {}
    for name, ts in times.items():
        ts = ts[2:]  # warm-up
        out[name] = {"seconds_per_iteration": float(np.median([a for a, _ in ts])),
                     "cpu_seconds_per_iteration": float(np.median([b for _, b in ts])),
                     "nfe_forward_backward_last": list(nfe[name])}
    ref = out["FFJORD baseline"]["cpu_seconds_per_iteration"]
    for v in out.values():
        v["cpu_speedup_vs_baseline"] = ref / v["cpu_seconds_per_iteration"]
    return {"data": data, "repeats": repeats, "threads": torch.get_num_threads(), "variants": out}


def ablation_table(ab: dict) -> str:
    lines = [f"engine ablation on {ab['data']} ({ab['repeats']} steps each, interleaved, "
             f"{ab['threads']} thread(s)): median s/iter, CPU s/iter, NFE of the last step, CPU speed-up"]
    for name, v in ab["variants"].items():
        lines.append(f"  {name:55s} {v['seconds_per_iteration']:.4f} {v['cpu_seconds_per_iteration']:.4f} "
                     f"{v['nfe_forward_backward_last'][0]:3d}/{v['nfe_forward_backward_last'][1]:<3d} "
                     f"x{v['cpu_speedup_vs_baseline']:.2f}")
    return "\n".join(lines)


# ---- report -------------------------------------------------------------------------------------
def ratios(base: dict, fast: dict, cli: dict | None, quality: dict | None) -> dict:
    r = {
        "per_iteration_speedup": base["seconds_per_iteration"] / fast["seconds_per_iteration"],
        "per_iteration_cpu_speedup": base["cpu_seconds_per_iteration"] / fast["cpu_seconds_per_iteration"],
        "nll_gap_nats": fast["test_nll_nats"] - base["test_nll_nats"],
        "train_time_speedup": base["train_seconds"] / fast["train_seconds"],
    }
    if cli is not None:
        r["whole_run_speedup"] = base["whole_run_seconds"] / cli["whole_run_seconds"]
    if quality is not None and quality.get("train_seconds"):
        r["time_to_quality_fraction"] = quality["train_seconds"] / base["train_seconds"]
    return r


def verdict(r: dict) -> dict:
    out = {"per_iteration_speedup": r["per_iteration_speedup"] >= TARGETS["per_iteration_speedup"],
           "nll_gap_nats": abs(r["nll_gap_nats"]) <= TARGETS["nll_gap_nats"]}
    if "whole_run_speedup" in r:
        out["whole_run_speedup"] = r["whole_run_speedup"] >= TARGETS["whole_run_speedup"]
    if "time_to_quality_fraction" in r:
        out["time_to_quality_fraction"] = r["time_to_quality_fraction"] <= TARGETS["time_to_quality_fraction"]
    return out


def table(results: dict) -> str:
    head = (f"{'data':13s} {'side':9s} {'s/iter':>8s} {'NFE f/b':>11s} {'test NLL':>9s} {'train s':>8s} "
            f"{'whole s':>8s}")
    lines = [head, "-" * len(head)]
    for data, res in results.items():
        b, f, c = res["baseline"], res["fastcnf"], res.get("fastcnf_cli")
        lines.append(f"{data:13s} {'ffjord':9s} {b['seconds_per_iteration']:8.4f} "
                     f"{b['nfe_forward']:5.1f}/{b['nfe_backward']:<5.1f} {b['test_nll_nats']:9.4f} "
                     f"{b['train_seconds']:8.1f} {b['whole_run_seconds']:8.1f}")
        whole = f"{c['whole_run_seconds']:8.1f}" if c else f"{'-':>8s}"
        lines.append(f"{'':13s} {'fastcnf':9s} {f['seconds_per_iteration']:8.4f} "
                     f"{f['nfe_forward']:5.1f}/{f['nfe_backward']:<5.1f} {f['test_nll_nats']:9.4f} "
                     f"{f['train_seconds']:8.1f} {whole}")
        r = res["ratios"]
        extra = f"  whole run x{r['whole_run_speedup']:.2f}" if "whole_run_speedup" in r else ""
        if "time_to_quality_fraction" in r:
            extra += f"  time to quality {r['time_to_quality_fraction']:.3f} of the baseline's"
        elif res.get("to_quality"):
            extra += "  time to quality: not reached"
        lines.append(f"{'':13s} {'ratio':9s} per iteration x{r['per_iteration_speedup']:.2f} "
                     f"(CPU time x{r['per_iteration_cpu_speedup']:.2f})  "
                     f"NLL gap {r['nll_gap_nats']:+.4f} nats  training time x{r['train_time_speedup']:.2f}{extra}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", default=["8gaussians", "checkerboard"])
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="at most 60 iterations, 8gaussians only, 2,000 test points")
    p.add_argument("--set", dest="fastcnf_set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra fastcnf overrides for every fastcnf run (e.g. threads=1)")
    p.add_argument("--baseline-threads", type=int, default=0,
                   help="torch threads of the baseline (0: torch's default, as FFJORD runs)")
    p.add_argument("--no-whole-run", action="store_true", help="skip the fastcnf CLI process")
    p.add_argument("--reuse-baseline", action="store_true",
                   help="reuse the baseline runs of an earlier invocation with the same command (development)")
    p.add_argument("--to-quality", action="store_true", help="also measure fastcnf's time to the baseline's NLL")
    p.add_argument("--quality-set", action="append", default=[], metavar="KEY=VALUE",
                   help="fastcnf overrides for the time-to-quality run (on top of --set)")
    p.add_argument("--quality-eval-every", type=int, default=50)
    p.add_argument("--ablation", type=int, default=0, metavar="STEPS",
                   help="also time engine variants at the trained weights of the first data set")
    p.add_argument("--json", default=None, help="write every figure here")
    p.add_argument("--work", default=str(HERE / "_work" / "speed_toy"), help="run directories and logs")
    args = p.parse_args(argv)
    if args.quick:
        args.iterations = min(args.iterations, 60)
        if args.data == ["8gaussians", "checkerboard"]:
            args.data = ["8gaussians"]
        args.fastcnf_set = ["data.n_test=2000", *args.fastcnf_set]
    tail = min(100, max(args.iterations // 2, 1))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "benchmark": "speed_toy",
        **run_metadata(__file__, argv),
        "load_average_start": load_average(),
        "settings": {"data": args.data, "iterations": args.iterations, "seed": args.seed,
                     "tail_iterations": tail, "fastcnf_overrides": args.fastcnf_set,
                     "baseline_threads": args.baseline_threads or "torch default",
                     "quality_overrides": args.quality_set, "quality_eval_every": args.quality_eval_every},
        "targets": TARGETS,
        "results": {},
    }
    for data in args.data:
        print(f"== {data}: test split", flush=True)
        test_file = work / f"test-{data}.npy"
        write_test_split(data, args.seed, args.fastcnf_set, test_file)
        print(f"== {data}: baseline (FFJORD, subprocess)", flush=True)
        base = run_baseline(data, args.iterations, args.seed, tail, test_file, work, args.baseline_threads,
                            args.reuse_baseline)
        print(f"   {base['seconds_per_iteration']:.4f} s/iter, NLL {base['test_nll_nats']:.4f}, "
              f"whole run {base['whole_run_seconds']:.1f} s", flush=True)
        print(f"== {data}: fastcnf (Trainer, in process)", flush=True)
        fast = run_fastcnf_inprocess(data, args.iterations, args.seed, tail, args.fastcnf_set, work)
        print(f"   {fast['seconds_per_iteration']:.4f} s/iter, NLL {fast['test_nll_nats']:.4f}", flush=True)
        cli = None
        if not args.no_whole_run:
            print(f"== {data}: fastcnf (CLI, subprocess)", flush=True)
            cli = run_fastcnf_cli(data, args.iterations, args.seed, args.fastcnf_set, work)
            print(f"   whole run {cli['whole_run_seconds']:.1f} s", flush=True)
        quality = None
        if args.to_quality:
            print(f"== {data}: fastcnf to the baseline's NLL {base['test_nll_nats']:.4f}", flush=True)
            quality = run_to_quality(data, args.seed, base["test_nll_nats"], args.fastcnf_set + args.quality_set,
                                     args.quality_eval_every, 2 * args.iterations, work)
            print(f"   reached at iteration {quality['reached_at_iteration']} after "
                  f"{quality['train_seconds']} s of training", flush=True)
        r = ratios(base, fast, cli, quality)
        report["results"][data] = {"baseline": base, "fastcnf": fast, "fastcnf_cli": cli, "to_quality": quality,
                                   "ratios": r, "targets_met": verdict(r)}
    if args.ablation:
        print(f"== {args.data[0]}: engine ablation", flush=True)
        report["ablation"] = run_ablation(args.data[0], args.seed, args.fastcnf_set, work, args.ablation)
    report["load_average_end"] = load_average()
    text = table(report["results"])
    if args.ablation:
        text += "\n\n" + ablation_table(report["ablation"])
    print()
    print(text)
    report["table"] = text
    if args.json:
        write_json(args.json, report, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
