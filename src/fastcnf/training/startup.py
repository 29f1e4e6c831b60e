"""What a run decides before its first step: each block's gradient path, and the line that says so.

:func:`plan_gradients` runs the training loss once on the first batch with every CNF block in
planning mode (:func:`fastcnf.cnf.gradient.planning`): under ``solver.gradient=auto`` each block
solves that batch without gradients and measures one evaluation's saved tensors, then records the
fastest exact path that fits its memory budget. The batch order and the random streams are restored
afterwards, so the run trains exactly as without the pass. :func:`start_line` is the one line
``fastcnf train`` prints first: recipe, data split, parameters, gradient path per block, device,
threads.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from fastcnf.cnf.gradient import gradient_paths, planning
from fastcnf.method import StepContext

__all__ = ["plan_gradients", "start_line", "precision_notes"]


def plan_gradients(trainer: Any) -> dict[str, dict[str, str]]:
    """Plan every block's gradient path on the trainer's next batch; returns
    :func:`fastcnf.cnf.gradient.gradient_paths` (empty when training solves no ODE, e.g. flow matching)."""
    model, batcher = trainer.model, trainer.batcher
    order = copy.deepcopy(batcher.state_dict())
    devices = [trainer.device] if trainer.device.type == "cuda" else []
    was_training = model.training
    with torch.random.fork_rng(devices=devices):
        x, y = trainer.task.prepare(*batcher.next())
        ctx = StepContext(x=x.to(trainer.device, trainer.dtype), y=None if y is None else y.to(trainer.device),
                          iteration=trainer.iteration)
        model.train()
        with planning(model):
            trainer.task.step(model, ctx)
    batcher.load_state_dict(order)
    model.train(was_training)
    return gradient_paths(model)


def _short(why: str) -> str:
    return why.split(";")[0]


def start_line(trainer: Any, paths: dict[str, dict[str, str]]) -> str:
    """``fastcnf train``'s first line: recipe, data split, parameters, gradient path per block, device,
    threads, and what the methods' hooks add (``Hook.start_note``)."""
    cfg, bundle = trainer.cfg, trainer.bundle
    n_params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    if paths:
        grads = ", ".join(f"{name} {p['path']}" + (" bf16" if p["backward_precision"] == "bfloat16" else "")
                          + f" ({_short(p['why'])})" for name, p in paths.items())
    else:
        grads = "none (training solves no ODE)"
    notes = "".join(f" | {note}" for note in (h.start_note(trainer) for h in trainer.hooks) if note)
    return (f"fastcnf train: recipe {cfg.recipe or '-'} | data {bundle.name} ({bundle.split}) | {n_params:,} parameters | gradient: {grads} | "
            f"device {trainer.device} | threads {torch.get_num_threads()}{notes}")


def precision_notes(paths: dict[str, dict[str, str]]) -> list[str]:
    """One line per distinct reason a requested bfloat16 backward pass was not honoured."""
    notes = []
    for p in paths.values():
        for part in p["why"].split("; "):
            if "not honoured" in part and part not in notes:
                notes.append(part)
    return notes
