"""CPU time of one Adam step on a recipe's model: torch's per-tensor loop, ``foreach`` and ``fused``.

The trainer builds Adam/AdamW with ``fused=True`` where every trained tensor takes it
(:func:`fastcnf.training.schedules.build_optimizer`); this measures what that saves, on random
gradients, one thread, ``--steps`` steps after 20 warm-up steps, and checks that the three give the
same weights after those steps.

    python benchmarks/adam_step.py --recipe toy-fm --json benchmarks/results/adam_step.json
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import RESULTS, load_average, run_metadata, write_json

import torch  # noqa: E402  (after common: this checkout's fastcnf first)

from fastcnf.data import load_data  # noqa: E402
from fastcnf.methods import load_recipe  # noqa: E402
from fastcnf.training.trainer import TASKS  # noqa: E402

VARIANTS = {"per-tensor loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="toy-fm")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--json", type=Path, default=RESULTS / "adam_step.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    meta = run_metadata(__file__, argv)
    cfg = load_recipe(args.recipe, ["threads=1", "data.n_test=100"])
    model = TASKS[cfg.task](cfg, load_data(cfg.data, cfg.seed)).build_model()
    start = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    grads = [[torch.randn(p.shape, generator=g) for p in start] for _ in range(8)]
    out: dict = {"recipe": args.recipe, "tensors": len(start), "parameters": sum(p.numel() for p in start),
                 "steps": args.steps, "load_average_before": load_average(), "variants": {}}
    finals = {}
    for name, kw in VARIANTS.items():
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = torch.optim.Adam(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, **kw)
        for i in range(20 + args.steps):
            if i == 20:
                t0 = time.process_time()
            for q, gr in zip(params, grads[i % len(grads)]):
                q.grad = gr
            opt.step()
        ms = (time.process_time() - t0) / args.steps * 1e3
        finals[name] = params
        out["variants"][name] = {"cpu_ms_per_step": ms}
        print(f"{name}: {ms:.3f} ms per step (CPU)", flush=True)
    ref = finals["per-tensor loop"]
    for name, params in finals.items():
        out["variants"][name]["max_abs_diff_to_loop"] = max(float((a - b).detach().abs().max()) for a, b in zip(params, ref))
    out["load_average_after"] = load_average()
    write_json(args.json, {**meta, **out})
    print(out)


if __name__ == "__main__":
    main()
