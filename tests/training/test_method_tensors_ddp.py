"""Every tensor a method steps itself (TO-FLOW's T in both orders, the learned tolerance gates, the
parts' optimiser groups) trains under a 2-process gloo run exactly as in one process on the same
global batch: the trainer averages their gradients over the processes before each of their steps
(fastcnf.method.OwnOptimizer), so no rank learns from its own shard only."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from ddp_common import det_cfg, launch_two_ranks, params, run_steps  # noqa: E402
from method_variants import VARIANTS  # noqa: E402

from fastcnf.training.trainer import Trainer  # noqa: E402

STEPS = 4
WORKER = Path(__file__).parent / "workers" / "method_worker.py"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp_methods")
    launch_two_ranks(WORKER, [str(out), str(STEPS)])
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_ranks_equal_one_process_for_every_hook_stepped_tensor(two_ranks, variant) -> None:
    r0, r1 = (r[variant] for r in two_ranks)
    assert r0["agree"] and r1["agree"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # endtime.order=simultaneous is deprecated
        single = Trainer(det_cfg(f"train.iterations={STEPS}", *VARIANTS[variant]), "unused", progress=False)
    losses = run_steps(single, STEPS)
    one = params(single)
    moved = [k for k in one if "end_time" in k or "gates" in k]
    for k in one:
        if "tolerance_policy.gates" in k:
            # the gates sample their tolerance on each shard's input: equal across ranks, not to one process
            torch.testing.assert_close(r0["params"][k], r1["params"][k], atol=0, rtol=0, msg=k)
            continue
        torch.testing.assert_close(r0["params"][k], one[k], atol=1e-10, rtol=0, msg=f"{variant}: {k}")
        torch.testing.assert_close(r1["params"][k], one[k], atol=1e-10, rtol=0, msg=f"{variant}: {k}")
    if variant.startswith("toflow"):
        ends = [k for k in one if k.endswith("end_time")]
        assert ends and all(float(one[k]) != 0.5 for k in ends)  # T moved (and equals one process's)
    assert r0["losses"] == pytest.approx(losses, abs=1e-10)
    assert moved or variant == "parts"
