"""One rank of the exit test: join the group, one all-reduce, buffered output, then leave the way the
``fastcnf`` command does (:func:`leave_at_exit`, :func:`exit_process`)."""
from __future__ import annotations

import sys

import torch

from fastcnf.training import distributed as ddp


def main() -> None:
    ctx = ddp.init_distributed()
    t = torch.tensor([float(ctx.rank + 1)])
    torch.distributed.all_reduce(t)
    print(f"rank {ctx.rank} of {ctx.world_size}: sum {t.item():g}", end="")  # block-buffered into a pipe
    ddp.leave_at_exit()
    ddp.exit_process(0)
    print("unreachable")
    sys.exit(3)


if __name__ == "__main__":
    main()
