"""Learned-tolerance gates under data parallelism (gloo, 2 processes): the gates start from rank
0's and their REINFORCE gradients are averaged, so every rank keeps the same gates although each
rank samples its own tolerances and sees its own shard's NFE."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import launch_two_ranks  # noqa: E402

WORKER = Path(__file__).parent / "tolerance_worker.py"


def test_learned_tolerance_gates_stay_identical_on_two_ranks(tmp_path) -> None:
    launch_two_ranks(WORKER, [str(tmp_path), "3"])
    r0, r1 = (torch.load(tmp_path / f"gates{r}.pt", weights_only=False) for r in range(2))
    assert r0["agree"] and r1["agree"]
    assert r0["gates"].keys() == r1["gates"].keys()
    for k in r0["gates"]:
        torch.testing.assert_close(r0["gates"][k], r1["gates"][k], atol=0, rtol=0, msg=f"gate {k} differs")
    # the gates did learn (they moved away from their initial head bias)
    bias = [v for k, v in r0["gates"].items() if k.endswith("head.bias")]
    assert bias and any(abs(float(b[0]) + 4.0) > 1e-6 for b in bias)
