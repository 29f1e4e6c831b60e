"""Flow matching vs maximum likelihood on digits: test bits/dim against wall time.

References: Flow Matching (Lipman et al. 2023), OT-CFM / I-CFM (Tong et al. 2024), FFJORD
(Grathwohl et al. 2019); see docs/bibliography.md. The toy and torchcfm experiments are
``fm_toys.py`` and ``fm_torchcfm.py``; the three share ``results/flow_matching.json``.

Per seed, three processes: ``digits-cnf`` (maximum likelihood, its recipe's 400 iterations, test
bits/dim every ``--cnf-eval-every`` iterations), ``digits-fm`` with independent CFM
(``flow_matching.path=cfm flow_matching.coupling=independent``) and ``digits-fm`` as its recipe
stands (OT-CFM: Lipman's OT path, exact minibatch OT), the flow-matching runs evaluated at
``--fm-eval-at`` iterations until ``--fm-max-seconds`` from launch. Every evaluation is
``Trainer.evaluate()`` on the whole 360-image test split (Hutchinson at the evaluation tolerance;
``--digits-set eval.probes=K`` for K probes and a standard error). The target is digits-cnf's final
test bits/dim; the flow-matching run's first evaluation at or below it gives its wall time from
launch, with and without the earlier monitoring evaluations, and its process CPU time, each over
digits-cnf's (whose time runs to the end of its final evaluation); target: at most 1/4. Up to
``--jobs`` (default 2) processes run at once, so digits-cnf and flow matching share the machine alike.

Writes the section ``digits`` of ``benchmarks/results/flow_matching.json`` (``--out``; the file's
other sections are kept, and so are earlier seeds not rerun now), with the command, commit and
machine of this invocation, and prints a Markdown table and the verdicts. One torch thread per
process. The target is 3 seeds; fewer say so in ``note``.

    python benchmarks/fm_digits.py [--digits-seeds 0 1 2] [--fm-max-seconds 720] [--jobs 2]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import (FLOW_MATCHING_DESCRIPTION, FLOW_MATCHING_JSON, add_section_arguments, fmt, load_average, mean_std,
                    merge_earlier_runs, run_jobs, run_metadata, run_section)

DIGITS = {"cfm": ("digits-fm", ["flow_matching.path=cfm", "flow_matching.coupling=independent"]),
          "otcfm": ("digits-fm", []),  # the recipe's default: Lipman's OT path + exact minibatch OT pairs
          "cnf": ("digits-cnf", [])}
CNF_ITERATIONS, FM_MAX_ITERATIONS = 400, 2000
WALL_FRACTION = 0.25  # the target: flow matching's wall time to the target over digits-cnf's
ABOUT = "test bits/dim against wall time, flow matching vs digits-cnf"


def digits_worker(spec: dict) -> dict:
    """Train ``spec["recipe"]``, evaluating the test bits/dim (``Trainer.evaluate()``) at the
    iterations in ``spec["eval_at"]``; stop after ``max_iterations`` or once the wall time since
    launch passes ``max_seconds`` (at the next evaluation). Times: ``time.time()`` and this
    process's CPU seconds at each evaluation's start and end."""
    import torch

    from fastcnf.methods import load_recipe
    from fastcnf.training.trainer import Trainer

    torch.set_num_threads(1)
    cfg = load_recipe(spec["recipe"], overrides=spec["overrides"])
    trainer = Trainer(cfg, spec["out_dir"], quiet=True, progress=False)
    ready = time.time()
    eval_at = set(spec["eval_at"])
    evals, train_seconds = [], 0.0
    while trainer.iteration < spec["max_iterations"]:
        t0 = time.perf_counter()
        trainer.train_step()
        train_seconds += time.perf_counter() - t0
        trainer.iteration += 1
        if trainer.iteration in eval_at or trainer.iteration == spec["max_iterations"]:
            start, cpu0 = time.time(), time.process_time()
            m = trainer.evaluate()
            evals.append({"iteration": trainer.iteration, "train_seconds": train_seconds,
                          "eval_start": start, "eval_end": time.time(), "cpu_start": cpu0, "cpu_end": time.process_time(),
                          **{k: m.get(k) for k in ("test_bits_per_dim", "test_bits_per_dim_stderr", "test_nll_nats",
                                                   "eval_nfe_forward", "eval_probes", "test_examples")}})
            print(f"it {trainer.iteration}: {m.get('test_bits_per_dim'):.4f} bits/dim, eval "
                  f"{evals[-1]['eval_end'] - start:.1f} s, NFE {m.get('eval_nfe_forward')}", flush=True)
            if time.time() - spec["launched"] > spec["max_seconds"]:
                break
    return {"ready": ready, "evals": evals, "iterations": trainer.iteration, "train_seconds": train_seconds,
            "eval_tolerance": [cfg.eval.atol, cfg.eval.rtol], "threads": torch.get_num_threads()}


def digits_summary(run: dict, launched: float, ended: float) -> dict:
    """A digits run's curve with wall and CPU times from launch, and monitoring-free times."""
    curve, monitoring, monitoring_cpu = [], 0.0, 0.0
    for e in run["evals"]:
        curve.append({"iteration": e["iteration"], "test_bits_per_dim": e["test_bits_per_dim"],
                      "test_bits_per_dim_stderr": e["test_bits_per_dim_stderr"], "eval_nfe": e["eval_nfe_forward"],
                      "train_seconds": e["train_seconds"], "wall_seconds": e["eval_end"] - launched,
                      "wall_seconds_excluding_monitoring": e["eval_end"] - launched - monitoring,
                      "cpu_seconds": e["cpu_end"],  # process CPU time since its start
                      "cpu_seconds_excluding_monitoring": e["cpu_end"] - monitoring_cpu,
                      "eval_seconds": e["eval_end"] - e["eval_start"]})
        monitoring += e["eval_end"] - e["eval_start"]
        monitoring_cpu += e["cpu_end"] - e["cpu_start"]
    return {"iterations": run["iterations"], "train_seconds": run["train_seconds"],
            "startup_seconds": run["ready"] - launched, "process_seconds": ended - launched,
            "eval_tolerance": run["eval_tolerance"], "threads": run["threads"], "curve": curve,
            "final_test_bits_per_dim": curve[-1]["test_bits_per_dim"] if curve else None}


def digits_crossing(fm: dict, target: float, ref_wall: float, ref_wall_excl: float, ref_cpu: float,
                    ref_cpu_excl: float) -> dict:
    """Where a flow-matching curve first reaches ``target`` bits/dim, and its times over digits-cnf's."""
    hit = next((p for p in fm["curve"] if p["test_bits_per_dim"] is not None and p["test_bits_per_dim"] <= target),
               None)
    out = {"target_bits_per_dim": target, "reached_at_iteration": hit["iteration"] if hit else None}
    for key, ref in (("wall_seconds", ref_wall), ("wall_seconds_excluding_monitoring", ref_wall_excl),
                     ("cpu_seconds", ref_cpu), ("cpu_seconds_excluding_monitoring", ref_cpu_excl)):
        out[f"{key}_to_target"] = hit[key] if hit else None
        out[f"{key}_fraction_of_cnf"] = hit[key] / ref if hit else None
    if not hit:  # a lower bound on the fraction: the run stopped before the target
        last = fm["curve"][-1]
        out["not_reached_by"] = {"iteration": last["iteration"], "wall_seconds": last["wall_seconds"],
                                 "wall_fraction_of_cnf_lower_bound": last["wall_seconds"] / ref_wall,
                                 "best_test_bits_per_dim": min(p["test_bits_per_dim"] for p in fm["curve"])}
    return out


def digits_section_summary(section: dict, seeds: list[int]) -> dict:
    """Targets per seed (flow matching vs the same seed's digits-cnf) and their mean ± std."""
    summary: dict = {"per_seed": {}}
    for seed in seeds:
        runs = section["runs"].get(f"seed{seed}", {})
        cnf = runs.get("cnf")
        if not cnf or not cnf["curve"] or cnf["curve"][-1]["iteration"] != cnf["iterations"]:
            continue
        last = cnf["curve"][-1]
        ref = {"target_bits_per_dim": last["test_bits_per_dim"], "cnf_iterations": cnf["iterations"],
               "cnf_wall_seconds": last["wall_seconds"],
               "cnf_wall_seconds_excluding_monitoring": last["wall_seconds_excluding_monitoring"],
               "cnf_cpu_seconds": last["cpu_seconds"],
               "cnf_cpu_seconds_excluding_monitoring": last["cpu_seconds_excluding_monitoring"]}
        entry = {"reference": ref}
        for method in ("cfm", "otcfm"):
            if method in runs:
                entry[method] = digits_crossing(runs[method], ref["target_bits_per_dim"], ref["cnf_wall_seconds"],
                                                ref["cnf_wall_seconds_excluding_monitoring"], ref["cnf_cpu_seconds"],
                                                ref["cnf_cpu_seconds_excluding_monitoring"])
        summary["per_seed"][f"seed{seed}"] = entry
    per_it = {}
    for method in ("cnf", "cfm", "otcfm"):
        vals = [r[method]["train_seconds"] / r[method]["iterations"] for r in section["runs"].values() if method in r]
        per_it[method] = mean_std(vals)
    summary["train_seconds_per_iteration"] = per_it
    if per_it.get("cfm") and per_it.get("otcfm"):
        summary["otcfm_over_cfm_seconds_per_iteration"] = per_it["otcfm"]["mean"] / per_it["cfm"]["mean"]
    entries = list(summary["per_seed"].values())
    summary["seeds_complete"] = len(entries)
    summary["target_bits_per_dim"] = mean_std(e["reference"]["target_bits_per_dim"] for e in entries)
    summary["cnf_wall_seconds"] = mean_std(e["reference"]["cnf_wall_seconds"] for e in entries)
    for method in ("cfm", "otcfm"):
        ms = [e[method] for e in entries if method in e]
        if ms:
            summary[method] = {k: mean_std(m[k] for m in ms) for k in (
                "reached_at_iteration", "wall_seconds_to_target", "wall_seconds_fraction_of_cnf",
                "wall_seconds_excluding_monitoring_fraction_of_cnf", "cpu_seconds_fraction_of_cnf",
                "cpu_seconds_excluding_monitoring_fraction_of_cnf")}
            summary[method]["reached"] = f"{sum(m['reached_at_iteration'] is not None for m in ms)}/{len(ms)}"
    return summary


def summarize(section: dict) -> None:
    """The section's summary, table and (fewer than 3 seeds) its note, from its runs."""
    section.setdefault("seeds_present", sorted(int(k[4:]) for k in section["runs"]))
    section["summary"] = digits_section_summary(section, section["seeds_present"])
    section["table"] = digits_table(section)
    if len(section["seeds_present"]) < 3:
        section["note"] = f"reduced size: {len(section['seeds_present'])} seed(s) (the target is 3 seeds)"


def digits_verdicts(section: dict) -> dict:
    """The target against the section's summary (means over seeds, every seed reached)."""
    out = {}
    digits = section.get("summary", {})
    for method in ("cfm", "otcfm"):
        if method in digits:
            f = digits[method]["wall_seconds_fraction_of_cnf"]
            fx = digits[method]["wall_seconds_excluding_monitoring_fraction_of_cnf"]
            reached, runs = digits[method]["reached"].split("/")
            out[f"digits/{method}: wall to digits-cnf's {CNF_ITERATIONS}-it bits/dim / its wall <= {WALL_FRACTION}"] = {
                "value": f and f["mean"], "excluding_monitoring": fx and fx["mean"], "reached": digits[method]["reached"],
                "seeds": digits.get("seeds_complete"), "met": bool(f and f["mean"] <= WALL_FRACTION and reached == runs)}
    return out


def digits_table(section: dict) -> str:
    lines = ["| seed | method | reached target at it | wall s to target (excl. monitoring) | fraction of digits-cnf "
             "wall (excl.) | CPU fraction (excl.) | bits/dim at the end (it) |", "|---|---|---|---|---|---|---|"]
    for seed_key, e in section.get("summary", {}).get("per_seed", {}).items():
        ref = e["reference"]
        cnf = section["runs"][seed_key]["cnf"]
        lines.append(f"| {seed_key[4:]} | digits-cnf {ref['cnf_iterations']} it (target "
                     f"{ref['target_bits_per_dim']:.4f}) | {ref['cnf_iterations']} | {fmt(ref['cnf_wall_seconds'])} "
                     f"({fmt(ref['cnf_wall_seconds_excluding_monitoring'])}) | 1 (1) | 1 (1) | "
                     f"{cnf['final_test_bits_per_dim']:.4f} ({cnf['iterations']}) |")
        for method in ("cfm", "otcfm"):
            if method not in e:
                continue
            m, run = e[method], section["runs"][seed_key][method]
            lines.append(f"| {seed_key[4:]} | {method} (digits-fm) | {m['reached_at_iteration'] or 'not reached'} | "
                         f"{fmt(m['wall_seconds_to_target'])} ({fmt(m['wall_seconds_excluding_monitoring_to_target'])}) | "
                         f"{fmt(m['wall_seconds_fraction_of_cnf'], '.3f')} "
                         f"({fmt(m['wall_seconds_excluding_monitoring_fraction_of_cnf'], '.3f')}) | "
                         f"{fmt(m['cpu_seconds_fraction_of_cnf'], '.3f')} "
                         f"({fmt(m['cpu_seconds_excluding_monitoring_fraction_of_cnf'], '.3f')}) | "
                         f"{fmt(run['final_test_bits_per_dim'], '.4f')} ({run['curve'][-1]['iteration']}) |")
    return "\n".join(lines)


def run_digits(args, argv: list[str] | None, earlier: dict | None, work: Path, save) -> dict:
    """The digits runs, up to ``args.jobs`` processes at a time (``earlier``: the section as last
    written, whose seeds not rerun are kept); ``save(section)`` after each run."""
    d = {**run_metadata(__file__, argv), "load_average_start": load_average(),
         "settings": {"seeds": args.digits_seeds, "methods": {m: {"recipe": DIGITS[m][0], "overrides": DIGITS[m][1]}
                                                               for m in args.digits_methods},
                      "cnf_eval_every": args.cnf_eval_every, "fm_eval_at": args.fm_eval_at,
                      "fm_max_seconds": args.fm_max_seconds, "extra_overrides": args.digits_set,
                      "concurrent_processes": args.jobs},
         "target": f"flow matching reaches digits-cnf's final ({CNF_ITERATIONS}-iteration) test bits/dim in <= 1/4 of "
                   "digits-cnf's wall time from process start (training + its final evaluation)",
         "timing": "wall_seconds: from process launch to the end of the evaluation; *_excluding_monitoring: "
                   "less every earlier evaluation; cpu_seconds: the process's CPU time at that point (steadier "
                   "on a shared machine)", "runs": {}}
    merge_earlier_runs(d, earlier, {f"seed{s}" for s in args.digits_seeds})
    d["seeds_present"] = sorted(set(int(k[4:]) for k in d["runs"]) | set(args.digits_seeds))
    summarize(d)  # the note, and the summary of runs kept from an earlier invocation
    jobs = []
    for seed in args.digits_seeds:
        for method in args.digits_methods:
            recipe, ov = DIGITS[method]
            cnf = method == "cnf"
            overrides = [f"seed={seed}", "threads=1", "train.checkpoint_every=0", *ov, *args.digits_set]
            tag = f"digits-{method}-seed{seed}"
            jobs.append({"method": method, "seed": seed, "tag": tag, "recipe": recipe, "overrides": overrides,
                         "out_dir": str(work / tag), "result": str(work / f"{tag}.result.json"),
                         "max_iterations": CNF_ITERATIONS if cnf else FM_MAX_ITERATIONS,
                         "eval_at": list(range(args.cnf_eval_every, CNF_ITERATIONS + 1, args.cnf_eval_every)) if cnf
                         else args.fm_eval_at,
                         "max_seconds": float("inf") if cnf else args.fm_max_seconds})
    # interleave so that digits-cnf (long) shares the machine with the short runs
    order = {"cnf": 0, "cfm": 1, "otcfm": 2}
    jobs.sort(key=lambda j: (j["seed"], order[j["method"]]))

    def on_done(job: dict, result: dict, launched: float, ended: float) -> None:
        run = digits_summary(result, launched, ended)
        run.update(recipe=job["recipe"], overrides=job["overrides"])
        d["runs"].setdefault(f"seed{job['seed']}", {})[job["method"]] = run
        run.update(command=d["command"], commit=d["commit"])
        save(d)

    run_jobs(__file__, jobs, work, args.jobs, on_done)
    return d


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=2, help="processes at a time")
    p.add_argument("--digits-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--digits-methods", nargs="+", default=["cnf", "cfm", "otcfm"], choices=list(DIGITS))
    p.add_argument("--cnf-eval-every", type=int, default=100, help="digits-cnf: test bits/dim every this many its")
    p.add_argument("--fm-eval-at", type=int, nargs="+",
                   default=[25, 50, 100, 150, 200, 300, 400, 500, 600, 800, 1000, 1250, 1500, 1750, 2000],
                   help="flow matching: iterations at which the test bits/dim is evaluated")
    p.add_argument("--fm-max-seconds", type=float, default=720.0,
                   help="flow matching: stop at the first evaluation after this many seconds from launch")
    p.add_argument("--digits-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra fastcnf overrides for every run (e.g. eval.probes=4)")
    add_section_arguments(p, "digits", FLOW_MATCHING_JSON, "/tmp/fastcnf-bench-flow-matching")
    args = p.parse_args(argv)
    run_section(args, argv, __file__, "digits", ABOUT, description=FLOW_MATCHING_DESCRIPTION, first_part="toys",
                worker=digits_worker, run=lambda earlier, work, save: run_digits(args, argv, earlier, work, save),
                summarize=summarize, verdicts=digits_verdicts)


if __name__ == "__main__":
    main()
