"""One rank of the 2-process test (launched by tests/training/test_distributed.py with torchrun's variables set)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from ddp_common import det_cfg, params, run_steps  # noqa: E402

from fastcnf.training import distributed as ddp  # noqa: E402
from fastcnf.training.trainer import Trainer  # noqa: E402


def main(out: Path, steps: int) -> None:
    torch.set_num_threads(1)
    results = {}
    a = Trainer(det_cfg(f"train.iterations={steps}"), out / "uninterrupted", progress=False)
    results["losses"] = run_steps(a, steps)
    results["params"] = params(a)
    results["agree"] = ddp.parameters_agree(list(a.model.parameters()))
    # interrupted after half the steps: checkpoint by rank 0, loaded by every rank
    b = Trainer(det_cfg(f"train.iterations={steps}"), out / "resumed", progress=False)
    run_steps(b, steps // 2)
    b.save()
    del b
    c = Trainer(det_cfg(f"train.iterations={steps}"), out / "resumed", resume=True, progress=False)
    run_steps(c, steps - c.iteration)
    results["resumed"] = params(c)
    # accumulation on top of data parallelism: 2 ranks x 2 micro-batches
    d = Trainer(det_cfg(f"train.iterations={steps}", "train.accumulation_steps=2"), out / "accum", progress=False)
    run_steps(d, steps)
    results["accum"] = params(d)
    # flow matching under data parallelism: each rank draws its own noise and times for its shard
    fm = Trainer(det_cfg(f"train.iterations={steps}", "train.objective=flow_matching", "model.end_time=1.0",
                         "flow_matching.coupling=exact"), out / "fm", progress=False)
    start = params(fm)
    results["fm_losses"] = run_steps(fm, steps)
    results["fm_params"] = params(fm)
    results["fm_start"] = start
    results["rank"] = a.dist.rank
    results["world"] = a.dist.world_size
    torch.save(results, out / f"rank{a.dist.rank}.pt")
    # the command line's way to end under torchrun: a barrier, then os._exit without the process group's
    # destructors (destroy_process_group at the end let gloo abort a rank now and then)
    ddp.leave_at_exit()
    ddp.exit_process(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
