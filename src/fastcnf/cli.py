"""Command line: ``fastcnf recipes | train | eval | sample | score | reflow | distill``.

Errors a user can fix (unknown recipe or key, malformed value, missing data, corrupt
checkpoint, NaN in data) print one line on stderr and exit with code 2; ``--debug`` shows the
traceback instead.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["main", "COMMANDS"]

#: fastcnf.ode.fixed_step.EVALUATIONS_PER_STEP's methods (spelt out: the parser imports no torch)
_FIXED_STEP_METHODS = ("euler", "midpoint", "heun", "rk4")


def _user_errors() -> tuple[type[BaseException], ...]:
    from fastcnf.config import ConfigError
    from fastcnf.data.base import DataError
    from fastcnf.models.flow_model import InputError
    from fastcnf.ode.solve import SolverBudgetExceeded
    from fastcnf.training.checkpoint import CheckpointError
    from fastcnf.training.runlock import RunLocked
    from fastcnf.training.trainer import TrainingDiverged

    return (ConfigError, DataError, InputError, CheckpointError, TrainingDiverged, SolverBudgetExceeded,
            RunLocked, FileNotFoundError, ValueError)


def _load_run(run_dir: str, overrides: list[str]):
    """``(cfg, bundle, task, model)`` of a run with its data (see ``restore_run``)."""
    from fastcnf.training.trained_run import restore_run

    return restore_run(run_dir, overrides)


def cmd_recipes(args) -> int:
    from fastcnf.config import list_recipes

    recipes = list_recipes()
    width = max(len(n) for n in recipes) if recipes else 0
    for name, desc in recipes.items():
        print(f"{name:<{width}}  {desc}")
    return 0


def _print_metrics(metrics: dict, out_dir: Path) -> None:
    keys = ["test_nll_nats", "test_bits_per_dim", "test_error", "sample_accuracy", "nfe_forward_mean",
            "nfe_backward_mean", "train_seconds", "iterations"]
    parts = []
    for k in keys:
        v = metrics.get(k)
        if v is None:
            continue
        parts.append(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}")
    print("metrics: " + ", ".join(parts))
    print(f"run directory: {out_dir}  (metrics.json, log.csv, figures/, checkpoints/)")


def cmd_train(args) -> int:
    import yaml

    from fastcnf.config import config_to_dict
    from fastcnf.methods import load_recipe
    from fastcnf.training.trainer import Trainer

    bare = [item for item in args.set if "=" not in item]
    if not args.recipe and not args.resume and len(bare) == 1:  # `train --set k=v RECIPE`
        args.recipe = bare[0]
        args.set.remove(bare[0])
    if args.resume:
        if args.recipe:
            raise ValueError("give either a RECIPE or --resume DIR, not both")
        trainer = Trainer.from_run_dir(args.resume, args.set, resume=True, quiet=args.quiet)
        out_dir = Path(args.resume)
    else:
        if not args.recipe:
            raise ValueError("missing RECIPE (see `fastcnf recipes`) or --resume DIR")
        cfg = load_recipe(args.recipe, args.set)
        if args.show:
            print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
            return 0
        out_dir = Path(args.out) if args.out else Path("runs") / f"{args.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
        # under torchrun every rank must use rank 0's run directory (its timestamp)
        from fastcnf.training import distributed as ddp

        if ddp.init_distributed(cfg).enabled:
            out_dir = Path(ddp.broadcast_object(str(out_dir)))
        from fastcnf.training.runlock import refuse_if_locked

        refuse_if_locked(out_dir)  # a run writing there now is named before "already holds a run"
        if (out_dir / "checkpoints" / "last.pt").exists() and not args.force:
            raise ValueError(f"{out_dir} already holds a run; use `fastcnf train --resume {out_dir}` "
                             "to continue it, or --force to start over")
        trainer = Trainer(cfg, out_dir, quiet=args.quiet)
    try:
        metrics = trainer.fit()
    finally:
        from fastcnf.training.distributed import leave_at_exit

        leave_at_exit()  # torchrun's ranks meet once more; the process exit closes the group (run())
    if getattr(trainer, "is_main", True):
        _print_metrics(metrics, out_dir)
    return 0


def cmd_eval(args) -> int:
    from fastcnf.ode.budget import SolveBudget
    from fastcnf.training.runlog import write_metrics

    cfg, bundle, task, model = _load_run(args.run_dir, args.set)
    dtype = next(model.parameters()).dtype
    if args.steps is not None:  # a fixed-step solver: its figures go under their own key
        from fastcnf.ode.fixed_step import fixed_steps

        with fixed_steps(model, args.method, args.steps), SolveBudget(cfg.eval.max_seconds, "evaluation"):
            fixed = task.evaluate(model, cfg.device, dtype)
        fixed.pop("eval_tol", None)  # no tolerance: the solver is the fixed-step method
        path = Path(args.run_dir) / "metrics.json"
        earlier = json.loads(path.read_text()).get("fixed_steps", {}) if path.exists() else {}
        write_metrics(args.run_dir, {"fixed_steps": {**earlier, f"{args.method}-{args.steps}": fixed}}, merge=True)
        print(json.dumps({"method": args.method, "steps": args.steps, **fixed}, indent=2))
        return 0
    with SolveBudget(cfg.eval.max_seconds, "evaluation"):  # wall-time cap (eval.max_seconds) and progress
        metrics = task.evaluate(model, cfg.device, dtype)
    if args.integrate:
        from fastcnf.evaluation.integrate import integrate_run

        with SolveBudget(cfg.eval.max_seconds, "integration"):
            metrics["integrate"] = integrate_run(model, bundle, args.run_dir)
    metrics = write_metrics(args.run_dir, metrics, merge=True)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}, indent=2))
    return 0


def _class_number(label: str, names: list[str] | None) -> int:
    """``--label``: a class number, or a class name of the run (its number in ``names``)."""
    if names and label in names:
        return names.index(label)
    try:
        return int(label)
    except ValueError:
        raise ValueError(f"--label {label!r} is not a class of this run"
                         + (f" ({', '.join(names)})" if names else ": give the class number")) from None


def cmd_sample(args) -> int:
    import numpy as np
    import torch

    from fastcnf.evaluation.plots import plot_samples

    out = Path(args.out)
    if out.suffix not in (".png", ".npy", ".csv"):
        raise ValueError(f"--out must end in .png (a picture), .npy (the raw samples) or .csv (rows of a table or "
                         f"of points), got {out.name!r}")
    if args.n <= 0:
        raise ValueError(f"--n must be positive, got {args.n}")
    cfg, bundle, task, model = _load_run(args.run_dir, args.set)
    if not hasattr(model, "prior") or not hasattr(model, "sample"):
        raise ValueError(f"`fastcnf sample` draws from density models; {args.run_dir} holds a "
                         f"{cfg.task!r} run (see its figures/ for trajectories)")
    if out.suffix == ".csv" and bundle.is_image:
        raise ValueError(f"--out {out.name}: a CSV holds rows of a table or of points; write images to .png or .npy")
    y = None
    if args.label is not None:
        if not getattr(model.prior, "conditional", False):
            raise ValueError("--label needs a class-conditional model (a CCNF / InfoCNF recipe)")
        label = _class_number(args.label, bundle.class_names)
        if not 0 <= label < model.prior.num_classes:
            raise ValueError(f"--label must be in 0..{model.prior.num_classes - 1}, got {args.label}")
        y = torch.full((args.n,), label, dtype=torch.long)
    from fastcnf.ode.budget import SolveBudget

    torch.manual_seed(args.seed)
    with SolveBudget(cfg.eval.max_seconds, "sampling"):  # wall-time cap (eval.max_seconds) and progress
        x = model.sample(args.n, y, steps=args.steps, method=args.method).float().cpu()
    nfe = model.nfe_last()[0]
    if bundle.standardizer is not None:  # tables: back in the data's own units
        x = bundle.standardizer.inverse(x)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, x.numpy())  # (N, *data shape), in the data's own scale ([0, 1) pixels for images)
    elif out.suffix == ".csv":  # a header of the table's column names (x0, x1, ... for points), 17 digits
        from fastcnf.data.table import write_csv

        write_csv(out, x.numpy(), getattr(bundle, "columns", None) or [f"x{j}" for j in range(x.shape[1])])
    else:
        plot_samples(x, out, bundle.is_image, nrow=min(args.n, 10),
                     title=None if y is None else f"label {args.label}")
    solver = "adaptive" if args.steps is None else f"{args.method}, {args.steps} step{'s' if args.steps > 1 else ''}"
    print(f"wrote {args.n} samples to {out} ({solver}: {nfe} function evaluations)")
    return 0


def cmd_score(args) -> int:
    from fastcnf.training.trained_run import score_command

    return score_command(args.run_dir, args.data, args.out, args.batch_size, args.probes, args.trace, args.set,
                         progress=not args.quiet, error_control=args.error_control, check_rows=args.check_rows,
                         steps=args.steps, method=args.method)



def cmd_reflow(args, grid_steps: int = 0) -> int:
    from fastcnf.pipelines.reflow import reflow_run

    # the teacher keeps its own configuration; only where and how fast it runs follows --set
    _, _, _, teacher = _load_run(args.run_dir, [s for s in args.set if s.split("=")[0] in ("threads", "device")])
    if not hasattr(teacher, "prior") or not hasattr(teacher, "sample"):
        raise ValueError(f"reflow draws pairs from density models; {args.run_dir} holds another kind of run")
    metrics = reflow_run(teacher, args.run_dir, args.out, args.pairs, args.recipe, args.set, grid_steps,
                         args.teacher_method if args.teacher_steps else None, args.teacher_steps,
                         args.chunk_size, args.seed, args.quiet)
    _print_metrics(metrics, Path(args.out))
    return 0


def cmd_distill(args) -> int:
    from fastcnf.ode.fixed_step import check_fixed_step

    check_fixed_step("euler", args.steps)
    return cmd_reflow(args, grid_steps=args.steps)


COMMANDS = {"recipes": cmd_recipes, "train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "score": cmd_score,
            "reflow": cmd_reflow, "distill": cmd_distill}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastcnf", description="Train continuous normalizing flows fast.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("recipes", help="list recipe names")
    t = sub.add_parser("train", help="train a recipe (or resume a run)")
    t.add_argument("recipe", nargs="?", help="recipe name (see `fastcnf recipes`)")
    t.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override configuration values (dotted keys, e.g. --set train.lr=1e-3 "
                        "train.iterations=200); repeatable")
    t.add_argument("--out", help="run directory (default runs/RECIPE-TIMESTAMP)")
    t.add_argument("--show", action="store_true", help="print the resolved configuration and exit")
    t.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR")
    t.add_argument("--quiet", action="store_true", help="log lines instead of a progress bar")
    t.add_argument("--force", action="store_true", help="start over in a directory that holds a run")
    t.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    e = sub.add_parser("eval", help="re-evaluate a run (e.g. at another tolerance)")
    e.add_argument("run_dir")
    e.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    e.add_argument("--integrate", action="store_true",
                   help="1-D/2-D models: integrate the density over a grid at tolerances 1e-8..1e-1")
    _fixed_step_flags(e)
    e.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    s = sub.add_parser("sample", help="draw samples from a trained run")
    s.add_argument("run_dir")
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--label", default=None,
                   help="class (conditional models): its number, or its name (an image folder's sub-folder, a "
                        "table's label name)")
    s.add_argument("--out", required=True, help="samples.png (a picture), samples.npy (raw samples, shape "
                                               "(N, *data shape), in the data's scale) or samples.csv (tables "
                                               "and points: a row per sample under the column names)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    _fixed_step_flags(s)
    s.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    c = sub.add_parser("score", help="log-density of every row of a file (or image of a folder) under a run")
    c.add_argument("run_dir")
    c.add_argument("--data", required=True, help="a table (.npy/.npz/.csv/.tsv/.txt) with the training data's "
                                                "columns, or a folder of images of the run's size")
    c.add_argument("--out", required=True,
                   help="scores.npy: log p per row, nats in the data's own units (beside it: _stderr.npy with "
                        "Hutchinson, _bits_per_dim.npy for images); or scores.csv: one file, columns "
                        "log_prob[,stderr][,bits_per_dim]")
    c.add_argument("--batch-size", type=int, default=None, help="rows per solve (default: the run's eval.batch_size, at most 2000)")
    c.add_argument("--probes", type=int, default=8, help="Hutchinson probes per row when the trace is estimated")
    c.add_argument("--trace", choices=("auto", "exact", "hutchinson"), default="auto",
                   help="auto: exact trace up to 64 dimensions, else Hutchinson")
    c.add_argument("--error-control", choices=("rows", "batch"), default="rows",
                   help="rows: every row with its own error control and step size (torchode's scheme); "
                        "batch: one step size per batch, as eval")
    c.add_argument("--check-rows", type=int, default=1000, metavar="K",
                   help="score K random rows again at 10x tighter tolerances and report the largest difference "
                        "(exact trace on tables; written to <stem>_check.json; 0: off)")
    c.add_argument("--steps", type=int, default=None, metavar="N",
                   help="solve with N equal steps of --method instead of the adaptive solver (N x stages "
                        "evaluations per row, no error control; the accuracy is the --check-rows comparison with "
                        "the adaptive solve: on a 6-column tabular run rk4 with 16 steps was within 0.005 nats at "
                        "0.8x the adaptive cost, with 6 steps about 3x faster but 0.2 nats off)")
    c.add_argument("--method", default="rk4", choices=_FIXED_STEP_METHODS, help="fixed-step method of --steps "
                                                                              "(default rk4)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override the run's configuration (e.g. eval.atol=1e-3 eval.rtol=1e-3)")
    c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    r = sub.add_parser("reflow", help="rectified flow: train a flow-matching model on a run's own (noise, sample) "
                                      "pairs (Liu et al. 2023)")
    d = sub.add_parser("distill", help="distil a run into a k-step Euler sampler from its (noise, endpoint) "
                                       "pairs (Liu et al. 2023, §2.3)")
    d.add_argument("--steps", type=int, required=True, help="k, the Euler steps of the distilled sampler")
    for q in (r, d):
        q.add_argument("run_dir", help="the teacher run")
        q.add_argument("--out", required=True, help="the new run directory (a rerun continues it)")
        q.add_argument("--pairs", type=int, default=5000, help="number of (noise, sample) pairs (default 5000)")
        q.add_argument("--recipe", default=None, help="the retraining stage's recipe (e.g. toy-reflow; default: "
                                                      "the teacher's configuration)")
        q.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
        q.add_argument("--seed", type=int, default=None, help="seed of the pairs (default: the run's seed)")
        q.add_argument("--chunk-size", type=int, default=1000, help="pairs per chunk (progress, resumption)")
        q.add_argument("--teacher-steps", type=int, default=None,
                       help="decode the teacher with this many fixed steps (default: its evaluation solver)")
        q.add_argument("--teacher-method", default="euler", choices=_FIXED_STEP_METHODS)
        q.add_argument("--quiet", action="store_true", help="log lines instead of progress bars")
        q.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def _fixed_step_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=None,
                   help="solve with this many fixed steps of --method (default: the run's adaptive solver)")
    p.add_argument("--method", default="euler", choices=_FIXED_STEP_METHODS,
                   help="fixed-step method of --steps (default euler)")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"fastcnf: {category.__name__}: {message}\n"


def _stdout_to_devnull() -> None:
    """Point standard output's descriptor at the null device, so the interpreter's last flush of what
    is still buffered does not fail again on the closed pipe."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real descriptor (captured output)
        pass


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.formatwarning = _one_line_warning
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # `fastcnf recipes | head`: the reader has gone; stop quietly, as Unix tools do
        _stdout_to_devnull()
        return 141  # 128 + SIGPIPE, the status of a process the signal ended
    except KeyboardInterrupt as e:  # Ctrl-C 130; after a checkpoint on SIGTERM 143, SIGUSR1 138
        msg = str(e) or "interrupted"
        print(f"fastcnf: {msg}", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except Exception as e:  # noqa: BLE001 - one clear line for user errors
        if args.debug or not isinstance(e, _user_errors()):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"fastcnf: error: {msg}", file=sys.stderr)
        return 2


def run() -> None:
    """The ``fastcnf`` command: :func:`main`, then the process's exit (under torchrun without
    destroying the process group: :func:`fastcnf.training.distributed.exit_process`)."""
    from fastcnf.training.distributed import exit_process

    exit_process(main())


if __name__ == "__main__":  # pragma: no cover
    run()
