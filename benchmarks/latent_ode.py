"""LatentODE vs partitioned LatentODE on the bi-directional spirals (InfoCNF, Nguyen et al. 2019, §4.6, Figure 6).

Trains the recipes ``spirals-latentode`` and ``spirals-latentode-partitioned`` through the one
trainer for several seeds and reports, per model, the mean and standard deviation over seeds of
the test reconstruction MSE, extrapolation MSE (both against the noise-free spirals), direction
accuracy, negative ELBO, the training NFE (forward/backward per step) and the wall time. InfoCNF
claims the partitioned latent fits and extrapolates better.

Usage (from the repository root; ~10-15 min on 2 shared CPU cores with the defaults)::

    PYTHONPATH=src python benchmarks/latent_ode.py [--iterations 600] [--seeds 0 1 2]

Outputs: ``benchmarks/results/latent_ode.json`` (command, commit, machine, every run) and
``benchmarks/results/latent_ode_trajectories.png`` (seed 0: baseline top row, partitioned bottom
row, the same test spirals; solid = reconstruction of the observed window, dashed = extrapolation).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import Timer, mean_std, pyplot, run_metadata, save_figure, write_json

from fastcnf.methods import load_recipe
from fastcnf.training.trainer import Trainer

RECIPES = {"latentode": "spirals-latentode", "partitioned": "spirals-latentode-partitioned"}
METRICS = ["reconstruction_mse", "extrapolation_mse", "direction_accuracy", "direction_accuracy_probe",
           "test_nll_nats", "nfe_forward_mean", "nfe_backward_mean", "eval_nfe_forward", "wall_seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=600)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--work", default="benchmarks/_work/latent_ode")
    p.add_argument("--out", default="benchmarks/results/latent_ode.json")
    args = p.parse_args()
    started = run_metadata(__file__)

    runs: list[dict] = []
    trainers: dict[str, Trainer] = {}
    for seed in args.seeds:
        for variant, recipe in RECIPES.items():
            cfg = load_recipe(recipe, [f"seed={seed}", f"train.iterations={args.iterations}",
                                       f"data.n_train={args.n_train}", f"data.n_test={args.n_test}",
                                       "train.checkpoint_every=0"])
            with Timer() as timer:
                trainer = Trainer(cfg, Path(args.work) / f"{variant}-seed{seed}", quiet=True, progress=False)
                m = trainer.fit()
            m["wall_seconds"] = timer.wall
            runs.append({"variant": variant, "recipe": recipe, "seed": seed,
                         **{k: m.get(k) for k in METRICS}})
            print(f"{variant:12s} seed {seed}: " + ", ".join(
                f"{k}={m[k]:.4g}" for k in METRICS if isinstance(m.get(k), (int, float))), flush=True)
            if seed == args.seeds[0]:
                trainers[variant] = trainer

    summary: dict[str, dict] = {}
    for variant in RECIPES:
        rows = [r for r in runs if r["variant"] == variant]
        summary[variant] = {}
        for k in METRICS:
            stats = mean_std((r[k] for r in rows if isinstance(r[k], (int, float))), ddof=1)
            if stats:
                summary[variant][k] = stats
    print("\n| model | recon MSE | extrap MSE | direction acc | -ELBO (nats) | NFE fwd/bwd | wall s |")
    print("|---|---|---|---|---|---|---|")
    for variant, s in summary.items():
        f = lambda k, d=4: f"{s[k]['mean']:.{d}g} ± {s[k]['std']:.2g}"  # noqa: E731
        print(f"| {variant} | {f('reconstruction_mse')} | {f('extrapolation_mse')} | "
              f"{f('direction_accuracy')} | {f('test_nll_nats', 6)} | "
              f"{s['nfe_forward_mean']['mean']:.1f}/{s['nfe_backward_mean']['mean']:.1f} | {f('wall_seconds', 3)} |")
    paired = [(b["extrapolation_mse"], q["extrapolation_mse"]) for b in runs if b["variant"] == "latentode"
              for q in runs if q["variant"] == "partitioned" and q["seed"] == b["seed"]]
    better = sum(q < b for b, q in paired)
    print(f"\npartitioned extrapolation MSE lower than the baseline's in {better}/{len(paired)} seeds")

    out = Path(args.out)
    fig_path = out.with_name("latent_ode_trajectories.png")
    _figure(trainers, fig_path)
    result = {
        **started,
        "iterations": args.iterations, "seeds": args.seeds, "n_train": args.n_train, "n_test": args.n_test,
        "summary": summary, "runs": runs,
        "partitioned_better_extrapolation_seeds": f"{better}/{len(paired)}",
        "figure": str(fig_path),
    }
    write_json(out, result)
    print(f"wrote {out} and {fig_path}")


def _figure(trainers: dict[str, Trainer], path: Path) -> None:
    from fastcnf.evaluation.plots import plot_trajectories

    if len(trainers) < 2:
        return
    k = min(t.cfg.latent_ode.n_figure for t in trainers.values())
    fig, axes = pyplot().subplots(2, k, figsize=(2.4 * k, 5.0), squeeze=False)
    for row, (variant, trainer) in enumerate(trainers.items()):
        task = trainer.task
        x_pred, _ = task.figure_trajectories(trainer.model, trainer.device, trainer.dtype)
        test = task.bundle.test
        plot_trajectories(test.x[:k][:, task.steps], test.y[:k], x_pred[:k], task.n_observed, axes=axes[row])
        axes[row][0].set_ylabel("(a) LatentODE" if variant == "latentode" else "(b) partitioned", fontsize=8)
    fig.suptitle("Trajectories learned without (top) and with (bottom) the partitioned latent (InfoCNF, Nguyen et al. 2019, Fig. 6)",
                 fontsize=9)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
