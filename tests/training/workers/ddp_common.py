"""Shared tiny configuration of the distributed tests: deterministic (exact trace, fixed-step rk4,
float64, toy sampler), so W processes must reproduce one process on the global batch."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastcnf.methods import load_recipe

DETERMINISTIC = [
    "dtype=float64", "model.hidden_dims=[8,8]", "model.divergence=exact", "solver.method=rk4",
    "solver.step_size=0.25", "train.batch_size=16", "train.lr=1e-2", "train.checkpoint_every=0",
    "data.n_test=64", "eval.batch_size=64", "threads=1",
]


def det_cfg(*extra: str):
    return load_recipe("toy-ffjord", DETERMINISTIC + list(extra))


def run_steps(trainer, n: int) -> list[float]:
    """``n`` optimiser steps without fit()'s evaluation and files; returns the logged losses."""
    losses = []
    for _ in range(n):
        ctx = trainer.train_step()
        trainer.iteration += 1
        losses.append(trainer._row(ctx, 0.0)["loss"])
    return losses


def params(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_ranks(worker: Path, args: list[str]) -> list[str]:
    """Run ``worker`` as 2 ranks with torchrun's environment (gloo, 127.0.0.1, a free port); fails
    the test on a timeout or a non-zero exit; returns each rank's output."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    port = free_port()
    src = str(Path(__file__).resolve().parents[3] / "src")
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, str(worker), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("2-process run timed out")
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return logs
