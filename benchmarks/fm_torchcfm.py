"""torchcfm side by side with fastcnf's flow matching: seconds per training step and test NLL.

References: OT-CFM / I-CFM (Tong et al. 2024, "Improving and generalizing flow-based generative
models with minibatch optimal transport"; torchcfm is its authors' implementation), Flow Matching
(Lipman et al. 2023); see docs/bibliography.md. The toy and digits experiments are ``fm_toys.py``
and ``fm_digits.py``; the three share ``results/flow_matching.json``.

torchcfm is installed for this benchmark only (it is not a dependency of fastcnf)::

    .venv/bin/pip install --no-deps torchcfm   # its dependency list would replace the venv's torch;
                                               # what ConditionalFlowMatcher needs (torch, numpy,
                                               # scipy, POT) is already installed

On 8gaussians (fastcnf's training split, batch 256, Adam 1e-3, sigma 0), per seed, six models
trained side by side on the same batches, one step each per iteration in alternating order:
torchcfm's tutorial loop (``ConditionalFlowMatcher`` / ``ExactOptimalTransportConditionalFlowMatcher``
and ``torchcfm.models.MLP(2, w=64, time_varying=True)``: 2+1 -> 64 -> 64 -> 64 -> 2, SELU, taking
``[x, t]``), the same loop on fastcnf's network (``ConcatSquashMLP(2, (64, 64, 64))``, tanh) and
fastcnf's step (``flow_matching_loss`` with ``IndependentCoupling`` / ``ExactOTCoupling`` on that
network). Reported: median seconds per step over ``--cfm-timing-window`` iterations (after 10),
the OT / independent and fastcnf / torchcfm ratios (targets: fastcnf / torchcfm at most 1 on the
same network, OT / independent at most 1.3, in process CPU seconds), the pairing's own cost
(scipy's ``linear_sum_assignment`` vs POT's ``ot.emd``), and after ``--cfm-iterations`` the test
NLL of every model by ``fastcnf.cnf.likelihood.log_prob`` (exact trace, dopri5 1e-5; torchcfm's
models with ``time_convention="noise_to_data"``).

Writes the section ``torchcfm`` of ``benchmarks/results/flow_matching.json`` (``--out``; the
file's other sections are kept, and so are earlier seeds not rerun now), with the command, commit
and machine of this invocation, and prints a Markdown table and the verdicts. Each seed runs in
its own process, up to ``--jobs`` at a time, with one torch thread.

    python benchmarks/fm_torchcfm.py [--cfm-seeds 0 1 2] [--cfm-iterations 2000] [--jobs 2]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import (FLOW_MATCHING_DESCRIPTION, FLOW_MATCHING_JSON, add_section_arguments, load_average, mean_std,
                    merge_earlier_runs, run_jobs, run_metadata, run_section)

TARGETS = {"fastcnf_over_torchcfm": 1.0, "ot_over_independent": 1.3}
ABOUT = "torchcfm side by side: s/iteration and fastcnf-evaluated NLL"


def torchcfm_worker(spec: dict) -> dict:
    """torchcfm's training loop (``ConditionalFlowMatcher`` / ``ExactOptimalTransportConditionalFlowMatcher``,
    its tutorial MLP taking ``[x, t]``) next to fastcnf's flow-matching step (``flow_matching_loss`` on
    ``ConcatSquashMLP(2, (64, 64, 64))``), on the same 8gaussians batches, interleaved iteration by
    iteration; then every model's test NLL by ``fastcnf.cnf.likelihood.log_prob`` (exact trace)."""
    import numpy as np
    import torch
    from torchcfm.conditional_flow_matching import (ConditionalFlowMatcher,
                                                    ExactOptimalTransportConditionalFlowMatcher)
    from torchcfm.models import MLP

    from fastcnf.flow_matching.pairing import ExactOTCoupling, IndependentCoupling
    from fastcnf.cnf.dynamics import ConcatSquashMLP
    from fastcnf.flow_matching.loss import flow_matching_loss
    from fastcnf.cnf.likelihood import log_prob
    from fastcnf.flow_matching.paths import IndependentCFMPath, UniformTime
    from fastcnf.methods import load_recipe
    from fastcnf.data.registry import load_data

    torch.set_num_threads(1)
    seed, batch, iters = spec["seed"], spec["batch_size"], spec["iterations"]
    cfg = load_recipe("toy-fm", overrides=[f"data.name={spec['data']}", f"seed={seed}",
                                           f"data.n_test={spec['test_size']}"])
    bundle = load_data(cfg.data, cfg.seed)
    train_x, test_x = bundle.train.x.float(), bundle.test.x.float()
    torch.manual_seed(seed)
    np.random.seed(seed)  # torchcfm's OT plan sampler draws pairs with numpy

    class TorchcfmVelocity(torch.nn.Module):
        """torchcfm's tutorial model as a ``v(t, x)`` callable (t scalar or (B,))."""

        def __init__(self, mlp):
            super().__init__()
            self.mlp = mlp

        def forward(self, t, x):
            t = t.reshape(-1, 1).expand(x.shape[0], 1).to(x)
            return self.mlp(torch.cat([x, t], -1))

    def torchcfm_step(fm, model, opt):
        def step(x1):
            opt.zero_grad()
            x0 = torch.randn_like(x1)
            t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1)
            vt = model(torch.cat([xt, t[:, None]], dim=-1))
            loss = torch.mean((vt - ut) ** 2)
            loss.backward()
            opt.step()
            return loss
        return step

    def torchcfm_step_same_net(fm, net, opt):  # torchcfm's loop on fastcnf's network (noise -> data)
        def step(x1):
            opt.zero_grad()
            x0 = torch.randn_like(x1)
            t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1)
            loss = torch.mean((net(t, xt) - ut) ** 2)
            loss.backward()
            opt.step()
            return loss
        return step

    def fastcnf_step(coupling, net, opt):
        path, times = IndependentCFMPath(0.0), UniformTime()

        def step(x):
            opt.zero_grad()
            loss = flow_matching_loss(net, x, torch.randn_like(x), path, coupling, times)
            loss.backward()
            opt.step()
            return loss
        return step

    lr = spec["lr"]
    variants = {}
    for pairing in ("independent", "ot"):
        fm = (ConditionalFlowMatcher(sigma=0.0) if pairing == "independent"
              else ExactOptimalTransportConditionalFlowMatcher(sigma=0.0))
        mlp = MLP(dim=2, w=64, time_varying=True)
        variants[f"torchcfm/{pairing}"] = dict(
            model=TorchcfmVelocity(mlp), convention="noise_to_data",
            step=torchcfm_step(fm, mlp, torch.optim.Adam(mlp.parameters(), lr=lr)),
            what=f"torchcfm {type(fm).__name__}(sigma=0) + torchcfm.models.MLP(2, w=64, time_varying) (SELU), "
                 "its tutorial loop")
        net = ConcatSquashMLP(2, (64, 64, 64))
        variants[f"torchcfm_same_net/{pairing}"] = dict(
            model=net, convention="noise_to_data",
            step=torchcfm_step_same_net(fm, net, torch.optim.Adam(net.parameters(), lr=lr)),
            what=f"torchcfm {type(fm).__name__}(sigma=0) loop on fastcnf's ConcatSquashMLP(2, (64, 64, 64)) tanh")
        net = ConcatSquashMLP(2, (64, 64, 64))
        coupling = IndependentCoupling() if pairing == "independent" else ExactOTCoupling()
        variants[f"fastcnf/{pairing}"] = dict(
            model=net, convention="data_to_noise",
            step=fastcnf_step(coupling, net, torch.optim.Adam(net.parameters(), lr=lr)),
            what=f"fastcnf flow_matching_loss(IndependentCFMPath(0), {coupling!r}, UniformTime) on "
                 "ConcatSquashMLP(2, (64, 64, 64)) tanh")
    names = [n for n in variants if n.split("/")[0] in spec["sides"]]
    times = {n: [] for n in names}
    cpu = {n: [] for n in names}
    losses = {n: [] for n in names}
    gen = torch.Generator().manual_seed(seed)
    train_start = time.perf_counter()
    for it in range(iters):
        x = train_x[torch.randint(len(train_x), (batch,), generator=gen)]
        order = names if it % 2 == 0 else names[::-1]  # interleaved, alternating order
        for n in order:
            t0, c0 = time.perf_counter(), time.process_time()
            loss = variants[n]["step"](x)
            times[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)
            if (it + 1) % 100 == 0:
                losses[n].append([it + 1, float(loss)])
    train_seconds = time.perf_counter() - train_start
    # OT pairing alone: the assignment's share of the OT step
    cost_profile = {}
    x = train_x[:batch]
    eps = torch.randn_like(x)
    from fastcnf.flow_matching.pairing import squared_distances
    from scipy.optimize import linear_sum_assignment
    import ot as pot
    reps = spec["timing_window"]
    for label, fn in {
        "fastcnf ExactOTCoupling (squared_distances + scipy linear_sum_assignment)":
            lambda: ExactOTCoupling()(x, eps),
        "scipy linear_sum_assignment on the 256x256 cost alone":
            lambda: linear_sum_assignment(squared_distances(x, eps).numpy()),
        "torchcfm OTPlanSampler.sample_plan (POT ot.emd + np.random.choice)":
            lambda: ExactOptimalTransportConditionalFlowMatcher(sigma=0.0).ot_sampler.sample_plan(eps, x),
        "POT ot.emd on the 256x256 cost alone":
            lambda: pot.emd(pot.unif(batch), pot.unif(batch), torch.cdist(eps, x).pow(2).numpy()),
    }.items():
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        cost_profile[label] = float(np.median(ts))
    window = spec["timing_window"]
    out = {"variants": {}, "train_seconds_all": train_seconds, "coupling_median_seconds": cost_profile}
    for n in names:
        v = variants[n]
        model = v["model"].eval()
        t0 = time.perf_counter()
        res = log_prob(model, test_x, divergence="exact", atol=spec["atol"], rtol=spec["rtol"],
                       time_convention=v["convention"])
        eval_seconds = time.perf_counter() - t0
        ts = times[n]
        out["variants"][n] = {
            "what": v["what"], "time_convention": v["convention"],
            "median_step_seconds_first_window": float(np.median(ts[10:10 + window])),
            "median_step_seconds_all": float(np.median(ts[10:])),
            "median_step_cpu_seconds_first_window": float(np.median(cpu[n][10:10 + window])),
            "mean_step_seconds_all": float(np.mean(ts[10:])),
            "train_loss_every_100": losses[n],
            "test_nll_nats": float(-res.log_prob.mean()), "test_nll_sem_over_points":
                float(res.log_prob.std() / len(res.log_prob) ** 0.5),
            "eval_nfe": res.nfe_forward, "eval_seconds": eval_seconds}
    return out


def torchcfm_section_summary(section: dict) -> dict:
    """Per-iteration cost ratios (targets: fastcnf / torchcfm <= 1, OT / independent <= 1.3)."""
    out = {}
    for seed_key, r in section["runs"].items():
        ratios = {}
        for clock, field in (("", "median_step_seconds_first_window"), ("cpu:", "median_step_cpu_seconds_first_window")):
            ratios.update({clock + k: v for k, v in _step_ratios(r["variants"], field).items()})
        out[seed_key] = ratios
    keys = sorted({k for r in out.values() for k in r})
    names = sorted({n for r in section["runs"].values() for n in r["variants"]})
    per_variant = {n: {k: mean_std(r["variants"][n][k] for r in section["runs"].values() if n in r["variants"])
                       for k in ("median_step_seconds_first_window", "median_step_cpu_seconds_first_window",
                                 "test_nll_nats", "eval_nfe")} for n in names}
    return {"per_seed": out, "mean_std": {k: mean_std(r.get(k) for r in out.values()) for k in keys},
            "variants_mean_std": per_variant, "seeds": len(section["runs"]),
            "keys": "ratios of median wall seconds per step; cpu: the same of median process CPU seconds (the "
                    "steadier measure on a shared machine: a step longer than a scheduler slice waits for the "
                    "CPU, which inflates the wall time of the long OT steps more than the short ones)"}


def _step_ratios(v: dict, field: str) -> dict:
    med = {n: x[field] for n, x in v.items()}
    ratios = {}
    for pairing in ("independent", "ot"):
        if f"fastcnf/{pairing}" in med and f"torchcfm/{pairing}" in med:
            ratios[f"fastcnf_over_torchcfm_mlp/{pairing}"] = med[f"fastcnf/{pairing}"] / med[f"torchcfm/{pairing}"]
        if f"fastcnf/{pairing}" in med and f"torchcfm_same_net/{pairing}" in med:
            ratios[f"fastcnf_over_torchcfm_same_net/{pairing}"] = (
                med[f"fastcnf/{pairing}"] / med[f"torchcfm_same_net/{pairing}"])
    for side in ("fastcnf", "torchcfm", "torchcfm_same_net"):
        if f"{side}/ot" in med and f"{side}/independent" in med:
            ratios[f"ot_over_independent/{side}"] = med[f"{side}/ot"] / med[f"{side}/independent"]
    return ratios


def torchcfm_table(section: dict) -> str:
    lines = ["| seed | variant | median wall s/iteration (first window) | median CPU s/it (first window) | "
             "median wall s/it (all) | test NLL (nats) | eval NFE |", "|---|---|---|---|---|---|---|"]
    for seed_key, r in sorted(section["runs"].items()):
        for n, v in r["variants"].items():
            lines.append(f"| {seed_key[4:]} | {n} | {v['median_step_seconds_first_window'] * 1e3:.2f} ms | "
                         f"{v['median_step_cpu_seconds_first_window'] * 1e3:.2f} ms | "
                         f"{v['median_step_seconds_all'] * 1e3:.2f} ms | {v['test_nll_nats']:.4f} | {v['eval_nfe']} |")
    ratios = section.get("summary", {}).get("mean_std", {})
    if ratios:
        lines.append("")
        lines.append("| ratio | mean | std |")
        lines.append("|---|---|---|")
        lines += [f"| {k} | {v['mean']:.3f} | {v['std']:.3f} |" for k, v in ratios.items() if v]
    return "\n".join(lines)


def torchcfm_verdicts(section: dict) -> dict:
    """The targets against the section's CPU-time ratios (means over seeds): fastcnf's step over
    torchcfm's loop on the same network, and fastcnf's OT-CFM step over its CFM step."""
    out = {}
    ratios = section.get("summary", {}).get("mean_std", {})
    limit = TARGETS["fastcnf_over_torchcfm"]
    for pairing in ("independent", "ot"):
        r = ratios.get(f"cpu:fastcnf_over_torchcfm_same_net/{pairing}")
        if r:
            out[f"torchcfm/{pairing}: fastcnf step / torchcfm step, same network, CPU s <= {limit:g}"] = {
                "value": r["mean"], "std": r["std"], "met": r["mean"] <= limit,
                "vs_torchcfm_tutorial_mlp": (ratios.get(f"cpu:fastcnf_over_torchcfm_mlp/{pairing}") or {}).get("mean")}
    r = ratios.get("cpu:ot_over_independent/fastcnf")
    limit = TARGETS["ot_over_independent"]
    if r:
        out[f"torchcfm/fastcnf: OT-CFM step / CFM step at batch 256 (8gaussians), CPU s <= {limit:g}"] = {
            "value": r["mean"], "std": r["std"], "met": r["mean"] <= limit,
            "torchcfm_tutorial": (ratios.get("cpu:ot_over_independent/torchcfm") or {}).get("mean")}
    return out



def summarize(section: dict) -> None:
    """The section's summary and table, from its runs."""
    section["summary"] = torchcfm_section_summary(section)
    section["table"] = torchcfm_table(section)


def run_torchcfm(args, argv: list[str] | None, earlier: dict | None, work: Path, save) -> dict:
    """One process per seed, up to ``args.jobs`` at a time (``earlier``: the section as last
    written, whose seeds not rerun are kept); ``save(section)`` after each seed."""
    import torchcfm

    section = {
        **run_metadata(__file__, argv), "torchcfm_version": getattr(torchcfm, "__version__", "unknown"),
        "load_average_start": load_average(),
        "settings": {"data": "8gaussians (fastcnf's toy split)", "batch_size": 256, "lr": 1e-3, "optimizer": "Adam",
                     "iterations": args.cfm_iterations, "timing_window": args.cfm_timing_window,
                     "warmup_iterations_excluded": 10, "test_size": args.cfm_test_size,
                     "seeds": args.cfm_seeds, "sides": args.cfm_sides, "eval": "fastcnf.cnf.likelihood.log_prob, "
                     "exact trace, dopri5 atol=rtol=1e-5 (torchcfm models: time_convention=noise_to_data)"},
        "timing": "every variant steps on the same batch in each iteration, in alternating order; "
                  "median_step_seconds_first_window: median over iterations 10..10+window; the step is "
                  "noise draw + pairing + path + loss + backward + Adam step (the data batch drawn outside)",
        "targets": TARGETS, "runs": {}}
    merge_earlier_runs(section, earlier, {f"seed{s}" for s in args.cfm_seeds})
    jobs = [{"seed": seed, "tag": f"torchcfm-seed{seed}", "data": "8gaussians", "batch_size": 256, "lr": 1e-3,
             "iterations": args.cfm_iterations, "timing_window": args.cfm_timing_window,
             "test_size": args.cfm_test_size, "atol": 1e-5, "rtol": 1e-5, "sides": args.cfm_sides,
             "result": str(work / f"torchcfm-seed{seed}.result.json")} for seed in args.cfm_seeds]

    def on_done(job: dict, result: dict, launched: float, ended: float) -> None:
        section["runs"][f"seed{job['seed']}"] = result
        save(section)

    run_jobs(__file__, jobs, work, args.jobs, on_done)
    return section


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=2, help="processes (seeds) at a time")
    p.add_argument("--cfm-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--cfm-iterations", type=int, default=2000, help="training iterations of every model")
    p.add_argument("--cfm-timing-window", type=int, default=200, help="iterations in the median (after 10)")
    p.add_argument("--cfm-test-size", type=int, default=5000)
    p.add_argument("--cfm-sides", nargs="+", default=["torchcfm", "torchcfm_same_net", "fastcnf"])
    add_section_arguments(p, "torchcfm", FLOW_MATCHING_JSON, "/tmp/fastcnf-bench-flow-matching")
    args = p.parse_args(argv)
    run_section(args, argv, __file__, "torchcfm", ABOUT, description=FLOW_MATCHING_DESCRIPTION, first_part="toys",
                worker=torchcfm_worker, run=lambda earlier, work, save: run_torchcfm(args, argv, earlier, work, save),
                summarize=summarize, verdicts=torchcfm_verdicts)


if __name__ == "__main__":
    main()
