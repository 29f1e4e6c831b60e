"""One rank of the 2-process validation test (launched by tests/training/test_validation.py with torchrun's
variables set): a whole fit() with validation and early stopping."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from ddp_common import det_cfg, params  # noqa: E402

from fastcnf.training import distributed as ddp  # noqa: E402
from fastcnf.training.trainer import Trainer  # noqa: E402

VALIDATION = ["train.iterations=12", "train.val_every=1", "train.patience=1", "train.lr=0.1", "data.n_train=1000",
              "data.val_fraction=0.1", "eval.figures=false"]


def main(out: Path) -> None:
    torch.set_num_threads(1)
    trainer = Trainer(det_cfg(*VALIDATION), out / "run", progress=False)
    trainer.fit()
    torch.save({"params": params(trainer), "iteration": trainer.iteration, "summary": trainer.early.summary()},
               out / f"rank{trainer.dist.rank}.pt")
    # the command line's way to end under torchrun: a barrier, then os._exit without the process group's
    # destructors (destroy_process_group at the end let gloo abort a rank now and then)
    ddp.leave_at_exit()
    ddp.exit_process(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
