"""Fixed vs learned solver tolerances (InfoCNF, Nguyen et al. 2019, §4.4, Tables 1-2, at CPU scale) + the integrate-to-one
curve (InfoCNF §4.2, Figure 2a).

For InfoCNF and the unconditional CNF on scikit-learn's digits, trains with the tolerance fixed
at 1e-5 (``tolerances.policy=fixed``) and learned by gates + REINFORCE (the
``digits-*-learned-tol`` recipes, initialised at 1e-5), over several seeds, through fastcnf's one
trainer. Reports mean forward/backward NFE per training iteration, test NLL (bits/dim, at the
evaluation tolerance 1e-5), test error (InfoCNF), training and wall time. Then trains
``mix1d-infocnf`` briefly and integrates its density at tolerances 1e-8..1e-1.

Writes ``benchmarks/results/tolerances.json`` (command, commit, machine, every run with its
per-iteration NFE and sampled tolerances, means, learned-vs-fixed ratios), the figure
``tolerances_training.png`` (NFE per iteration, fixed vs learned, and the learned tolerance of
each block, means over seeds), ``tolerances_integrate.png`` (InfoCNF, Nguyen et al. 2019, Fig. 2a) and prints Markdown tables.

Example (the run recorded in benchmarks/README.md)::

    PYTHONPATH=src python benchmarks/tolerances.py --iterations 80 --seeds 0 1 2 --threads 1 \
        --set train.batch_size=100 --set eval.max_examples=360
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
from pathlib import Path

from common import RESULTS, ROOT, Timer, mean_std, pyplot, read_log, run_metadata, save_figure, write_json

from fastcnf.methods import load_recipe
from fastcnf.evaluation.integrate import integrate_run
from fastcnf.training.trainer import Trainer

MODELS = {"infocnf": "digits-infocnf-learned-tol", "cnf": "digits-cnf-learned-tol"}
POLICIES = {"fixed": ["tolerances.policy=fixed"], "learned": []}
COLUMNS = ["nfe_forward_mean", "nfe_backward_mean", "test_bits_per_dim", "test_error", "train_seconds",
           "wall_seconds"]


def _mean_std(values) -> tuple[float | None, float | None]:
    """(mean, sample std), the pair this result file stores; (None, None) without values."""
    stats = mean_std(values, ddof=1)
    return (stats["mean"], stats["std"]) if stats else (None, None)


def _curves(log_path: Path) -> dict:
    """Per-iteration NFE (forward + backward) and sampled log10 tolerance per block, from log.csv."""
    rows = read_log(log_path)
    nfe = [float(r["nfe_forward"]) + float(r["nfe_backward"]) for r in rows]
    tols = {c[4:]: [math.log10(float(r[c])) if r[c] not in ("", None) else None for r in rows]
            for c in (rows[0] if rows else {}) if c.startswith("tol.")}
    return {"nfe_total_second_half": statistics.fmean(nfe[len(nfe) // 2:]) if nfe else None,
            "curve": {"nfe_total": nfe, "log10_tol": tols}}


def _figure(runs: list, models: list, path: Path) -> None:
    import numpy as np

    fig, axes = pyplot().subplots(2, len(models), figsize=(5 * len(models), 6.5), squeeze=False)
    for m, model in enumerate(models):
        ax = axes[0, m]
        for policy, colour in (("fixed", "tab:blue"), ("learned", "tab:orange")):
            curves = [r["curve"]["nfe_total"] for r in runs if r["model"] == model and r["policy"] == policy]
            if curves:
                n = min(len(c) for c in curves)
                a = np.array([c[:n] for c in curves])
                it = np.arange(1, n + 1)
                ax.plot(it, a.mean(0), color=colour, label=f"{policy} (mean of {len(curves)} seeds)")
                ax.fill_between(it, a.min(0), a.max(0), color=colour, alpha=0.2)
        ax.set_title(f"{model}: NFE (fwd + bwd, all blocks) per iteration")
        ax.set_xlabel("iteration")
        ax.legend(fontsize=8)
        ax = axes[1, m]
        learned = [r for r in runs if r["model"] == model and r["policy"] == "learned"]
        for block in (learned[0]["curve"]["log10_tol"] if learned else {}):
            curves = [r["curve"]["log10_tol"][block] for r in learned]
            n = min(len(c) for c in curves)
            a = np.array([[np.nan if v is None else v for v in c[:n]] for c in curves])
            ax.plot(np.arange(1, n + 1), np.nanmean(a, 0), lw=1, label=block)
        ax.axhline(-5, color="k", ls=":", lw=0.8, label="fixed 1e-5")
        ax.set_title(f"{model}: sampled log10 tolerance (learned, mean over seeds)")
        ax.set_xlabel("iteration")
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="infocnf,cnf")
    p.add_argument("--iterations", type=int, default=80)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mix1d-iterations", type=int, default=150)
    p.add_argument("--set", action="append", default=[], help="extra KEY=VALUE overrides for every run")
    p.add_argument("--work", default=str(ROOT / "benchmarks" / "_work" / "tolerances"))
    p.add_argument("--out", default=str(RESULTS / "tolerances.json"))
    args = p.parse_args(argv)
    started = run_metadata(__file__, argv)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    runs = []
    common = [f"train.iterations={args.iterations}", f"threads={args.threads}", "train.checkpoint_every=0",
              "train.log_every=10"] + args.set
    for model in args.models.split(","):
        for policy, extra in POLICIES.items():
            for seed in args.seeds:
                cfg = load_recipe(MODELS[model], common + extra + [f"seed={seed}"])
                out = work / f"{model}-{policy}-{seed}"
                with Timer() as timer:
                    metrics = Trainer(cfg, out, quiet=True, progress=False).fit()
                row = {"model": model, "policy": policy, "seed": seed, "wall_seconds": timer.wall,
                       **{k: metrics.get(k) for k in COLUMNS if k != "wall_seconds"},
                       "tolerances": metrics.get("tolerances"), **_curves(out / "log.csv")}
                runs.append(row)
                print(json.dumps({k: v for k, v in row.items() if k not in ("tolerances", "curve")}), flush=True)
    summary = {}
    for model in args.models.split(","):
        for policy in POLICIES:
            sel = [r for r in runs if r["model"] == model and r["policy"] == policy]
            summary[f"{model}/{policy}"] = {k: _mean_std([r[k] for r in sel]) for k in COLUMNS}
        fixed, learned = summary[f"{model}/fixed"], summary[f"{model}/learned"]
        nfe_f = fixed["nfe_forward_mean"][0] + fixed["nfe_backward_mean"][0]
        nfe_l = learned["nfe_forward_mean"][0] + learned["nfe_backward_mean"][0]
        half = {p: statistics.fmean(r["nfe_total_second_half"] for r in runs
                                    if r["model"] == model and r["policy"] == p) for p in POLICIES}
        summary[f"{model}/learned_vs_fixed"] = {
            "nfe_reduction": 1 - nfe_l / nfe_f,
            "nfe_reduction_second_half": 1 - half["learned"] / half["fixed"],
            "nll_change_relative": learned["test_bits_per_dim"][0] / fixed["test_bits_per_dim"][0] - 1,
        }
    _figure(runs, args.models.split(","), Path(args.out).with_name("tolerances_training.png"))
    # integrate-to-one (InfoCNF, Nguyen et al. 2019, Fig. 2a)
    cfg = load_recipe("mix1d-infocnf", [f"train.iterations={args.mix1d_iterations}", f"threads={args.threads}",
                                        "train.checkpoint_every=0"])
    trainer = Trainer(cfg, work / "mix1d-infocnf", quiet=True, progress=False)
    mix_metrics = trainer.fit()
    integral = integrate_run(trainer.model, trainer.bundle, trainer.out_dir)
    shutil.copy(work / "mix1d-infocnf" / "figures" / "integrate.png", Path(args.out).with_name("tolerances_integrate.png"))
    result = {
        **started,
        "runs": runs,
        "summary": summary,
        "integrate": {"recipe": "mix1d-infocnf", "iterations": args.mix1d_iterations,
                      "test_nll_nats": mix_metrics.get("test_nll_nats"), **integral},
    }
    write_json(args.out, result)
    print("\n| model | tolerance | NFE fwd | NFE bwd | test bits/dim | test error | train s | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for key, s in summary.items():
        if key.endswith("learned_vs_fixed"):
            continue
        cells = [f"{s[k][0]:.4g} ± {s[k][1]:.2g}" if s[k][0] is not None else "-" for k in COLUMNS]
        print(f"| {key.split('/')[0]} | {key.split('/')[1]} | " + " | ".join(cells) + " |")
    for key, s in summary.items():
        if key.endswith("learned_vs_fixed"):
            print(f"{key}: NFE reduction {100 * s['nfe_reduction']:.1f}% "
                  f"(second half of training {100 * s['nfe_reduction_second_half']:.1f}%), "
                  f"NLL change {100 * s['nll_change_relative']:+.2f}%")
    print("\n| tolerance | integral | abs error | NFE |\n|---|---|---|---|")
    for k, r in integral["results"].items():
        print(f"| {k} | {r['integral']:.6f} | {r['abs_error']:.2e} | {r['nfe_forward']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
