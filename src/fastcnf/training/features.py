"""The static tables of the training layer: the tasks a run can be, and the feature hooks it may
use. Each feature builder returns its hook, or None when the configuration leaves it off."""
from __future__ import annotations

from typing import Callable

from fastcnf.config import Config
from fastcnf.data.base import DataBundle
from fastcnf.reflow.hook import reflow_hook
from fastcnf.training.conditioning import ConditioningHook
from fastcnf.training.endtime import EndTimeHook
from fastcnf.training.hooks import Hook
from fastcnf.training.latent_ode_task import LatentODETask
from fastcnf.training.parts import PartsHook
from fastcnf.training.tasks import DensityTask, Task
from fastcnf.training.tolerances import LearnedToleranceHook, StaticToleranceHook

__all__ = ["TASKS", "FEATURES", "build_hooks"]

#: ``task`` -> task class
TASKS: dict[str, Callable[[Config, DataBundle], Task]] = {"density": DensityTask, "latent_ode": LatentODETask}


def _conditioning(cfg: Config) -> Hook | None:
    c = cfg.conditioning  # flow matching's class-conditional source has no classifier to train
    return ConditioningHook(c.beta, c.kind) if c.kind != "none" and cfg.train.objective == "likelihood" else None


def _end_time(cfg: Config) -> Hook | None:
    return EndTimeHook(cfg) if cfg.endtime.policy in ("toflow", "steer") else None


def _tolerances(cfg: Config) -> Hook | None:
    policy = cfg.tolerances.policy
    if policy == "learned":
        return LearnedToleranceHook(cfg)
    return StaticToleranceHook() if policy == "per_block" else None


def _parts(cfg: Config) -> Hook | None:
    return PartsHook(cfg) if cfg.parts.enabled else None


#: the feature hooks, in the order the trainer calls them
FEATURES: list[Callable[[Config], Hook | None]] = [reflow_hook, _conditioning, _end_time, _tolerances, _parts]


def build_hooks(cfg: Config) -> list[Hook]:
    """The hooks of the features ``cfg`` turns on."""
    return [h for h in (build(cfg) for build in FEATURES) if h is not None]
