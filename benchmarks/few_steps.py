"""Few-step generation: sample quality against NFE for flow matching, 1- and 2-rectified flows
(reflow) and a distilled model (issue 28; Liu et al. 2023, "Flow Straight and Fast: Learning to
Generate and Transfer Data with Rectified Flow", §2.2-2.3).

Per data set and seed, a pipeline of runs through the CLI (in this process, timed):

1. ``fm``: the base recipe trained by flow matching (``toy-fm``; ``digits-fm-conditional``);
2. ``reflow1``: ``fastcnf reflow fm --recipe R`` (``toy-reflow``; ``digits-fm-conditional-reflow``),
   ``--pairs K`` pairs drawn with the evaluation solver, retrained from the teacher's weights;
3. ``reflow2``: ``fastcnf reflow reflow1`` (the 2-rectified flow);
4. ``distill1``: ``fastcnf distill reflow2 --steps 1``;
5. ``distill4``: ``fastcnf distill fm --steps 4 --recipe R``: the original distilled to 4 Euler steps
   (trained at the 4 grid times only) on the same pairs as ``reflow1`` (copied: same teacher,
   seed and solver, so the command keeps them instead of drawing them again).

Each model then samples at N = 1, 2, 4, 8 Euler steps and with its adaptive evaluation solver
(dopri5 at ``eval.atol``), every draw from the same seeded noise, and is scored:

* toys: the 2-Wasserstein distance between ``--n-samples`` samples and as many test points, by
  the exact assignment (``scipy.optimize.linear_sum_assignment`` on squared distances);
* digits (class-conditional, the same number of samples of every label): the Frechet distance to
  the test split on the 64 pixels (samples and test images in the model's [0, 1) scale) and on the
  hidden features of a small classifier (scikit-learn ``MLPClassifier``, 64 ReLU units, fitted on
  the training split), the kernel MMD^2 (Gaussian kernel, bandwidth: median pairwise distance of
  the test split; unbiased estimate), and the sample accuracy: the share of samples a logistic
  regression fitted on the training split assigns to the label they were drawn for.

The same distances from the training split to the test split (``train_split_vs_test``) are the
floor a perfect sampler reaches with that many points.

Also per run: test NLL / bits/dim and evaluation NFE at the evaluation tolerance (``metrics.json``
of the trainer's final evaluation), the wall time of pair generation and of retraining.

Writes ``benchmarks/results/few_steps.json`` (``--out``, with the command, commit and machine) and a
figure of quality against NFE (``--figure``); prints Markdown tables. One torch thread.

    python benchmarks/few_steps.py [--parts toys digits] [--seeds 0 1 2] [--toy-data 8gaussians]
        [--toy-iterations 1000] [--toy-reflow-iterations 1000] [--toy-pairs 10000]
        [--digits-iterations 1500] [--digits-reflow-iterations 1000] [--digits-pairs 5000]
        [--steps 1 2 4 8] [--n-samples 2000] [--work DIR] [--reuse]
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import linalg
from scipy.optimize import linear_sum_assignment

from common import RESULTS, mean_std, pyplot, run_metadata, save_figure, write_json

from fastcnf.cli import _load_run, main as cli  # noqa: E402  (common puts src/ first on sys.path)

STAGES = ("fm", "reflow1", "reflow2", "distill1", "distill4")


# ---- distances ----------------------------------------------------------------------------------
def wasserstein2(a: np.ndarray, b: np.ndarray) -> float:
    """Exact 2-Wasserstein distance between two equal-size empirical measures (assignment problem)."""
    cost = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    return float(np.sqrt(cost[rows, cols].mean()))


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two sets of vectors (Heusel et al. 2017)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    # digits' border pixels are constant (and ReLU features may be dead): the covariances are
    # singular, so both get eps * I, as the reference FID code does when sqrtm fails
    eps = 1e-6 * np.eye(a.shape[1])
    ca, cb = np.cov(a, rowvar=False) + eps, np.cov(b, rowvar=False) + eps
    root = linalg.sqrtm(ca @ cb)
    root = root.real if np.iscomplexobj(root) else root
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * root))


def mmd2(a: np.ndarray, b: np.ndarray, bandwidth: float) -> float:
    """Unbiased MMD^2 with the Gaussian kernel exp(-|x - y|^2 / (2 h^2)) (Gretton et al. 2012)."""
    def k(x, y):
        d = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
        return np.exp(-d / (2 * bandwidth ** 2))
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    n, m = len(a), len(b)
    return float((kaa.sum() - np.trace(kaa)) / (n * (n - 1)) + (kbb.sum() - np.trace(kbb)) / (m * (m - 1))
                 - 2 * kab.mean())


def median_distance(x: np.ndarray) -> float:
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    return float(np.median(d[np.triu_indices(len(x), 1)]))


class DigitsScorer:
    """Pixel / feature Frechet distance, MMD and sample accuracy against the digits test split."""

    def __init__(self, bundle) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.neural_network import MLPClassifier

        scale = lambda x: ((x.double() + 0.5) / bundle.levels).reshape(len(x), -1).numpy()  # noqa: E731
        self.train_x, self.train_y = scale(bundle.train.x), bundle.train.y.numpy()
        self.test_x = scale(bundle.test.x)
        self.logistic = LogisticRegression(max_iter=2000).fit(self.train_x, self.train_y)
        self.mlp = MLPClassifier((64,), max_iter=1000, random_state=0).fit(self.train_x, self.train_y)
        self.test_features = self.features(self.test_x)
        self.bandwidth = median_distance(self.test_x)

    def features(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(x @ self.mlp.coefs_[0] + self.mlp.intercepts_[0], 0.0)

    def __call__(self, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        return {"frechet_pixels": frechet(x, self.test_x),
                "frechet_features": frechet(self.features(x), self.test_features),
                "mmd2": mmd2(x, self.test_x, self.bandwidth),
                "sample_accuracy": float((self.logistic.predict(x) == y).mean())}


# ---- the pipeline -------------------------------------------------------------------------------
def quiet_cli(argv: list[str]) -> tuple[float, float]:
    """Run ``fastcnf ARGV`` in this process; returns its wall time and this process's CPU time
    (user + sys, one torch thread) in seconds (raises on failure)."""
    start, cpu = time.perf_counter(), time.process_time()
    with redirect_stdout(io.StringIO()):
        code = cli(argv)
    if code != 0:
        raise RuntimeError(f"fastcnf {' '.join(argv)} exited with {code}")
    return time.perf_counter() - start, time.process_time() - cpu


def pipeline(work: Path, recipe: str, reflow_recipe: str, iterations: int, reflow_iterations: int,
             pairs: int, seed: int, extra: list[str], reuse: bool = False,
             stages: tuple[str, ...] = STAGES, distill4_iterations: int | None = None) -> dict[str, dict[str, Any]]:
    sets = [f"seed={seed}", "threads=1", "eval.figures=false", *extra]
    runs: dict[str, dict[str, Any]] = {}
    done = lambda stage: reuse and (work / stage / "metrics.json").exists()  # noqa: E731
    if not done("fm"):
        wall, cpu = quiet_cli(["train", recipe, "--out", str(work / "fm"), "--quiet", "--force",
                               "--set", f"train.iterations={iterations}", *sets])
        runs["fm"] = {"wall_seconds": wall, "cpu_seconds": cpu}
    retrain = ["--set", f"train.iterations={reflow_iterations}", *sets]
    for stage, teacher, cmd in (("reflow1", "fm", ["reflow", "--recipe", reflow_recipe]),
                                ("reflow2", "reflow1", ["reflow"]),
                                ("distill1", "reflow2", ["distill", "--steps", "1"]),
                                ("distill4", "fm", ["distill", "--steps", "4", "--recipe", reflow_recipe])):
        if stage not in stages:
            continue
        if not done(stage):
            if stage == "distill4" and (work / "reflow1" / "pairs.npz").exists():
                # the teacher fm's pairs, drawn for reflow1 with the same seed and solver: kept by the command
                (work / stage).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(work / "reflow1" / "pairs.npz", work / stage / "pairs.npz")
            its = retrain if stage != "distill4" or not distill4_iterations else \
                ["--set", f"train.iterations={distill4_iterations}", *sets]
            wall, cpu = quiet_cli([cmd[0], str(work / teacher), "--out", str(work / stage), "--pairs",
                                   str(pairs), "--quiet", *cmd[1:], *its])
            runs[stage] = {"wall_seconds": wall, "cpu_seconds": cpu}
    for stage in stages:
        runs.setdefault(stage, {"wall_seconds": None, "cpu_seconds": None})  # reused from an earlier invocation
    for stage in stages:
        m = json.loads((work / stage / "metrics.json").read_text())
        runs[stage].update({k: m.get(k) for k in ("test_nll_nats", "test_bits_per_dim", "eval_nfe_forward",
                                                   "train_seconds", "pair_seconds", "iterations")})
    return runs


def sample_scores(run_dir: Path, steps: list[int], n: int, seed: int, score, conditional: bool,
                  methods: tuple[str, ...] = ("euler",)) -> list[dict]:
    """Scores of ``n`` samples for every (method, steps) pair and the adaptive solver, all from the
    same seeded noise."""
    cfg, bundle, task, model = _load_run(str(run_dir), ["threads=1"])
    rows = []
    for method, n_steps in [*((m, k) for m in methods for k in steps), (None, None)]:
        gen = torch.Generator().manual_seed(seed + 12345)
        y = torch.arange(model.prior.num_classes).repeat_interleave(-(-n // model.prior.num_classes))[:n] \
            if conditional else None
        x = model.sample(n, y, generator=gen, steps=n_steps, method=method or "euler").double().reshape(n, -1).numpy()
        nfe = model.nfe_last()[0]
        rows.append({"sampler": "adaptive" if n_steps is None else f"{method}-{n_steps}", "nfe": nfe,
                     **score(x, None if y is None else y.numpy())})
    return rows


def run_part(part: str, args, seed: int) -> dict[str, Any]:
    from fastcnf.methods import load_recipe
    from fastcnf.data import load_data

    work = Path(args.work) / f"{part}-seed{seed}"
    if part == "toys":
        extra = [f"data.name={args.toy_data}", f"data.n_test={args.n_samples}"]
        runs = pipeline(work, "toy-fm", "toy-reflow", args.toy_iterations, args.toy_reflow_iterations,
                        args.toy_pairs, seed, extra, args.reuse, tuple(args.stages))
        bundle = load_data(load_recipe("toy-fm", extra).data, seed)
        test = bundle.test.x.double().numpy()[:args.n_samples]
        score = lambda x, y: {"w2": wasserstein2(x, test)}  # noqa: E731
        conditional = False
        train = bundle.train.x.double().numpy()[:args.n_samples]
        reference = score(train, None)
    else:
        runs = pipeline(work, "digits-fm-conditional", "digits-fm-conditional-reflow", args.digits_iterations,
                        args.digits_reflow_iterations, args.digits_pairs, seed, [], args.reuse, tuple(args.stages),
                        args.digits_distill4_iterations)
        bundle = load_data(load_recipe("digits-fm-conditional").data, seed)
        score, conditional = DigitsScorer(bundle), True
        reference = score(score.train_x, score.train_y)
    for stage in args.stages:
        runs[stage]["samples"] = sample_scores(work / stage, args.steps, args.n_samples, seed, score, conditional,
                                               tuple(args.methods))
    # the same distances from training data to the test split: the floor a perfect sampler reaches
    return {"seed": seed, "runs": runs, "train_split_vs_test": reference}


# ---- what drives the evaluation NFE -------------------------------------------------------------
FIRST_STEPS = (None, 0.01, 0.05)


def nfe_diagnosis(run_dir: Path) -> dict[str, Any]:
    """The evaluation solve (data -> noise, dopri5 at the evaluation tolerance, the test split in
    one batch of ``eval.batch_size``, the evaluation's dequantisation seed) taken apart: its NFE
    with the log-density (Hutchinson, as ``eval``) and without it (the state alone: no divergence
    in the error control), the share of evaluations near the data end (t < 0.05) and the times of
    the first ones, and the NFE and bits/dim when dopri5's first step is forced to 0.01 / 0.05
    instead of the initial-step heuristic's (Hairer, Norsett & Wanner 1993, II.4; torchdiffeq's
    ``_select_initial_step``, patched here for the measurement only)."""
    import fastcnf.ode.fast_solvers as fast
    from fastcnf.data.base import dequantize
    from fastcnf.models.flow_model import bits_per_dim_from_log_prob

    cfg, bundle, task, model = _load_run(str(run_dir), ["threads=1"])
    model.eval()
    block = model.cnf_blocks()[0]
    times: list[float] = []
    heuristic: list[float] = []
    forced: list[float | None] = [None]
    net_forward, select = block.net.forward, fast._select_initial_step

    def recording(t, z, *a, **k):
        times.append(float(t.reshape(-1)[0]))
        return net_forward(t, z, *a, **k)

    def first_step(*a, **k):
        h = select(*a, **k)
        heuristic.append(h)
        return h if forced[0] is None else float(forced[0])

    n = min(len(bundle.test), cfg.eval.batch_size)
    x = dequantize(bundle.test.x[:n], bundle.levels, generator=torch.Generator().manual_seed(cfg.eval.seed))
    y = None if bundle.test.y is None else bundle.test.y[:n]
    out: dict[str, Any] = {"examples": n}
    block.net.forward, fast._select_initial_step = recording, first_step
    try:
        for name, h in [("state_only", None), *((f"log_density_first_step_{h or 'heuristic'}", h) for h in FIRST_STEPS)]:
            times.clear()
            heuristic.clear()
            forced[0] = h
            torch.manual_seed(cfg.eval.seed)
            with torch.no_grad():
                if name == "state_only":
                    model.encode(x)
                    bpd = None
                else:
                    bpd = float(bits_per_dim_from_log_prob(model.log_prob(x, y).mean(), bundle.dim, bundle.levels))
            ts = np.array(times)
            out[name] = {"nfe": model.nfe_last()[0], "bits_per_dim": bpd, "evals_below_t0.05": int((ts < 0.05).sum()),
                         "heuristic_first_step": heuristic[0] if heuristic else None,
                         "first_times": sorted(set(np.round(ts, 5).tolist()))[:12]}
    finally:
        block.net.forward, fast._select_initial_step = net_forward, select
    return out


# ---- summary ------------------------------------------------------------------------------------
def summarize(part: str, seeds: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ["w2"] if part == "toys" else ["frechet_pixels", "frechet_features", "mmd2", "sample_accuracy"]
    table: dict[str, Any] = {"train_split_vs_test": {k: mean_std(s["train_split_vs_test"][k] for s in seeds)
                                                     for k in keys}}
    for stage in [s for s in STAGES if s in seeds[0]["runs"]]:
        samplers = [r["sampler"] for r in seeds[0]["runs"][stage]["samples"]]
        rows = {}
        for i, sampler in enumerate(samplers):
            rows[sampler] = {k: mean_std(s["runs"][stage]["samples"][i][k] for s in seeds) for k in ["nfe", *keys]}
        table[stage] = {"samplers": rows, **{k: mean_std(s["runs"][stage].get(k) for s in seeds)
                                           for k in ("test_nll_nats", "test_bits_per_dim", "eval_nfe_forward",
                                                     "train_seconds", "pair_seconds", "wall_seconds", "cpu_seconds")}}
    return table


def stages(table: dict[str, Any]):
    return [(stage, table[stage]) for stage in STAGES if stage in table]


def fmt(v: dict | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}" if v["std"] else f"{v['mean']:.{digits}f}"


def print_tables(part: str, table: dict[str, Any]) -> None:
    keys = ["w2"] if part == "toys" else ["frechet_pixels", "frechet_features", "mmd2", "sample_accuracy"]
    print(f"\n### {part}: sample quality against NFE\n")
    print("| model | sampler | NFE | " + " | ".join(keys) + " |")
    print("|---|---|---|" + "---|" * len(keys))
    ref = table["train_split_vs_test"]
    print("| training split (reference) | - | - | " + " | ".join(fmt(ref[k], 4) for k in keys) + " |")
    for stage, t in stages(table):
        for sampler, row in t["samplers"].items():
            print(f"| {stage} | {sampler} | {fmt(row['nfe'], 1)} | " + " | ".join(fmt(row[k], 4) for k in keys) + " |")
    print(f"\n### {part}: likelihood at the evaluation tolerance and wall times\n")
    print("| model | test NLL (nats) | bits/dim | eval NFE | pairs s | retraining s | command wall s | command CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for stage, t in stages(table):
        print(f"| {stage} | {fmt(t['test_nll_nats'], 4)} | {fmt(t['test_bits_per_dim'], 4)} | "
              f"{fmt(t['eval_nfe_forward'], 1)} | {fmt(t['pair_seconds'], 1)} | {fmt(t['train_seconds'], 1)} | "
              f"{fmt(t['wall_seconds'], 1)} | {fmt(t['cpu_seconds'], 1)} |")


def figure(results: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    parts = [p for p in ("toys", "digits") if p in results["summary"]]
    fig, axes = plt.subplots(1, len(parts), figsize=(5.5 * len(parts), 4), squeeze=False)
    for ax, part in zip(axes[0], parts):
        key = "w2" if part == "toys" else "frechet_pixels"
        markers = {"euler": "o-", "midpoint": "s--", "heun": "^:", "rk4": "d-."}
        for i, (stage, t) in enumerate(stages(results["summary"][part])):
            color = f"C{i}"
            for method, style in markers.items():  # one line per model and fixed-step method
                rows = [r for name, r in t["samplers"].items() if name.startswith(method + "-")]
                if rows:
                    ax.plot([r["nfe"]["mean"] for r in rows], [r[key]["mean"] for r in rows], style, color=color,
                            label=f"{stage} {method}")
            if "adaptive" in t["samplers"]:
                r = t["samplers"]["adaptive"]
                ax.plot([r["nfe"]["mean"]], [r[key]["mean"]], "*", color=color, markersize=10,
                        label=f"{stage} adaptive")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("function evaluations per sample batch")
        ax.set_ylabel("2-Wasserstein to test" if part == "toys" else "pixel Frechet distance to test")
        ax.axhline(results["summary"][part]["train_split_vs_test"][key]["mean"], color="grey", ls="--",
                   label="training split")
        ax.set_title(part)
        ax.legend(fontsize=6, ncol=2)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["toys", "digits"], choices=("toys", "digits"))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--toy-data", default="8gaussians")
    p.add_argument("--toy-iterations", type=int, default=1000)
    p.add_argument("--toy-reflow-iterations", type=int, default=1000)
    p.add_argument("--toy-pairs", type=int, default=10000)
    p.add_argument("--digits-iterations", type=int, default=1500)
    p.add_argument("--digits-reflow-iterations", type=int, default=1000)
    p.add_argument("--digits-pairs", type=int, default=5000)
    p.add_argument("--digits-distill4-iterations", type=int, default=None,
                   help="training iterations of the distill4 stage (default: --digits-reflow-iterations)")
    p.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--methods", nargs="+", default=["euler"], choices=("euler", "midpoint", "heun", "rk4"),
                   help="fixed-step samplers, each at every --steps (midpoint / heun: 2 evaluations a step)")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES,
                   help="the runs to make and score (reflow2 needs reflow1, distill1 reflow2)")
    p.add_argument("--n-samples", type=int, default=2000)
    p.add_argument("--work", default="/tmp/few_steps")
    p.add_argument("--reuse", action="store_true",
                   help="keep the runs of an earlier invocation in --work that finished (rescore only)")
    p.add_argument("--nfe-diagnosis", action="store_true",
                   help="only take the evaluation solve of the finished fm / reflow1 / reflow2 runs in --work apart "
                        "(what drives the evaluation NFE) and write that to --out")
    p.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                   help="no runs: merge the seeds of earlier outputs of this script (e.g. one per seed, run side by "
                        "side) into --out, with the tables and --figure of all their seeds")
    p.add_argument("--out", default=str(RESULTS / "few_steps.json"))
    p.add_argument("--figure", default=str(RESULTS / "few_steps.png"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results: dict[str, Any] = {**run_metadata(__file__, argv), "parts": {}, "summary": {}}
    if args.combine:
        results = {**run_metadata(__file__, argv), "combined": args.combine, "parts": {}, "summary": {}}
        for path in args.combine:
            for part, seeds in json.loads(Path(path).read_text())["parts"].items():
                have = {s["seed"] for s in results["parts"].get(part, [])}
                results["parts"].setdefault(part, []).extend(s for s in seeds if s["seed"] not in have)
        for part, seeds in results["parts"].items():
            seeds.sort(key=lambda s: s["seed"])
            results["summary"][part] = summarize(part, seeds)
            print(f"{part}: seeds {[s['seed'] for s in seeds]}")
            print_tables(part, results["summary"][part])
        write_json(args.out, results)
        figure(results, Path(args.figure))
        print(f"\nwrote {args.out} and {args.figure}")
        return 0
    if args.nfe_diagnosis:
        results = {**run_metadata(__file__, argv), "nfe_diagnosis": {}}
        for part in args.parts:
            for seed in args.seeds:
                for stage in ("fm", "reflow1", "reflow2"):
                    run_dir = Path(args.work) / f"{part}-seed{seed}" / stage
                    if (run_dir / "metrics.json").exists():
                        row = nfe_diagnosis(run_dir)
                        results["nfe_diagnosis"][f"{part}-seed{seed}/{stage}"] = row
                        print(f"{part} seed {seed} {stage}: " + ", ".join(
                            f"{k} {v['nfe']} NFE" + (f" ({v['bits_per_dim']:.4f} bits/dim)" if v["bits_per_dim"] else "")
                            + f", {v['evals_below_t0.05']} at t < 0.05" for k, v in row.items() if k != "examples"),
                            flush=True)
                        write_json(args.out, results)
        return 0
    for part in args.parts:
        seeds = []
        for seed in args.seeds:  # the JSON is rewritten after every seed: an interrupted run keeps its seeds
            seeds.append(run_part(part, args, seed))
            results["parts"][part] = seeds
            results["summary"][part] = summarize(part, seeds)
            write_json(args.out, results)
        print_tables(part, results["summary"][part])
    figure(results, Path(args.figure))
    print(f"\nwrote {args.out} and {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
