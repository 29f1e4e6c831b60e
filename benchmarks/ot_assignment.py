"""The exact minibatch assignment alone, side by side in one run: scipy's ``linear_sum_assignment``
vs POT's network simplex (``ot.emd``, what ``ExactOTCoupling`` now tries first), on a toy batch
against standard-normal noise (float64 squared distances by ``torch.cdist``). Process CPU time per
solve (one thread), median over ``--repeats`` alternating solves; the permutations are checked equal.

    PYTHONPATH=src .venv/bin/python benchmarks/ot_assignment.py --json benchmarks/results/ot_assignment.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fastcnf.data import load_data  # noqa: E402
from fastcnf.flow_matching.pairing import _emd_permutation, squared_distances  # noqa: E402
from fastcnf.methods import load_recipe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", default=["8gaussians", "checkerboard"])
    ap.add_argument("--batch", nargs="+", type=int, default=[64, 256, 1024])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows, load0 = [], os.getloadavg()
    for name in a.data:
        bundle = load_data(load_recipe("toy-otcfm", [f"data.name={name}"]).data)
        for b in a.batch:
            rng, g = np.random.default_rng(0), torch.Generator().manual_seed(0)
            times = {"scipy": [], "pot_emd": []}
            equal = True
            for _ in range(a.repeats):
                x, _ = bundle.sampler(b, rng)
                cost = squared_distances(x, torch.randn(b, x.shape[1], generator=g)).numpy()
                c0 = time.process_time()
                r, cols = linear_sum_assignment(cost)
                c1 = time.process_time()
                index = _emd_permutation(cost)
                c2 = time.process_time()
                times["scipy"].append(c1 - c0)
                times["pot_emd"].append(c2 - c1)
                equal &= index is not None and bool(np.array_equal(index[r], cols))
            row = {"data": name, "batch": b, "equal": equal,
                   **{f"{k}_ms": 1e3 * statistics.median(v) for k, v in times.items()}}
            row["speedup"] = row["scipy_ms"] / row["pot_emd_ms"]
            rows.append(row)
            print(f"{name:12s} B={b:5d} scipy {row['scipy_ms']:8.2f} ms  ot.emd {row['pot_emd_ms']:8.2f} ms "
                  f"({row['speedup']:.2f}x)  equal={equal}")
    out = {"rows": rows, "load_before": load0, "load_after": os.getloadavg(), "torch": torch.__version__}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
