"""The optimiser and its learning-rate schedule: scaling with the global batch, linear warm-up,
then constant, step decay or cosine.

The learning rate at iteration i (0-based, the rate used by step i+1) is
``base * warmup(i) * decay(i)``; large-batch recipes scale ``base`` with the batch size
(Goyal et al. 2017; Nguyen et al., "On Mixed Conditional FFJORD with Large-Batch
Training", §3; Nguyen et al. 2019, "InfoCNF", §4.5) before it reaches this module.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from fastcnf.config import Config, TrainConfig

__all__ = ["LRSchedule", "build_optimizer", "set_group_lrs", "LR_SCALING", "scaled_lr", "large_batch_summary"]


@dataclass
class LRSchedule:
    """Learning rate as a pure function of the iteration (so resuming needs no schedule state).

    Args:
        base_lr: rate after warm-up and before decay.
        kind: constant, step or cosine.
        total_iterations: length of the run (cosine).
        warmup_iterations: linear warm-up from base_lr / warmup to base_lr over this many steps.
        decay_at: step-decay boundaries, in iterations (convert epochs with ``steps_per_epoch``).
        decay_factor: multiplicative factor at each boundary.
        min_lr: cosine floor.
    """

    base_lr: float
    kind: str = "constant"
    total_iterations: int = 1
    warmup_iterations: int = 0
    decay_at: tuple[int, ...] = ()
    decay_factor: float = 0.1
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "step", "cosine"):
            raise ValueError(f"unknown schedule {self.kind!r}; accepted: constant, step, cosine")
        self.decay_at = tuple(sorted(int(b) for b in self.decay_at))

    def __call__(self, iteration: int) -> float:
        lr = self.base_lr
        if self.kind == "step":
            lr *= self.decay_factor ** bisect.bisect_right(self.decay_at, iteration)
        elif self.kind == "cosine":
            span = max(self.total_iterations - self.warmup_iterations, 1)
            progress = min(max(iteration - self.warmup_iterations, 0) / span, 1.0)
            lr = self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * progress))
        if self.warmup_iterations > 0 and iteration < self.warmup_iterations:
            lr *= (iteration + 1) / self.warmup_iterations
        return lr

    @classmethod
    def from_config(cls, train, steps_per_epoch: int, base_lr: float | None = None) -> "LRSchedule":
        """Build from a :class:`fastcnf.config.TrainConfig` (``decay_unit`` epochs -> iterations)."""
        scale = steps_per_epoch if train.decay_unit == "epochs" else 1
        return cls(
            base_lr=train.lr if base_lr is None else base_lr,
            kind=train.schedule,
            total_iterations=train.iterations,
            warmup_iterations=train.warmup_iterations,
            decay_at=tuple(int(b) * scale for b in train.decay_at),
            decay_factor=train.decay_factor,
            min_lr=train.min_lr,
        )


def build_optimizer(train: TrainConfig, model: nn.Module, hooks: list, trainer,
                    excluded: list | tuple = ()) -> torch.optim.Optimizer:
    """Adam / AdamW over the model's parameters, minus ``excluded`` (the tensors methods step with
    their own optimisers) and minus those in the hooks' parameter groups, plus those groups. A
    group follows the schedule (times its ``lr_scale``) when ``follow_schedule`` is set (the
    model's group always does); other groups keep their rate."""
    hook_groups = [g for h in hooks for g in h.param_groups(trainer)]
    leave = {id(p) for p in excluded} | {id(p) for g in hook_groups for p in g["params"]}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in leave]
    groups = [{"params": params, "name": "model"}] + hook_groups
    cls = torch.optim.AdamW if train.optimizer == "adamw" else torch.optim.Adam
    opt = cls(groups, lr=train.lr, weight_decay=train.weight_decay, fused=_fusable(groups) or None)
    for g in opt.param_groups:
        g.setdefault("lr_scale", 1.0)
        g.setdefault("follow_schedule", g.get("name") == "model")
        g["initial_lr_group"] = g["lr"]
    return opt


#: the dtypes torch's fused Adam/AdamW kernels take
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fusable(groups: list[dict]) -> bool:
    """Every tensor is a floating-point leaf on one CPU or CUDA device: torch's fused Adam/AdamW kernel
    (one kernel per tensor instead of ~10 operations) takes them. It computes the same update as the
    per-tensor loop (Kingma & Ba 2015, Algorithm 1), 4.5x faster per step on the toys' 9,224
    parameters (0.085 ms against 0.383 ms of CPU per step, one thread: benchmarks/adam_step.py). It does not
    count the weights' new version: the trainer does after each step."""
    tensors = [p for g in groups for p in g["params"]]
    devices = {p.device for p in tensors}
    return bool(tensors) and len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda") \
        and all(p.dtype in _FUSED_DTYPES and p.is_leaf for p in tensors)


def set_group_lrs(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Set every group's rate for this iteration from the scheduled ``lr`` (see
    :func:`build_optimizer`; e.g. TO-FLOW's own Adam rate for T keeps its rate). Returns ``lr``."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g["lr_scale"] if g["follow_schedule"] else g["initial_lr_group"]
    return lr


#: ``train.lr_scaling`` -> ``g(B / B_ref)``, the factor applied to ``train.lr``
LR_SCALING: dict[str, Callable[[float], float]] = {
    "none": lambda ratio: 1.0,
    "linear": lambda ratio: ratio,
    "sqrt": math.sqrt,
}


def scaled_lr(lr: float, global_batch: int, reference_batch: int, rule: str) -> float:
    """``lr * g(global_batch / reference_batch)`` (Goyal et al. 2017; InfoCNF §4.5: 8000 vs 900).

    ``reference_batch <= 0`` means ``global_batch`` (no scaling).

    Example:
        >>> scaled_lr(1e-3, 8000, 800, "linear")
        0.01
    """
    ref = reference_batch if reference_batch > 0 else global_batch
    return lr * LR_SCALING[rule](global_batch / ref)


def large_batch_summary(cfg: Config, world_size: int, effective_lr: float, iterations: int,
                        train_seconds: float) -> dict[str, Any]:
    """The effective batch / learning-rate values of a run (metrics.json)."""
    t = cfg.train
    return {"world_size": world_size, "global_batch_size": t.batch_size,
            "micro_batch_size": t.batch_size // (world_size * t.accumulation_steps),
            "accumulation_steps": t.accumulation_steps, "lr_scaling": t.lr_scaling,
            "reference_batch_size": t.reference_batch_size or t.batch_size,
            "base_lr": t.lr, "effective_lr": effective_lr,
            "examples_per_second": (t.batch_size * iterations / train_seconds) if train_seconds > 0 else None}
