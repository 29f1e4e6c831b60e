"""Part (c) of ``speed_images.py``: time to quality on images.

fastcnf trains the same model as FFJORD's baseline (FFJORD's multiscale concat CNF at the
benchmark's size) with a *fast* recipe (``digits-fast`` / ``mnist-fast``: any combination of
fastcnf's features) through its one trainer (``fastcnf.Trainer.train_step``), and the clock
stops when its bits/dim on the baseline's fixed test subset (same images, same dequantisation
noise, same Hutchinson noise, eval solver dopri5 1e-5) reaches the baseline's bits/dim at
iteration N of part (b). Time = the sum of the training steps' wall seconds, as for the
baseline's ``train_seconds`` (evaluations excluded on both sides).

The ablation (``--ablation``) is leave-one-out: for every setting in which the fast recipe differs
from FFJORD's (the faithful recipe ``mnist-ffjord`` with the same data and size), one run with that
setting reverted to FFJORD's value; a group of keys that act together (both solver tolerances, the
two RNODE weights) is reverted together. The differences are found by comparing the two resolved
configurations, so the table covers exactly what the recipe changes.
"""
from __future__ import annotations

import tempfile
import time

import numpy as np
import torch

import ffjord_multiscale_baseline as baseline
from fastcnf import Trainer, load_recipe
from fastcnf.config import config_to_dict
from fastcnf.evaluation.metrics import fork_rng

FAST_RECIPES = {"digits": "digits-fast", "mnist-test-split": "mnist-fast"}
FAITHFUL_RECIPE = "mnist-ffjord"
#: keys reverted together in the ablation (one ingredient each)
GROUPS = {"solver.atol": "solver tolerance", "solver.rtol": "solver tolerance",
          "model.kinetic_weight": "RNODE regularisers", "model.jacobian_weight": "RNODE regularisers"}
#: keys that describe a run rather than the training method
IGNORED = ("description", "recipe", "train.iterations", "train.checkpoint_every", "train.log_every", "eval.",
           "threads", "seed", "data.")


def model_overrides(args, data: str) -> list[str]:
    """The benchmark's data set, model size and seed, as ``--set`` overrides of a fastcnf recipe
    (every fastcnf side of ``speed_images.py`` builds its model from these)."""
    out = [f"data.name={data}", f"model.num_blocks={args.num_blocks}", f"model.hidden_dims=[{args.dims}]",
           f"seed={args.seed}"]
    return out + ([f"data.root={args.root}"] if data != "digits" else [])


def fast_overrides(args, data: str) -> list[str]:
    """:func:`model_overrides` plus the run-keeping ones of a time-to-quality run."""
    return model_overrides(args, data) + [f"threads={args.threads}", "train.checkpoint_every=0",
                                          "eval.figures=false", f"train.iterations={args.ttq_max_iterations}",
                                          f"device={args.device}"]


def test_subset(test: np.ndarray, levels: int, n: int, seed: int) -> torch.Tensor:
    """The fixed test images every side is evaluated on: the first ``n``, dequantised with a fixed seed."""
    return baseline.dequantize_batch(test[:n], levels, np.random.RandomState(seed + 1))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def ingredients(recipe: str, args, data: str) -> dict[str, list[str]]:
    """``{ingredient: overrides reverting it to FFJORD's setting}`` for ``recipe`` on ``data``."""
    common = fast_overrides(args, data)
    fast = _flat(config_to_dict(load_recipe(recipe, common)))
    ffjord = _flat(config_to_dict(load_recipe(FAITHFUL_RECIPE, common)))
    out: dict[str, list[str]] = {}
    for key in sorted(set(fast) | set(ffjord)):
        if key.startswith(IGNORED) or fast.get(key) == ffjord.get(key):
            continue
        value = ffjord.get(key)
        text = "null" if value is None else (str(value).lower() if isinstance(value, bool) else str(value))
        if isinstance(value, (list, tuple)):
            text = "[" + ",".join(str(v) for v in value) + "]"
        out.setdefault(GROUPS.get(key, key), []).append(f"{key}={text}")
    return out


def fastcnf_bits_per_dim(model, x_test: torch.Tensor, seed: int) -> float:
    """A fastcnf model's test bits/dim (eval mode, no gradients, fixed Hutchinson noise)."""
    model.eval()
    with fork_rng(seed + 7), torch.no_grad():  # the evaluation's noise must not shift the training's stream
        bpd = float(torch.cat([model.bits_per_dim(x_test[i:i + 200]) for i in range(0, len(x_test), 200)]).mean())
    model.train()
    return bpd


def time_to_quality(args, data: str, recipe: str, extra: list[str], target: float, baseline_seconds: float,
                    max_seconds: float | None = None) -> dict:
    """Train ``recipe`` (+ ``extra`` overrides) until its test bits/dim <= ``target``.

    Evaluates every ``args.ttq_eval_every`` iterations; stops at ``args.ttq_max_iterations`` or
    once the training seconds pass ``max_seconds``.
    """
    torch.set_num_threads(args.threads)
    cfg = load_recipe(recipe, fast_overrides(args, data) + list(extra))
    _, test, levels = baseline.load_images(data, args.root)
    device = torch.device(args.device)
    x_test = test_subset(test, levels, args.eval_size, args.seed).to(device)
    curve, nfe, seconds, cpu, reached = [], [], 0.0, 0.0, None
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, tmp, progress=False)
        model = trainer.model
        n_params = sum(p.numel() for p in model.parameters())
        for i in range(cfg.train.iterations + 1):
            if i % args.ttq_eval_every == 0 or i == cfg.train.iterations:
                bpd = fastcnf_bits_per_dim(model, x_test, args.seed)
                curve.append({"iteration": i, "train_seconds": seconds, "cpu_seconds": cpu, "test_bits_per_dim": bpd})
                print(f"[c] {recipe} {' '.join(extra)} it {i:4d} train {seconds:8.1f} s test bpd {bpd:.4f} "
                      f"(target {target:.4f})", flush=True)
                if bpd <= target:
                    reached = curve[-1]
                    break
                if max_seconds is not None and seconds > max_seconds:
                    break
            if i == cfg.train.iterations:
                break
            t0, c0 = time.perf_counter(), time.process_time()
            ctx = trainer.train_step()
            trainer.iteration += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - t0
            cpu += time.process_time() - c0
            nfe.append([float(v) for v in ctx["nfe"]])
    return {"recipe": recipe, "overrides": list(extra), "parameters": n_params, "target_bits_per_dim": target,
            "baseline_train_seconds": baseline_seconds, "reached": reached is not None,
            "iterations": reached["iteration"] if reached else None,
            "train_seconds": reached["train_seconds"] if reached else None,
            "time_ratio": reached["train_seconds"] / baseline_seconds if reached else None,
            "stopped_at": {"iteration": curve[-1]["iteration"], "train_seconds": seconds,
                           "test_bits_per_dim": curve[-1]["test_bits_per_dim"]},
            "nfe_forward_mean": float(np.mean([f for f, _ in nfe])) if nfe else None,
            "nfe_backward_mean": float(np.mean([b for _, b in nfe])) if nfe else None,
            "curve": curve, "nfe": nfe}


def run(args, data: str, target: float, baseline_seconds: float) -> dict:
    """The fast recipe's time to ``target``, then (``args.ablation``) leave-one-out runs."""
    recipe = args.fast_recipe or FAST_RECIPES[data]
    out = {"data": data, "recipe": recipe, "target_bits_per_dim": target, "baseline_train_seconds": baseline_seconds,
           "fast": time_to_quality(args, data, recipe, args.fast_set, target, baseline_seconds)}
    if args.ablation:
        cap = args.ablation_max_fraction * baseline_seconds
        out["ablation"] = {}
        for name, revert in ingredients(recipe, args, data).items():
            out["ablation"][name] = time_to_quality(args, data, recipe, args.fast_set + revert, target,
                                                    baseline_seconds, max_seconds=cap)
        out["ablation_max_seconds"] = cap
    return out
