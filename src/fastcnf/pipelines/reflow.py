"""Reflow and distillation from a run directory: draw the teacher's pairs into the new run, then
train the student there with the one trainer (:class:`fastcnf.training.trainer.Trainer`).

A rerun with the same arguments continues: missing pair chunks are drawn, and training resumes
from the new run's checkpoint.

References: Liu et al. 2023, "Flow Straight and Fast: Learning to Generate and Transfer Data with
Rectified Flow", §2.2 (reflow, k-rectified flows), §2.3 (distillation).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn

from fastcnf.config import Config
from fastcnf.methods import load_recipe, load_run_config
from fastcnf.reflow.pairs import PAIRS_FILE, generate_pairs
from fastcnf.training.runlog import write_metrics
from fastcnf.training.trainer import Trainer

__all__ = ["student_config", "reflow_run"]


def student_config(teacher_dir: str | Path, out_dir: str | Path, recipe: str | None = None,
                   overrides: list[str] | None = None, grid_steps: int = 0) -> Config:
    """The student's configuration: ``recipe`` (e.g. ``toy-reflow``) or else the teacher's own,
    trained by flow matching on ``out_dir/pairs.npz`` from the teacher's weights; ``overrides``
    (``--set``) come last."""
    # absolute paths: the run resumes and re-evaluates from any working directory
    teacher_ckpt = (Path(teacher_dir) / "checkpoints" / "last.pt").resolve()
    fixed = [f"reflow.pairs={(Path(out_dir) / PAIRS_FILE).resolve()}", f"reflow.teacher={teacher_ckpt}",
             f"reflow.grid_steps={int(grid_steps)}", "train.objective=flow_matching"]
    sets = fixed + list(overrides or [])
    return load_recipe(recipe, sets) if recipe else load_run_config(teacher_dir, sets)


def reflow_run(teacher: nn.Module, teacher_dir: str | Path, out_dir: str | Path, n_pairs: int,
               recipe: str | None = None, overrides: list[str] | None = None, grid_steps: int = 0,
               teacher_method: str | None = None, teacher_steps: int | None = None, chunk_size: int = 1000,
               seed: int | None = None, quiet: bool = False, progress: bool = True) -> dict[str, Any]:
    """Draw ``n_pairs`` pairs from ``teacher`` (loaded from ``teacher_dir``) into ``out_dir`` and
    train the student there; returns the student's metrics (``metrics.json``, with
    ``pair_seconds``, the wall time of this call's pair generation).

    Args:
        grid_steps: 0 for reflow; ``k`` distils to k Euler steps (:class:`~fastcnf.reflow.hook.GridTime`).
        teacher_method, teacher_steps: decode the teacher with a fixed-step solver (default: its
            evaluation solver, the accurate endpoint).
        seed: seed of the pairs (default: the student's ``seed``).
    """
    out_dir = Path(out_dir)
    cfg = student_config(teacher_dir, out_dir, recipe, overrides, grid_steps)  # bad keys fail before any work
    start = time.perf_counter()
    generate_pairs(teacher, n_pairs, out_dir, seed=cfg.seed if seed is None else seed, chunk_size=chunk_size,
                   method=teacher_method, steps=teacher_steps, progress=progress and not quiet,
                   meta={"teacher": str(teacher_dir)})
    pair_seconds = time.perf_counter() - start
    resume = (out_dir / "checkpoints" / "last.pt").exists()
    trainer = Trainer.from_run_dir(out_dir, overrides, resume=True, quiet=quiet, progress=progress) if resume \
        else Trainer(cfg, out_dir, quiet=quiet, progress=progress)
    trainer.fit()
    return write_metrics(out_dir, {"pair_seconds": round(pair_seconds, 3), "pairs": n_pairs}, merge=True)
