"""When a training run stops early or saves: termination signals and time-based checkpoints.

Clusters stop jobs with SIGTERM (Slurm, Kubernetes, torchrun) and Slurm can send SIGUSR1 ahead of
a time limit (``sbatch --signal=USR1@120``). While :class:`StopSignals` is installed both only set a
flag; the trainer finishes the current iteration, writes its checkpoint atomically and exits with
:data:`EXIT_CODES` (128 + the signal number, as a shell reports a process killed by it, so
schedulers still see a termination). :class:`CheckpointClock` makes a checkpoint due every
``train.checkpoint_minutes`` besides every ``train.checkpoint_every`` iterations.

Under torchrun the decisions are made once per iteration by :func:`agree`: one all-reduce (maximum)
of (signal number, checkpoint due by rank 0's clock), so every rank stops, or saves, at the same
iteration.
"""
from __future__ import annotations

import signal
import threading
import time
from typing import Any

import torch

__all__ = ["EXIT_CODES", "StopSignals", "CheckpointClock", "agree"]

#: exit code of ``fastcnf train`` after it saved on a signal (Ctrl-C / SIGINT: 130)
EXIT_CODES = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGUSR1: 128 + signal.SIGUSR1}


class StopSignals:
    """Handlers of SIGTERM and SIGUSR1 that record the signal instead of ending the process
    (installed only from the main thread; elsewhere they are left alone). A context manager that
    restores the previous handlers on exit."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in EXIT_CODES:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> "StopSignals":
        return self.install()

    def __exit__(self, *exc) -> bool:
        self.restore()
        return False


class CheckpointClock:
    """A checkpoint is due ``minutes`` after the last one (0: never by time)."""

    def __init__(self, minutes: float) -> None:
        self.seconds = float(minutes) * 60.0
        self.reset()

    def reset(self) -> None:
        self.last = time.monotonic()

    def due(self) -> bool:
        return self.seconds > 0 and time.monotonic() - self.last >= self.seconds


def agree(signum: int, due: bool, distributed: bool, is_main: bool) -> tuple[int, bool]:
    """``(signal to stop on or 0, checkpoint due)``, the same on every rank: the largest signal
    number any rank received, and rank 0's clock (other ranks' clocks are ignored)."""
    due = bool(due) and is_main
    if not distributed:
        return int(signum), due
    import torch.distributed as dist

    t = torch.tensor([float(signum), 1.0 if due else 0.0], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t[0].item()), bool(t[1].item() > 0)
