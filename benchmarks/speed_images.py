"""Speed of fastcnf against FFJORD's multiscale image training, side by side.

Every side runs in its own worker process (one torch thread each by default) so that its peak
memory is its own; the parent interleaves their iterations (side order reversed every other
round) so that load on the shared machine hits all sides alike. Sides (``--sides``):

* ``ffjord``: ``benchmarks/ffjord_multiscale_baseline.py``, FFJORD's model (ConcatConv2d layers,
  400,323 parameters on MNIST with one block per scale) and engine (torchdiffeq adjoint, VJP
  Hutchinson with ``create_graph`` in both solves), initialised with ``--seed``;
* ``ffjord-cs``: FFJORD's engine on fastcnf's network (FFJORD's ``ConcatSquashConv2d``, 394,449
  parameters) with fastcnf's initial weights copied in: the same model and weights as the fastcnf
  sides, so the ratio is the engine's alone;
* ``fastcnf``: fastcnf's recipe (``--recipe``, default ``mnist-ffjord`` with
  ``model.num_blocks=1``, data set and data root set from the options) as the builder makes it;
* ``fastcnf-cl``: the same with the conv dynamics in channels-last layout
  (``ConcatSquashConvNet(channels_last=True)``; off by default; needs ``--fastcnf-set
  model.layer_type=concatsquash``, as ``mnist-ffjord`` builds FFJORD's concat layers);
* ``fastcnf-jvp``: the same with Hutchinson by forward mode (``model.hutchinson_mode=jvp``);
* ``fastcnf-direct``: direct back-propagation through the lean dopri5 (``solver.gradient=direct``);
* ``fastcnf-recompute``: the same by per-stage recomputation (``solver.gradient=recompute``: the
  same gradient, about one evaluation's graph of memory);
* ``fastcnf-recompute-bf16``: the same with the backward pass's re-evaluations in bfloat16
  (``solver.backward_precision=bfloat16``: the same forward solve, the gradient rounded);
* ``fastcnf-adjoint``: FFJORD's own gradient method in fastcnf (``solver.gradient=adjoint``); the plain
  ``fastcnf`` side takes the recipe's default, ``solver.gradient=auto``.

fastcnf's ``mnist-ffjord`` now uses FFJORD's concat layers (``model.layer_type: concat``):
with one block per scale the two sides build the same model (400,318 trained parameters; FFJORD's
400,323 include 5 untrained end-time scalars). The rows recorded before that change (JSON
``speed_images.json``) compared concat (FFJORD) with concat-squash (fastcnf), which differ by 5,874
weights (FFJORD: the time as an input channel, 9 weights per output channel and layer; fastcnf then: a
gate and a bias per output channel, 3), sharing the seed, not the weights.

Part (a), per iteration: the same batches (``--batch-size`` images of the training split, drawn
and dequantised from a seed per iteration) on every side, ``--iterations`` interleaved training
iterations (Adam 1e-3 with FFJORD's warm-up on every side, fastcnf's model driven by this loop,
not by its trainer), median wall seconds and process CPU seconds per iteration, NFE forward and
backward per iteration (summed over blocks), peak memory (``resource.getrusage(RUSAGE_SELF).
ru_maxrss`` of each worker, i.e. peak resident set size including the interpreter, torch and the
data; the increase over the RSS before the first iteration is reported too; on CUDA
``torch.cuda.max_memory_allocated``). With ``--memory`` each side then runs one more iteration
under ``torch.profiler`` and reports the peak bytes of live tensors during it
(:func:`peak_live_tensor_bytes`): what the method keeps alive, without the allocator's cached and
fragmented pages that RSS also counts.

Part (b), ``--train-iterations N``: N interleaved training iterations of ``--train-sides`` on ``--train-data`` with bits/dim on a fixed, fixed-noise test subset every
``--eval-every`` iterations (eval mode, no gradients, dopri5 1e-5).

Run, e.g. (see ``benchmarks/README.md`` for the recorded commands)::

    python benchmarks/speed_images.py --iterations 3 --batch-size 32 \\
        --json benchmarks/results/speed_images.json
    python benchmarks/speed_images.py --profile benchmarks/results/speed_images_profile.txt
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from common import commit, load_average, machine, run_metadata  # noqa: E402  (puts src/ on the path)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import ffjord_multiscale_baseline as baseline  # noqa: E402
import speed_images_ttq as ttq  # noqa: E402

# ---- fastcnf's API, imported in this one place ---------------------------------------------------
from fastcnf import build_model as build_fastcnf_model  # noqa: E402
from fastcnf import load_data, load_recipe  # noqa: E402
from fastcnf.cnf.dynamics import ConcatSquashConvNet  # noqa: E402

SIDES = ("ffjord", "ffjord-cs", "fastcnf", "fastcnf-cl", "fastcnf-jvp", "fastcnf-direct", "fastcnf-recompute",
         "fastcnf-recompute-bf16", "fastcnf-adjoint")
#: overrides a fastcnf side adds to the recipe (and ``--fastcnf-set``)
SIDE_OVERRIDES = {"fastcnf-jvp": ["model.hutchinson_mode=jvp"],
                  "fastcnf-direct": ["solver.gradient=direct"],
                  "fastcnf-recompute": ["solver.gradient=recompute"],
                  "fastcnf-recompute-bf16": ["solver.gradient=recompute", "solver.backward_precision=bfloat16"],
                  "fastcnf-adjoint": ["solver.gradient=adjoint"]}
TARGETS = {"per_iteration_speedup": 2.0}


# ---- batches: identical on every side -----------------------------------------------------------
def make_batch(train: np.ndarray, levels: int, batch_size: int, seed: int, iteration: int) -> torch.Tensor:
    rng = np.random.RandomState(seed * 100_003 + iteration)
    idx = rng.choice(len(train), batch_size, replace=False)
    return baseline.dequantize_batch(train[idx], levels, rng)


# ---- fastcnf side -------------------------------------------------------------------------------
def build_fastcnf_side(args, side: str):
    extra = SIDE_OVERRIDES.get(side, [])
    cfg = load_recipe(args.recipe, cfg_overrides(args) + extra)
    bundle = load_data(cfg.data, cfg.seed)
    torch.manual_seed(args.seed)
    model = build_fastcnf_model(cfg, bundle)
    info = {"recipe": args.recipe, "overrides": list(cfg_overrides(args)) + extra}
    if side == "fastcnf-cl":  # the concat-squash conv network's layout switch (no config key)
        for m in model.modules():
            if isinstance(m, ConcatSquashConvNet):
                m.channels_last = True
    return model, info, bundle.levels


def cfg_overrides(args) -> list[str]:
    return ttq.model_overrides(args, args.data) + list(args.fastcnf_set)


def _cnf_nets_fastcnf(model) -> list[torch.Tensor]:
    return [p for n, p in model.named_parameters() if ".net." in n]


def _cnf_nets_baseline(model) -> list[torch.Tensor]:
    return [p for n, p in model.named_parameters() if ".diffeq." in n]


def nfe_fastcnf(model) -> tuple[int, int]:
    rec = model.nfe_record()
    return sum(r["forward"] for r in rec.values()), sum(r["backward"] for r in rec.values())


# ---- worker -------------------------------------------------------------------------------------
def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_live_tensor_bytes(fn) -> int:
    """The largest number of bytes held by live tensors while ``fn()`` runs, above what was live
    before it: the running sum of the allocations and frees that ``torch.profiler``
    (``profile_memory=True``) records, in time order. Unlike peak RSS it does not count the
    allocator's cached or fragmented pages, so it measures what a method keeps alive."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _train_iteration(side: str, model, optimizer, x: torch.Tensor, itr: int, levels: int) -> dict:
    """One training iteration of either engine (FFJORD's schedule, Adam): loss, NFE, wall seconds."""
    if side.startswith("ffjord"):
        return baseline.train_step(model, optimizer, x, itr, levels)
    start = time.perf_counter()
    baseline.update_lr(optimizer, itr)
    optimizer.zero_grad()
    loss = model.bits_per_dim(x).mean()
    nfe_forward = nfe_fastcnf(model)[0]
    loss.backward()
    optimizer.step()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return {"loss": float(loss.detach()), "nfe_forward": nfe_forward,
            "nfe_backward": nfe_fastcnf(model)[1], "seconds": time.perf_counter() - start}


def _worker(conn, side: str, args) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    train, test, levels = baseline.load_images(args.data, args.root)
    shape = train.shape[1:]
    hidden = tuple(int(d) for d in args.dims.split(","))
    info: dict = {"side": side}
    if side.startswith("ffjord"):
        layer_type = "concat" if side == "ffjord" else "concatsquash"
        model = baseline.build_model(shape, args.num_blocks, hidden, layer_type, seed=args.seed)
        info["layer_type"] = layer_type
        if side == "ffjord-cs":
            weights = torch.load(args.weights_file, weights_only=True)
            params = _cnf_nets_baseline(model)
            assert [tuple(p.shape) for p in params] == [tuple(w.shape) for w in weights], "architectures differ"
            with torch.no_grad():
                for p, w in zip(params, weights):
                    p.copy_(w)
            info["weights"] = "fastcnf's initial weights"
    else:
        model, extra, levels = build_fastcnf_side(args, side)
        info.update(extra)
        if args.weights_file and not os.path.exists(args.weights_file):
            torch.save([p.detach().clone() for p in _cnf_nets_fastcnf(model)], args.weights_file)
        elif args.weights_file:
            with torch.no_grad():
                for p, w in zip(_cnf_nets_fastcnf(model), torch.load(args.weights_file, weights_only=True)):
                    p.copy_(w)
        info["weights"] = "fastcnf's initial weights (seed %d)" % args.seed
    model = model.to(device)
    info["parameters"] = sum(p.numel() for p in model.parameters())
    optimizer = baseline.make_optimizer(model)
    x_test = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    info["rss_setup_mib"] = _rss_mib()
    conn.send(info)
    while True:
        cmd, value = conn.recv()
        if cmd == "stop":
            break
        if cmd in ("iter", "memory"):
            itr, batch_size = value
            x = make_batch(train, levels, batch_size, args.seed, itr).to(device)
            torch.manual_seed(args.seed * 1000 + itr)  # Hutchinson noise stream
            if cmd == "memory":
                peak = peak_live_tensor_bytes(lambda: _train_iteration(side, model, optimizer, x, itr, levels))
                conn.send({"peak_live_tensor_mib": peak / 2**20})
                continue
            cpu0 = time.process_time()
            row = _train_iteration(side, model, optimizer, x, itr, levels)
            row["cpu_seconds"] = time.process_time() - cpu0
            row["rss_peak_mib"] = _rss_mib()
            if device.type == "cuda":
                row["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            conn.send(row)
        elif cmd == "eval":
            if x_test is None:
                x_test = ttq.test_subset(test, levels, value, args.seed).to(device)
            start = time.perf_counter()
            if side.startswith("ffjord"):
                torch.manual_seed(args.seed + 7)
                bpd = baseline.evaluate_bits_per_dim(model, x_test, levels)
            else:
                bpd = ttq.fastcnf_bits_per_dim(model, x_test, args.seed)
            conn.send({"test_bits_per_dim": bpd, "eval_seconds": time.perf_counter() - start})
    conn.close()


class Side:
    def __init__(self, ctx, name: str, args) -> None:
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, name, args), daemon=True)
        self.proc.start()
        self.info = self.conn.recv()

    def ask(self, cmd: str, value=None) -> dict:
        self.conn.send((cmd, value))
        return self.conn.recv()

    def stop(self) -> None:
        self.conn.send(("stop", None))
        self.proc.join(timeout=60)


def start_sides(names, args) -> list[Side]:
    ctx = mp.get_context("spawn")
    # fastcnf sides first: the first writes the initial weights that the others (and ffjord-cs) load
    ordered = sorted(names, key=lambda n: not n.startswith("fastcnf"))
    sides = {n: Side(ctx, n, args) for n in ordered}
    return [sides[n] for n in names]


# ---- part (a) -----------------------------------------------------------------------------------
def per_iteration(args) -> dict:
    sides = start_sides(args.sides, args)
    rows: dict[str, list] = {s.name: [] for s in sides}
    loads = [load_average()]
    try:
        for i in range(args.iterations):
            order = sides if i % 2 == 0 else sides[::-1]
            for s in order:
                row = s.ask("iter", (i, args.batch_size))
                rows[s.name].append(row)
                print(f"[a] iter {i} {s.name:13s} {row['seconds']:7.2f} s (cpu {row['cpu_seconds']:.2f}) "
                      f"NFE {row['nfe_forward']}+{row['nfe_backward']} bpd {row['loss']:.4f} "
                      f"rss {row['rss_peak_mib']:.0f} MiB", flush=True)
            loads.append(load_average())
        memory = {}
        if args.memory:  # one more iteration per side, under the profiler (not timed)
            for s in sides:
                memory[s.name] = s.ask("memory", (args.iterations, args.batch_size))["peak_live_tensor_mib"]
                print(f"[a] memory {s.name:13s} peak live tensors {memory[s.name]:.1f} MiB", flush=True)
    finally:
        for s in sides:
            s.stop()
    summary = {}
    for s in sides:
        r = rows[s.name]
        summary[s.name] = {
            "parameters": s.info["parameters"], "info": s.info,
            "median_seconds": statistics.median(x["seconds"] for x in r),
            "median_cpu_seconds": statistics.median(x["cpu_seconds"] for x in r),
            "nfe_forward": [x["nfe_forward"] for x in r], "nfe_backward": [x["nfe_backward"] for x in r],
            "rss_setup_mib": s.info["rss_setup_mib"], "rss_peak_mib": max(x["rss_peak_mib"] for x in r),
            "rss_increase_mib": max(x["rss_peak_mib"] for x in r) - s.info["rss_setup_mib"],
            "iterations": r}
        if s.name in memory:
            summary[s.name]["peak_live_tensor_mib"] = memory[s.name]
        if "cuda_peak_mib" in r[0]:
            summary[s.name]["cuda_peak_mib"] = max(x["cuda_peak_mib"] for x in r)
    ratios = {}
    for ref in ("ffjord", "ffjord-cs"):
        for fast in [n for n in SIDES if n.startswith("fastcnf")]:
            if ref in summary and fast in summary:
                ratios[f"{ref}/{fast}"] = {
                    "wall": summary[ref]["median_seconds"] / summary[fast]["median_seconds"],
                    "cpu": summary[ref]["median_cpu_seconds"] / summary[fast]["median_cpu_seconds"]}
    return {"sides": summary, "speedup": ratios, "load_average": loads}


# ---- part (b) -----------------------------------------------------------------------------------
def training_run(args) -> dict:
    sub = argparse.Namespace(**vars(args))
    sub.data, sub.batch_size = args.train_data, args.train_batch_size
    if args.train_data == "digits":
        sub.recipe = args.train_recipe
    sides = start_sides(args.train_sides, sub)
    curves: dict[str, list] = {s.name: [] for s in sides}
    times = {s.name: 0.0 for s in sides}
    cpu = {s.name: 0.0 for s in sides}
    try:
        for i in range(args.train_iterations + 1):
            if i % args.eval_every == 0 or i == args.train_iterations:
                for s in sides:
                    r = s.ask("eval", args.eval_size)
                    curves[s.name].append({"iteration": i, "train_seconds": times[s.name],
                                           "train_cpu_seconds": cpu[s.name], **r})
                    print(f"[b] {s.name:13s} it {i:4d} train {times[s.name]:8.1f} s "
                          f"test bpd {r['test_bits_per_dim']:.4f}", flush=True)
            if i == args.train_iterations:
                break
            for s in (sides if i % 2 == 0 else sides[::-1]):
                row = s.ask("iter", (i, args.train_batch_size))
                times[s.name] += row["seconds"]
                cpu[s.name] += row["cpu_seconds"]
    finally:
        for s in sides:
            s.stop()
    return {"data": args.train_data, "iterations": args.train_iterations, "batch_size": args.train_batch_size,
            "eval_every": args.eval_every, "eval_size": args.eval_size, "curves": curves,
            "parameters": {s.name: s.info["parameters"] for s in sides}}


# ---- profile ------------------------------------------------------------------------------------
def profile(args, out: Path) -> None:
    """torch.profiler over one training iteration of each fastcnf side of ``--sides``, one
    thread; writes the operator tables to ``out``. Run it with ``--sides fastcnf-jvp`` last:
    that side replaces the block ODE's ``forward`` in this process."""
    torch.set_num_threads(args.threads)
    out.write_text("")
    for side in [s for s in args.sides if s.startswith("fastcnf")]:
        _profile_side(args, side, out)


def _profile_side(args, side: str, out: Path) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model, info, levels = build_fastcnf_side(args, side)
    train, _, _ = baseline.load_images(args.data, args.root)
    x = make_batch(train, levels, args.batch_size, args.seed, 0)
    torch.manual_seed(args.seed)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        loss = model.bits_per_dim(x).mean()
        forward_s = time.perf_counter() - start
        loss.backward()
        total_s = time.perf_counter() - start
    fwd, bwd = nfe_fastcnf(model)
    ka = prof.key_averages()
    header = (f"# speed_images profile: side {side}, recipe {args.recipe} {' '.join(cfg_overrides(args))}\n"
              f"# batch {args.batch_size}, {args.threads} thread(s), {machine()}\n"
              f"# commit {commit()[:7]} (working tree may differ), load {load_average()}\n"
              f"# one training iteration under the profiler: {total_s:.2f} s wall (forward solve {forward_s:.2f} s),"
              f" NFE {fwd} forward / {bwd} backward, {sum(p.numel() for p in model.parameters()):,} parameters\n")
    with open(out, "a") as fh:
        fh.write(header + "\n## by self CPU time\n")
        fh.write(ka.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60) + "\n")
        fh.write("## by total CPU time (inclusive)\n")
        fh.write(ka.table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=60) + "\n")
    print(header)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sides", nargs="+", default=["ffjord", "fastcnf"], choices=SIDES)
    p.add_argument("--data", default="mnist-test-split", choices=["mnist-test-split", "digits"])
    p.add_argument("--root", default=str(baseline.DEFAULT_MNIST_ROOT))
    p.add_argument("--recipe", default="mnist-ffjord")
    p.add_argument("--fastcnf-set", nargs="*", default=[], help="extra --set overrides of the fastcnf sides")
    p.add_argument("--num-blocks", type=int, default=1)
    p.add_argument("--dims", default="64,64,64")
    p.add_argument("--iterations", type=int, default=3, help="(a) interleaved iterations per side (0: skip)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--memory", action="store_true",
                   help="(a) also one iteration per side under torch.profiler: peak bytes of live tensors")
    p.add_argument("--train-iterations", type=int, default=0, help="(b) training-run length N (0: skip)")
    p.add_argument("--train-sides", nargs="+", default=["ffjord", "fastcnf"], choices=SIDES)
    p.add_argument("--train-data", default="digits", choices=["mnist-test-split", "digits"])
    p.add_argument("--train-recipe", default="mnist-ffjord")
    p.add_argument("--train-batch-size", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-size", type=int, default=360)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--fast-recipe", default=None,
                   help="(c) time to quality of this recipe (default: digits-fast / mnist-fast for --train-data)")
    p.add_argument("--fast-set", nargs="*", default=[], help="(c) extra --set overrides of the fast recipe")
    p.add_argument("--ttq", action="store_true",
                   help="(c) time to quality: the fast recipe until it reaches the baseline's bits/dim at N")
    p.add_argument("--ttq-from", default=None,
                   help="(c) take the target (the ffjord side's last bits/dim) and its train seconds from this "
                        "JSON's part (b) instead of running (b)")
    p.add_argument("--ttq-max-iterations", type=int, default=2000)
    p.add_argument("--ttq-eval-every", type=int, default=10)
    p.add_argument("--ablation", action="store_true",
                   help="(c) also one run per fast-recipe setting reverted to FFJORD's (leave one out)")
    p.add_argument("--ablation-max-fraction", type=float, default=0.5,
                   help="(c) stop an ablation run after this fraction of the baseline's train seconds")
    p.add_argument("--profile", default=None, help="write a torch.profiler table of one fastcnf iteration here")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if "fastcnf-cl" in args.sides + args.train_sides and \
            load_recipe(args.recipe, cfg_overrides(args)).model.layer_type != "concatsquash":
        # mnist-ffjord builds FFJORD's concat layers: the layout switch would do nothing
        p.error("side fastcnf-cl needs concat-squash conv dynamics: add --fastcnf-set model.layer_type=concatsquash")
    if args.memory and args.device != "cpu":
        p.error("--memory counts CPU tensors; on CUDA every row reports torch.cuda.max_memory_allocated")
    if args.profile:
        profile(args, Path(args.profile))
        return {}
    result = {**run_metadata(__file__, argv),
              "threads_per_side": args.threads, "device": args.device, "targets": TARGETS,
              "settings": {k: v for k, v in vars(args).items() if k not in ("json",)},
              "note": "2 CPU cores shared with other engineers' jobs: all sides ran concurrently with "
                      "other processes; wall times vary, CPU times are steadier"}
    with tempfile.TemporaryDirectory() as tmp:
        args.weights_file = str(Path(tmp) / "weights.pt")
        if args.iterations:
            result["per_iteration"] = per_iteration(args)
            args.weights_file = str(Path(tmp) / "weights_b.pt")
        if args.train_iterations:
            result["training_run"] = training_run(args)
    if args.ttq:
        source = result if args.train_iterations else json.loads(Path(args.ttq_from).read_text())
        if args.ttq_from and not args.train_iterations:
            result["ttq_from"] = {"file": args.ttq_from, "command": source.get("command")}
            for key in ("dims", "num_blocks", "seed", "root", "eval_size"):  # the same model, seed and test subset
                setattr(args, key, source["settings"][key])
        run = source["training_run"]
        ref = run["curves"]["ffjord"][-1]
        result["time_to_quality"] = ttq.run(args, run["data"], ref["test_bits_per_dim"], ref["train_seconds"])
        fast = result["time_to_quality"]["fast"]
        print(f"time to quality: {fast['recipe']} reached {fast['target_bits_per_dim']:.4f} bits/dim: "
              f"{fast['reached']}, {fast['train_seconds']} s of the baseline's {ref['train_seconds']:.1f} s "
              f"(ratio {fast['time_ratio']})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if "per_iteration" in result:
        for k, v in result["per_iteration"]["speedup"].items():
            print(f"speedup {k}: wall {v['wall']:.2f}x, cpu {v['cpu']:.2f}x")
    return result


if __name__ == "__main__":
    main()
