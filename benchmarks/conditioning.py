"""CCNF vs InfoCNF (InfoCNF, Nguyen et al. 2019, Tables 1-2, at CPU scale): test error, conditional NLL, NFE, wall time.

Trains the ``digits-ccnf`` and ``digits-infocnf`` recipes (and, with ``--datasets digits,mnist``,
the same models on ``mnist-test-split`` from ``--mnist-root``) for the same number of iterations
over several seeds through fastcnf's one trainer, then writes
``benchmarks/results/conditioning.json`` (command, commit, machine, every run's metrics, mean ± std),
``benchmarks/results/conditioning.png`` and prints a Markdown table.

Example::

    PYTHONPATH=src python benchmarks/conditioning.py --iterations 40 --seeds 0 1 2 \\
        --set train.batch_size=100 --set threads=1
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import RESULTS, Timer, load_average, mean_std, pyplot, run_metadata, save_figure, write_json

from fastcnf.methods import load_recipe
from fastcnf.training.trainer import Trainer

KINDS = ("ccnf", "infocnf")
#: metrics reported per run (metrics.json key -> table header)
COLUMNS = {
    "test_error": "test error (%)",
    "test_bits_per_dim_conditional": "cond. NLL (bits/dim)",
    "test_bits_per_dim_marginal": "marg. NLL (bits/dim)",
    "nfe_forward_mean": "NFE fwd",
    "nfe_backward_mean": "NFE bwd",
    "train_seconds": "train s",
    "wall_seconds": "wall s",
}
DATA_OVERRIDES = {
    "digits": [],
    "mnist": ["data.name=mnist-test-split"],
}


def run_one(dataset: str, kind: str, seed: int, args) -> dict:
    overrides = list(DATA_OVERRIDES[dataset]) + [f"train.iterations={args.iterations}", f"seed={seed}",
                                                 "train.checkpoint_every=0"] + list(args.set)
    if dataset == "mnist":
        overrides.append(f"data.root={args.mnist_root}")
    cfg = load_recipe(f"digits-{kind}", overrides)
    out = Path(args.runs) / f"{dataset}-{kind}-seed{seed}"
    with Timer() as timer:
        metrics = Trainer(cfg, out, progress=False, quiet=True).fit()
    metrics["wall_seconds"] = timer.wall
    row = {k: metrics.get(k) for k in COLUMNS}
    row.update(dataset=dataset, kind=kind, seed=seed, run_dir=str(out))
    print(json.dumps(row), flush=True)
    return row


def summarise(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(r["dataset"], {}).setdefault(r["kind"], []).append(r)
    summary: dict = {}
    for ds, kinds in out.items():
        for kind, rs in kinds.items():
            entry = {}
            for k in COLUMNS:
                scale = 100 if k == "test_error" else 1  # test error in per cent
                stats = mean_std(scale * float(r[k]) for r in rs if r.get(k) is not None)
                if stats:
                    entry[k] = stats
            summary.setdefault(ds, {})[kind] = entry
    return summary


def table(summary: dict, n_seeds: int) -> str:
    lines = ["| data | model | " + " | ".join(COLUMNS.values()) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for ds, kinds in summary.items():
        for kind, entry in kinds.items():
            cells = [f"{entry[k]['mean']:.3f} ± {entry[k]['std']:.3f}" if k in entry else "-" for k in COLUMNS]
            lines.append(f"| {ds} | {kind} | " + " | ".join(cells) + " |")
    lines.append(f"\nmean ± std over {n_seeds} seeds")
    return "\n".join(lines)


def figure(summary: dict, path: Path) -> None:
    plt = pyplot()
    keys = ["test_error", "test_bits_per_dim_conditional", "nfe_forward_mean", "nfe_backward_mean"]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2))
    for ax, k in zip(axes, keys):
        labels, means, stds = [], [], []
        for ds, kinds in summary.items():
            for kind, entry in kinds.items():
                if k in entry:
                    labels.append(f"{ds}\n{kind}")
                    means.append(entry[k]["mean"])
                    stds.append(entry[k]["std"])
        ax.bar(range(len(means)), means, yerr=stds, capsize=4, color=["C0", "C1"] * (len(means) // 2 + 1))
        ax.set_xticks(range(len(means)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_title(COLUMNS[k], fontsize=9)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--datasets", default="digits", help="comma list of: digits, mnist")
    p.add_argument("--mnist-root", default="/work/shared/data/mnist")
    p.add_argument("--set", action="append", default=[], help="extra KEY=VALUE overrides for every run")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma list of: " + ", ".join(KINDS))
    p.add_argument("--runs", default="runs/bench-conditioning")
    p.add_argument("--out", default=str(RESULTS / "conditioning.json"))
    p.add_argument("--from-log", default=None,
                   help="summarise the run lines printed by an earlier (interrupted) run instead of training; "
                        "seeds missing a model are dropped")
    p.add_argument("--log-command", default=None, help="with --from-log: the command that produced the log")
    args = p.parse_args(argv)
    started = run_metadata(__file__, argv)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    for d in datasets:
        if d not in DATA_OVERRIDES:
            raise SystemExit(f"unknown dataset {d!r}; accepted: {', '.join(DATA_OVERRIDES)}")
    if "mnist" in datasets and not Path(args.mnist_root).exists():
        print(f"skipping mnist: {args.mnist_root} not found", flush=True)
        datasets.remove("mnist")
    if args.from_log:
        # aggregate the per-run JSON lines of an earlier (possibly interrupted) run of this script
        with open(args.from_log) as fh:
            rows = [json.loads(line) for line in fh if line.startswith("{") and '"kind"' in line]
        args.seeds = sorted({r["seed"] for r in rows})
        complete = [s for s in args.seeds if all(any(r["seed"] == s and r["kind"] == k for r in rows) for k in KINDS)]
        rows = [r for r in rows if r["seed"] in complete]
        args.seeds = complete
    else:
        kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
        rows = [run_one(ds, kind, seed, args) for ds in datasets for seed in args.seeds for kind in kinds]
    summary = summarise(rows)
    out = Path(args.out)
    fig_path = out.with_suffix(".png")
    figure(summary, fig_path)
    result = {
        **started,
        "load_average_end": load_average(),
        "training_command": args.log_command if args.from_log else None,
        "iterations": args.iterations, "seeds": args.seeds, "overrides": args.set,
        "runs": rows, "summary": summary, "figure": str(fig_path),
        "paper_reference": {
            "002 Table 1 CIFAR10 small batch": {"ccnf": {"test_error": 33.09, "bits_per_dim": 3.511, "nfe": 924},
                                                 "infocnf": {"test_error": 21.50, "bits_per_dim": 3.533, "nfe": 985}},
            "002 Table 2 MNIST": {"ccnf": {"test_error": 0.64, "bits_per_dim": 1.016, "nfe": 611},
                                  "infocnf": {"test_error": 0.60, "bits_per_dim": 1.030, "nfe": 589}},
        },
    }
    write_json(out, result)
    print(table(summary, len(args.seeds)))
    print(f"wrote {out} and {fig_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
