"""One rank of the methods' data-parallel test (launched by tests/training/test_method_tensors_ddp.py):
every method whose hook steps tensors itself, trained for a few steps on this rank's shard."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from ddp_common import det_cfg, params, run_steps  # noqa: E402
from method_variants import VARIANTS  # noqa: E402

from fastcnf.training import distributed as ddp  # noqa: E402
from fastcnf.training.trainer import Trainer  # noqa: E402


def main(out: Path, steps: int) -> None:
    torch.set_num_threads(1)
    results = {}
    for name, overrides in VARIANTS.items():
        t = Trainer(det_cfg(f"train.iterations={steps}", *overrides), out / name, progress=False)
        results[name] = {"losses": run_steps(t, steps), "params": params(t),
                         "agree": ddp.parameters_agree(list(t.model.parameters()))}
        rank = t.dist.rank
    torch.save(results, out / f"rank{rank}.pt")
    # the command line's way to end under torchrun: a barrier, then os._exit without the process group's
    # destructors (destroy_process_group at the end let gloo abort a rank now and then)
    ddp.leave_at_exit()
    ddp.exit_process(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
