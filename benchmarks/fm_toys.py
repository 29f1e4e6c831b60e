"""Flow matching vs maximum likelihood on the toys: wall time to FFJORD's test NLL, and sampling NFE.

References: Flow Matching (Lipman et al. 2023), OT-CFM / I-CFM (Tong et al. 2024), FFJORD
(Grathwohl et al. 2019); see docs/bibliography.md. The digits and torchcfm experiments are
``fm_digits.py`` and ``fm_torchcfm.py``; the three share ``results/flow_matching.json``.

For each toy (8gaussians, checkerboard) and seed:

1. **baseline**: ``benchmarks/ffjord_baseline.py`` (FFJORD's ``train_toy.py``, maximum likelihood)
   for ``--baseline-iterations`` (default 1,000, as FFJORD's baseline in ``speed_toy.py``)
   iterations, evaluated on fastcnf's test split; its wall time runs from process
   launch until its result file is written (training + final test NLL). Its test NLL is the **target**.
2. **fastcnf runs**, each in its own process (``cfm``: recipe ``toy-fm``, independent CFM;
   ``otcfm``: ``toy-otcfm``, exact minibatch-OT pairs; ``likelihood``: ``toy-ffjord``, fastcnf's own
   maximum-likelihood training), all with FFJORD's toy network: trained with the test NLL evaluated
   every ``--eval-every`` iterations (at the evaluation tolerance, dopri5 1e-5) until it is at most
   the target or ``--max-iterations`` is reached. Reported: ``wall_to_target_seconds``, from process
   launch to the end of the evaluation that first crossed the target (every monitoring evaluation
   included), and ``wall_to_target_excluding_monitoring_seconds``, the same less the earlier
   monitoring evaluations (what a run that stopped there and evaluated once would take); each
   divided by the baseline's wall time (target: at most 0.1).
3. **sampling NFE**: at the iteration where each run stopped (the target NLL, i.e. equal quality,
   or ``--max-iterations``), ``model.sample(--nfe-samples)`` in eval mode (the evaluation
   tolerance) and the model's ``nfe_record()``; the OT-CFM / CFM ratio per toy (target: at most 0.7).

Writes the section ``toys`` of ``benchmarks/results/flow_matching.json`` (``--out``; the file's
other sections are kept, and so are earlier toy runs not rerun now), with the command, commit and
machine of this invocation, and prints a Markdown table and the verdicts. One torch thread per
process. The targets are 3 seeds and a 1,000-iteration baseline; a smaller run says so in ``note``.

    python benchmarks/fm_toys.py [--data 8gaussians checkerboard] [--seeds 0 1 2]
        [--baseline-iterations 1000] [--eval-every 50] [--max-iterations 3000] [--test-size N]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import (FLOW_MATCHING_DESCRIPTION, FLOW_MATCHING_JSON, add_section_arguments, fmt, load_average, mean_std,
                    merge_earlier_runs, run_metadata, run_section, run_worker)

METHODS = {"cfm": "toy-fm", "otcfm": "toy-otcfm", "likelihood": "toy-ffjord"}
TARGETS = {"wall_time_fraction": 0.1, "otcfm_sampling_nfe_ratio": 0.7}
ABOUT = "wall time to the FFJORD baseline's NLL and sampling NFE"


def toy_worker(spec: dict) -> dict:
    """Train ``spec["recipe"]`` until its test NLL <= ``spec["target"]``; return the evaluations
    (wall-clock times, ``time.time()``) and the sampling NFE."""
    import torch

    from fastcnf.methods import load_recipe
    from fastcnf.training.trainer import Trainer

    torch.set_num_threads(1)
    cfg = load_recipe(spec["recipe"], overrides=spec["overrides"])
    trainer = Trainer(cfg, spec["out_dir"], quiet=True, progress=False)
    ready = time.time()
    evals = []
    reached = None
    train_seconds = 0.0
    while trainer.iteration < spec["max_iterations"]:
        t0 = time.perf_counter()
        trainer.train_step()
        train_seconds += time.perf_counter() - t0
        trainer.iteration += 1
        if trainer.iteration % spec["eval_every"] == 0 or trainer.iteration == spec["max_iterations"]:
            start = time.time()
            nll = trainer.evaluate()["test_nll_nats"]
            evals.append({"iteration": trainer.iteration, "test_nll_nats": nll, "train_seconds": train_seconds,
                          "eval_start": start, "eval_end": time.time()})
            if nll is not None and nll <= spec["target"]:
                reached = trainer.iteration
                break
    model = trainer.model
    model.eval()
    torch.manual_seed(spec["seed"] + 7)
    t0 = time.perf_counter()
    model.sample(spec["nfe_samples"])
    sample_seconds = time.perf_counter() - t0
    nfe = model.nfe_last()[0]
    record = model.nfe_record()
    return {"ready": ready, "evals": evals, "reached_at_iteration": reached, "iterations": trainer.iteration,
            "train_seconds": train_seconds, "sampling_nfe": nfe, "sampling_nfe_record": record,
            "sampling_seconds": sample_seconds, "eval_tolerance": [cfg.eval.atol, cfg.eval.rtol],
            "threads": torch.get_num_threads()}


def run_method(method: str, data: str, seed: int, target: float, args, work: Path) -> dict:
    """One fastcnf run in its own process (:func:`toy_worker`) and its times from launch."""
    tag = f"{method}-{data}-seed{seed}"
    overrides = [f"data.name={data}", f"seed={seed}", "threads=1", "train.checkpoint_every=0",
                 f"train.iterations={args.max_iterations}", *args.set]
    spec = {"tag": tag, "recipe": METHODS[method], "overrides": overrides, "out_dir": str(work / tag),
            "target": target, "max_iterations": args.max_iterations, "eval_every": args.eval_every, "seed": seed,
            "nfe_samples": args.nfe_samples, "result": str(work / f"{tag}.result.json")}
    r, launched, ended = run_worker(__file__, spec, work)
    evals = r["evals"]
    out = {"recipe": METHODS[method], "overrides": overrides, "reached_at_iteration": r["reached_at_iteration"],
           "iterations": r["iterations"], "train_seconds": r["train_seconds"],
           "startup_seconds": r["ready"] - launched, "process_seconds": ended - launched,
           "final_test_nll_nats": evals[-1]["test_nll_nats"] if evals else None,
           "sampling_nfe": r["sampling_nfe"], "sampling_nfe_record": r["sampling_nfe_record"],
           "sampling_seconds": r["sampling_seconds"], "nfe_samples": args.nfe_samples,
           "eval_tolerance": r["eval_tolerance"], "threads": r["threads"],
           "curve": [{"iteration": e["iteration"], "test_nll_nats": e["test_nll_nats"],
                      "train_seconds": e["train_seconds"], "wall_seconds": e["eval_end"] - launched,
                      "eval_seconds": e["eval_end"] - e["eval_start"]} for e in evals]}
    if r["reached_at_iteration"] is not None:
        hit = evals[-1]
        monitoring = sum(e["eval_end"] - e["eval_start"] for e in evals[:-1])
        out["wall_to_target_seconds"] = hit["eval_end"] - launched
        out["wall_to_target_excluding_monitoring_seconds"] = hit["eval_end"] - launched - monitoring
    else:
        out["wall_to_target_seconds"] = out["wall_to_target_excluding_monitoring_seconds"] = None
    return out


def run_toys(args, argv: list[str] | None, earlier: dict | None, work: Path, save) -> dict:
    """The toy runs, one process after another (``earlier``: the section as last written, whose
    runs not rerun are kept); ``save(section)`` after each toy and seed."""
    from speed_toy import run_baseline, write_test_split

    section: dict = {**run_metadata(__file__, argv), "load_average_start": load_average(),
                     "settings": {k: getattr(args, k) for k in ("data", "seeds", "methods", "baseline_iterations",
                                                                "eval_every", "max_iterations", "test_size",
                                                                "nfe_samples", "set")},
                     "targets": TARGETS, "runs": {}}
    merge_earlier_runs(section, earlier, {f"{d}/seed{s}" for d in args.data for s in args.seeds})
    reduced = []
    if args.baseline_iterations != 1000:
        reduced.append(f"the baseline ran {args.baseline_iterations} iterations (the target is set by a 1,000-"
                       f"iteration baseline), so the target NLL is that of a {args.baseline_iterations}-iteration "
                       "baseline")
    seeds_present = {k.split("/seed")[1] for k in section["runs"]} | {str(s) for s in args.seeds}
    if len(seeds_present) < 3:
        reduced.append(f"{len(seeds_present)} seed(s) (the target is 3 seeds)")
    if args.test_size:
        reduced.append(f"{args.test_size} test points (the data set's default is 20,000)")
    if reduced:
        section["note"] = "reduced size: " + "; ".join(reduced)
    toy_set = [f"data.n_test={args.test_size}", *args.set] if args.test_size else list(args.set)
    targs = argparse.Namespace(**{**vars(args), "set": toy_set})
    for data in args.data:
        for seed in args.seeds:
            key = f"{data}/seed{seed}"
            test_file = work / f"test-{data}-seed{seed}.npy"
            n_test = write_test_split(data, seed, ["threads=1", *toy_set], test_file)
            base = run_baseline(data, args.baseline_iterations, seed, min(100, args.baseline_iterations), test_file,
                                work, threads=1)
            target = base["test_nll_nats"]
            print(f"{key}: baseline {args.baseline_iterations} it, test NLL {target:.4f} on {n_test} points, "
                  f"{base['whole_run_seconds']:.1f} s", flush=True)
            entry = {"test_examples": n_test, "target_nll_nats": target,
                     "baseline": {k: v for k, v in base.items() if k != "reused_from_earlier_run"}, "methods": {}}
            for method in args.methods:
                m = run_method(method, data, seed, target, targs, work)
                for k in ("wall_to_target_seconds", "wall_to_target_excluding_monitoring_seconds"):
                    m[k.replace("_seconds", "_fraction_of_baseline")] = (
                        m[k] / base["whole_run_seconds"] if m[k] is not None else None)
                entry["methods"][method] = m
                print(f"  {method}: reached at {m['reached_at_iteration']} it, wall {m['wall_to_target_seconds']}, "
                      f"sampling NFE {m['sampling_nfe']}", flush=True)
            section["runs"][key] = entry
            save(section)  # partial results survive an interruption
    return section


def toys_summary(section: dict, methods: list[str]) -> dict:
    """Per toy: mean ± std over seeds of the baseline's wall time, the target and each method's
    times to target, their fractions of the baseline and the sampling NFE; OT-CFM / CFM NFE."""
    summary = {}
    datas = sorted({k.split("/seed")[0] for k in section["runs"]})
    for data in datas:
        entries = [e for k, e in sorted(section["runs"].items()) if k.split("/seed")[0] == data]
        s = {"baseline_wall_seconds": mean_std(e["baseline"]["whole_run_seconds"] for e in entries),
             "target_nll_nats": mean_std(e["target_nll_nats"] for e in entries)}
        s["seeds"] = len(entries)
        for method in methods:
            ms = [e["methods"][method] for e in entries if method in e["methods"]]
            s[method] = {k: mean_std(m[k] for m in ms) for k in (
                "wall_to_target_seconds", "wall_to_target_excluding_monitoring_seconds",
                "wall_to_target_fraction_of_baseline", "wall_to_target_excluding_monitoring_fraction_of_baseline",
                "reached_at_iteration", "sampling_nfe")}
            s[method]["reached"] = f"{sum(m['reached_at_iteration'] is not None for m in ms)}/{len(ms)}"
        if "cfm" in methods and "otcfm" in methods:
            ratios = [e["methods"]["otcfm"]["sampling_nfe"] / e["methods"]["cfm"]["sampling_nfe"] for e in entries
                      if "otcfm" in e["methods"] and "cfm" in e["methods"]]
            s["otcfm_vs_cfm_sampling_nfe_ratio"] = mean_std(ratios)
        summary[data] = s
    return summary


def summarize(section: dict) -> None:
    """The section's summary (over the methods of its settings) and table, from its runs."""
    section["summary"] = toys_summary(section, section["settings"]["methods"])
    section["table"] = toys_table(section)


def toys_verdicts(section: dict) -> dict:
    """The targets against the section's summary (means over seeds; lower is better): wall time
    to the baseline's NLL at most 0.1 of the baseline's, OT-CFM / CFM sampling NFE at most 0.7."""
    out = {}
    for data, s in section.get("summary", {}).items():
        for method in ("cfm", "otcfm"):
            f = (s.get(method) or {}).get("wall_to_target_fraction_of_baseline")
            fx = (s.get(method) or {}).get("wall_to_target_excluding_monitoring_fraction_of_baseline")
            out[f"toys/{data}/{method}: wall to baseline NLL / baseline wall <= {TARGETS['wall_time_fraction']}"] = {
                "value": f and f["mean"], "excluding_monitoring": fx and fx["mean"],
                "reached": (s.get(method) or {}).get("reached"),
                "met": bool(f and f["mean"] <= TARGETS["wall_time_fraction"])}
        r = s.get("otcfm_vs_cfm_sampling_nfe_ratio")
        if r:
            limit = TARGETS["otcfm_sampling_nfe_ratio"]
            out[f"toys/{data}: OT-CFM / CFM sampling NFE <= {limit}"] = {"value": r["mean"], "met": r["mean"] <= limit}
    return out


def toys_table(section: dict) -> str:
    iters = section["settings"]["baseline_iterations"]
    lines = ["| data | seed | method | target NLL | reached at it | wall to target s (excl. monitoring) "
             "| fraction of baseline (excl.) | sampling NFE |", "|---|---|---|---|---|---|---|---|"]
    for key, e in section["runs"].items():
        data, seed = key.split("/seed")
        lines.append(f"| {data} | {seed} | FFJORD baseline, {iters} it | {e['target_nll_nats']:.4f} | {iters} | "
                     f"{fmt(e['baseline']['whole_run_seconds'])} | 1 | - |")
        for method, m in e["methods"].items():
            lines.append(f"| {data} | {seed} | {method} ({m['recipe']}) | {fmt(m['final_test_nll_nats'], '.4f')} | "
                         f"{m['reached_at_iteration'] or 'not reached'} | {fmt(m['wall_to_target_seconds'])} "
                         f"({fmt(m['wall_to_target_excluding_monitoring_seconds'])}) | "
                         f"{fmt(m['wall_to_target_fraction_of_baseline'], '.3f')} "
                         f"({fmt(m['wall_to_target_excluding_monitoring_fraction_of_baseline'], '.3f')}) | "
                         f"{m['sampling_nfe']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", default=["8gaussians", "checkerboard"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--baseline-iterations", type=int, default=1000, help="the baseline's iterations (the target)")
    p.add_argument("--eval-every", type=int, default=50, help="fastcnf runs: test NLL every this many iterations")
    p.add_argument("--max-iterations", type=int, default=3000, help="fastcnf runs stop here if never on target")
    p.add_argument("--test-size", type=int, default=0, help="test points (0: the data set's default, 20,000)")
    p.add_argument("--nfe-samples", type=int, default=5000, help="samples drawn for the sampling NFE")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra fastcnf overrides")
    add_section_arguments(p, "toys", FLOW_MATCHING_JSON, "/tmp/fastcnf-bench-flow-matching")
    args = p.parse_args(argv)
    run_section(args, argv, __file__, "toys", ABOUT, description=FLOW_MATCHING_DESCRIPTION, first_part="toys",
                worker=toy_worker, run=lambda earlier, work, save: run_toys(args, argv, earlier, work, save),
                summarize=summarize, verdicts=toys_verdicts)


if __name__ == "__main__":
    main()
