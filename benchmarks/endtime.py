"""End-time policies compared at equal iterations: FFJORD (fixed T) vs TO-FLOW vs STEER vs RNODE vs
TO-FLOW + RNODE (TO-FLOW, Du et al. 2022, Table 1 and Figure 1), plus a TO-FLOW settings study.

For every (data set, variant, seed) it trains with the one fastcnf trainer and records the test
NLL (toy) or bits/dim (images), mean forward/backward NFE per training iteration, training wall
time and the final T per block; the T and NFE curves come from each run's log.csv.

Outputs: ``benchmarks/results/endtime.json`` (with the command, commit and machine), the figures
``benchmarks/results/endtime_densities.png`` (learned 2-D densities side by side,
TO-FLOW (Du et al. 2022) Figure 1 style) and ``benchmarks/results/endtime_T.png`` (T and NFE over training).

Run ``PYTHONPATH=src python benchmarks/endtime.py`` (defaults sized for ~15 minutes on 2 CPU
cores; ``--help`` for the sizes: toy sets, iterations, seeds, the study, digits, MNIST).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from common import RESULTS, Timer, mean_std, pyplot, read_log, run_metadata, save_figure, write_json

from fastcnf.methods import load_recipe
from fastcnf.training.trainer import Trainer

#: variant -> overrides on top of the data set's base recipe
VARIANTS: dict[str, list[str]] = {
    "ffjord": [],
    "toflow": ["endtime.policy=toflow"],
    "steer": ["endtime.policy=steer"],
    "rnode": ["model.kinetic_weight=0.01", "model.jacobian_weight=0.01"],
    "toflow+rnode": ["endtime.policy=toflow", "model.kinetic_weight=0.01", "model.jacobian_weight=0.01"],
}
#: toy RNODE runs use the vmap exact trace (the rows in benchmarks/README.md were measured so; the
#: recipe's ``auto`` computes the same loss, docs/endtime.md note 1)
RNODE_TOY = ["model.exact_mode=vmap"]
#: TO-FLOW settings study (toy): why does T grow, and what setting (alpha, T0, variant) shortens
#: it and cuts NFE? Fixed-T runs at the other T0 are the references for the T0 rows.
STUDY: dict[str, list[str]] = {
    "toflow-alpha1": ["endtime.policy=toflow", "endtime.alpha=1.0"],
    "toflow-alpha5": ["endtime.policy=toflow", "endtime.alpha=5.0"],
    "joint": ["endtime.policy=joint"],
    "ffjord-T0.25": ["model.end_time=0.25"],
    "toflow-T0.25": ["endtime.policy=toflow", "model.end_time=0.25"],
    "ffjord-T1": ["model.end_time=1.0"],
    "toflow-T1": ["endtime.policy=toflow", "model.end_time=1.0"],
}


def run_one(recipe: str, overrides: list[str], seed: int) -> dict:
    cfg = load_recipe(recipe, overrides + [f"seed={seed}", "train.checkpoint_every=0"])
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, tmp, progress=False)
        tr.figures = lambda: None  # figures are drawn here, not per run
        with Timer() as timer:
            m = tr.fit()
        rows = read_log(Path(tmp) / "log.csv")
        density = None
        if tr.bundle.dim == 2:
            from fastcnf.evaluation.plots import density_2d

            tr.model.eval()
            with torch.no_grad():
                _, density = density_2d(tr.model, npts=60, dtype=tr.dtype)
    t_cols = [k for k in rows[0] if k.startswith("T.")]
    return {
        "test_nll_nats": m["test_nll_nats"], "test_bits_per_dim": m.get("test_bits_per_dim"),
        "nfe_forward_mean": m["nfe_forward_mean"], "nfe_backward_mean": m["nfe_backward_mean"],
        "eval_nfe_forward": m.get("eval_nfe_forward"), "train_seconds": m["train_seconds"], "wall_seconds": timer.wall,
        "end_times": m["end_times"],
        "curves": {"nfe_forward": [float(r["nfe_forward"]) for r in rows],
                   **{k: [float(r[k]) for r in rows] for k in t_cols}},
        "density": None if density is None else density.tolist(),
    }


def summarise(runs: list[dict]) -> dict:
    out = {}
    for key in ("test_nll_nats", "test_bits_per_dim", "nfe_forward_mean", "nfe_backward_mean", "train_seconds"):
        stats = mean_std(r.get(key) for r in runs)
        if stats:
            out[key] = stats
    # forward NFE late in training (mean of the last 10% of iterations): where T has moved
    late = mean_std(float(np.mean(c[-max(1, len(c) // 10):])) for c in (r["curves"]["nfe_forward"] for r in runs) if c)
    if late:
        out["nfe_forward_last10pct"] = late
    out["end_times"] = [r["end_times"] for r in runs]
    return out


def figures(results: dict, out_dir: Path = RESULTS) -> None:
    plt = pyplot()
    # densities: the equal-iteration comparison only (keys with a --data-suffix are extra studies)
    toy = {d: v for d, v in results["data"].items()
           if "@" not in d and any(r["runs"][0]["density"] for r in v.values())}
    if toy:
        variants = list(dict.fromkeys(v for per in toy.values() for v in per))
        fig, axes = plt.subplots(len(toy), len(variants), figsize=(2.2 * len(variants), 2.2 * len(toy)),
                                 squeeze=False)
        for i, (d, per_variant) in enumerate(toy.items()):
            for j, v in enumerate(variants):
                ax = axes[i, j]
                ax.set_xticks([]), ax.set_yticks([])
                if v not in per_variant:
                    ax.axis("off")
                    continue
                ax.imshow(np.array(per_variant[v]["runs"][0]["density"]), origin="lower", cmap="inferno")
                ax.set_xticks([]), ax.set_yticks([])
                if i == 0:
                    ax.set_title(v, fontsize=8)
                if j == 0:
                    ax.set_ylabel(d, fontsize=8)
        save_figure(fig, Path(out_dir) / "endtime_densities.png")
    datasets = list(results["data"])
    ncol = min(5, len(datasets))
    nrow = -(-len(datasets) // ncol)
    fig, axes = plt.subplots(2 * nrow, ncol, figsize=(3.6 * ncol, 2.7 * 2 * nrow), squeeze=False)
    for j, d in enumerate(datasets):
        top, bottom = axes[2 * (j // ncol), j % ncol], axes[2 * (j // ncol) + 1, j % ncol]
        for v, entry in results["data"][d].items():
            curves = entry["runs"][0]["curves"]
            for k, c in curves.items():
                if k.startswith("T."):
                    top.plot(c, lw=0.9, label=f"{v} {k[2:]}" if len(curves) > 2 else v)
            nfe = np.array(curves["nfe_forward"])
            w = max(1, len(nfe) // 20)
            bottom.plot(np.convolve(nfe, np.ones(w) / w, mode="valid"), lw=0.9, label=v)
        top.set_title(d, fontsize=9)
        top.set_ylabel("end time T")
        bottom.set_ylabel("forward NFE (moving avg)")
        bottom.set_xlabel("iteration")
        top.legend(fontsize=5)
    for j in range(len(datasets), nrow * ncol):
        axes[2 * (j // ncol), j % ncol].axis("off"), axes[2 * (j // ncol) + 1, j % ncol].axis("off")
    save_figure(fig, Path(out_dir) / "endtime_T.png")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--toy", nargs="*", default=["checkerboard", "8gaussians"],
                   help="toy sets (the eight: swissroll circles rings moons 8gaussians pinwheel 2spirals checkerboard)")
    p.add_argument("--toy-iterations", type=int, default=150)
    p.add_argument("--toy-hidden", default="[32,32,32]", help="dynamics widths on toy data (FFJORD: [64,64,64])")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--study", action=argparse.BooleanOptionalAction, default=True,
                   help="the TO-FLOW settings study (STUDY) on every --toy set, beside --variants")
    p.add_argument("--digits-iterations", type=int, default=20, help="0 skips digits")
    p.add_argument("--mnist-iterations", type=int, default=0,
                   help="mnist-test-split (../shared/data/mnist) iterations; 0 skips it")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS))
    p.add_argument("--image-variants", nargs="*", default=None,
                   help="variants on digits/MNIST (default: --variants)")
    p.add_argument("--image-seeds", type=int, default=None, help="seeds on digits (default: --seeds)")
    p.add_argument("--mnist-seeds", type=int, default=1)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed, first-seed + 1, ...")
    p.add_argument("--out", default=str(RESULTS / "endtime.json"), help="JSON to write")
    p.add_argument("--data-suffix", default="",
                   help="appended to every data-set key of the JSON (e.g. '@400it' for a longer run kept "
                        "beside the equal-iteration rows)")
    p.add_argument("--figures", action=argparse.BooleanOptionalAction, default=True,
                   help="draw endtime_densities.png / endtime_T.png beside --out")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="merge the runs of earlier result files (e.g. more seeds of one data set) into "
                        "--out, recompute the summaries and figures, and exit")
    p.add_argument("--drop", nargs="+", default=[], metavar="DATA:VARIANT",
                   help="with --merge: leave out these entries of the files being merged (e.g. runs "
                        "superseded by a later setting); what was dropped is kept in the JSON's 'dropped'")
    p.add_argument("--threads", type=int, default=1, help="torch threads (2 oversubscribes a shared 2-core machine)")
    args = p.parse_args(argv)
    if args.merge:
        # the merged files' commands, commits and machine stand; the date and tree state are the merge's
        results = {**run_metadata(__file__, argv), **merge(args.merge, drop=args.drop)}
        write_json(args.out, results, indent=None)
        if args.figures:
            figures(results, Path(args.out).parent)
        print(table(results))
        return results
    torch.set_num_threads(args.threads)
    toy_common = [f"train.iterations={args.toy_iterations}", f"model.hidden_dims={args.toy_hidden}",
                  "data.n_test=2000", "eval.batch_size=2000"]
    plan: list[tuple[str, str, str, list[str]]] = []
    for d in args.toy:
        for v in args.variants:
            fix = RNODE_TOY if "rnode" in v else []
            plan.append((d, v, "toy-ffjord", [f"data.name={d}", *toy_common, *VARIANTS[v], *fix]))
    if args.study:
        for d in args.toy:
            for v, o in STUDY.items():
                plan.append((d, v, "toy-ffjord", [f"data.name={d}", *toy_common, *o]))
    image_variants = args.image_variants if args.image_variants is not None else args.variants
    seeds = {}
    if args.digits_iterations > 0:
        for v in image_variants:
            plan.append(("digits", v, "digits-cnf", [f"train.iterations={args.digits_iterations}", *VARIANTS[v]]))
        seeds["digits"] = args.image_seeds if args.image_seeds is not None else args.seeds
    mnist_root = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
    if args.mnist_iterations > 0 and mnist_root.exists():
        seeds["mnist-test-split"] = args.mnist_seeds
        for v in image_variants:
            plan.append(("mnist-test-split", v, "mnist-ffjord", [
                "data.name=mnist-test-split", f"data.root={mnist_root}", f"train.iterations={args.mnist_iterations}",
                "model.hidden_dims=[32,32]", "model.num_blocks=1", "solver.gradient=auto", "train.batch_size=100",
                # a CPU-scale run of tens of iterations: FFJORD's 1,000-iteration warm-up would keep lr ~ 0
                "train.warmup_iterations=0", "eval.max_examples=500", *VARIANTS[v]]))
    results: dict = {**run_metadata(__file__, argv), "settings": vars(args), "data": {}}
    for d, v, recipe, overrides in plan:
        runs = []
        for seed in range(args.first_seed, args.first_seed + seeds.get(d, args.seeds)):
            r = run_one(recipe, overrides, seed)
            r["seed"] = seed
            runs.append(r)
            T = ", ".join(f"{k}={t:.3f}" for k, t in r["end_times"].items())
            score = r["test_bits_per_dim"] if r["test_bits_per_dim"] is not None else r["test_nll_nats"]
            print(f"{d:14s} {v:14s} seed {seed}: test {score:.4f}  NFE f/b {r['nfe_forward_mean']:.1f}/"
                  f"{r['nfe_backward_mean']:.1f}  train {r['train_seconds']:.1f}s  T {T}", flush=True)
        results["data"].setdefault(d + args.data_suffix, {})[v] = {"recipe": recipe, "overrides": overrides, **summarise(runs),
                                               "runs": runs}
        write_json(args.out, results, indent=None)
    if args.figures:
        figures(results, Path(args.out).parent)
    print("\n" + table(results))
    return results


def merge(paths: list[str], drop: list[str] = ()) -> dict:
    """One result from several files: their runs per (data set, variant) concatenated (seeds in
    file order), summaries recomputed, every file's command kept. ``drop`` ("data:variant")
    leaves those entries out of the FIRST file (superseded runs; the later files' runs of the
    same entry are kept); the dropped summaries are recorded under "dropped"."""
    merged: dict = {"commands": [], "commits": [], "data": {}, "dropped": {}}
    drop_set = set(drop)
    for item in drop_set:
        if ":" not in item:
            raise SystemExit(f"--drop takes DATA:VARIANT, got {item!r}")
    for i, path in enumerate(paths):
        with open(path) as fh:
            part = json.load(fh)
        merged["commands"].append(part["command"])
        merged["commits"].append(part["commit"])
        merged.setdefault("machine", part["machine"])
        merged.setdefault("settings", part["settings"])
        merged["dropped"].update(part.get("dropped", {}))
        for d, per in part["data"].items():
            for v, entry in per.items():
                if i == 0 and f"{d}:{v}" in drop_set:
                    merged["dropped"][f"{d}:{v}"] = {k: entry[k] for k in entry if k != "runs"} | {
                        "seeds": [r.get("seed") for r in entry["runs"]], "from": part["command"]}
                    continue
                into = merged["data"].setdefault(d, {}).setdefault(v, {"recipe": entry["recipe"],
                                                                        "overrides": entry["overrides"], "runs": []})
                first = part["settings"].get("first_seed", 0)
                # files from before runs recorded their seed: seeds ran first_seed, first_seed + 1, ...
                into["runs"].extend({"seed": first + k, **r} for k, r in enumerate(entry["runs"]))
    for per in merged["data"].values():
        for entry in per.values():
            entry.update(summarise(entry["runs"]))
    merged["command"] = (" + ".join(merged["commands"]) + f" ; merged by --merge {' '.join(paths)}"
                         + (f" --drop {' '.join(drop)}" if drop else ""))
    merged["commit"] = merged["commits"][-1]
    return merged


def table(results: dict) -> str:
    lines = ["| data | variant | seeds | test NLL (nats) / bits/dim | NFE fwd | NFE fwd, last 10% | NFE bwd | train s "
             "| final T (per seed) |", "|---|---|---|---|---|---|---|---|---|"]
    for d, per in results["data"].items():
        for v, e in per.items():
            score = e.get("test_bits_per_dim", e.get("test_nll_nats"))
            T = "; ".join(", ".join(f"{t:.3f}" for t in et.values()) for et in e["end_times"])
            lines.append(f"| {d} | {v} | {len(e['runs'])} | {score['mean']:.4f} ± {score['std']:.4f} | "
                         f"{e['nfe_forward_mean']['mean']:.1f} ± {e['nfe_forward_mean']['std']:.1f} | "
                         f"{e.get('nfe_forward_last10pct', {}).get('mean', float('nan')):.1f} | "
                         f"{e['nfe_backward_mean']['mean']:.1f} | {e['train_seconds']['mean']:.1f} | {T} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
