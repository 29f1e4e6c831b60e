"""The end time of each CNF block as a method: fixed (FFJORD), joint, TO-FLOW and STEER.

``endtime.policy`` chooses it (:class:`~fastcnf.endtime.config.EndTimeConfig`); T0 is
``model.end_time``. The model side is :mod:`fastcnf.endtime.policy`, the training side (TO-FLOW's
Algorithm 1 step on T, STEER's logging) :mod:`fastcnf.endtime.hook`. Docs: docs/endtime.md.

References: Du et al. 2022, "TO-FLOW: Efficient Continuous Normalizing Flows with Temporal
Optimization adjoint with Moving Speed"; Ghosh et al. 2020, "STEER: Simple Temporal Regularization
For Neural ODEs"; Grathwohl et al. 2019, "FFJORD".
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from fastcnf.cnf.endtime import EndTimePolicy, FixedEndTime
from fastcnf.config import ConfigError
from fastcnf.endtime.config import EndTimeConfig
from fastcnf.endtime.hook import EndTimeHook
from fastcnf.endtime.policy import LearnedEndTime, RandomEndTime
from fastcnf.method import Hook, Method

__all__ = ["END_TIME", "EndTimeMethod", "POLICIES"]

#: ``endtime.policy`` -> ``(T0, section) -> EndTimePolicy``
POLICIES: dict[str, Callable[[float, EndTimeConfig], EndTimePolicy]] = {
    "fixed": lambda T0, c: FixedEndTime(T0),
    "joint": lambda T0, c: FixedEndTime(T0, learnable=True),
    "toflow": lambda T0, c: LearnedEndTime(T0, alpha=c.alpha, clip_eps=c.clip_eps),
    "steer": lambda T0, c: RandomEndTime(T0, half_width=c.steer_b),
}

#: the policies whose training needs the hook (TO-FLOW's step on T, STEER's sampled-T log)
_HOOKED = ("toflow", "steer")


def _move_train_end_time(values: dict) -> str | None:
    """``model.train_end_time: true`` (FFJORD's ``--train_T``) is ``endtime.policy: joint``."""
    model = values.get("model") or {}
    if "train_end_time" not in model:
        return None
    if model.pop("train_end_time"):
        endtime = values.setdefault("endtime", {})
        if endtime.get("policy", "fixed") not in ("fixed", "joint"):
            raise ConfigError(f"model.train_end_time=true conflicts with endtime.policy={endtime['policy']!r}; "
                              "use endtime.policy=joint alone")
        endtime["policy"] = "joint"
        return "model.train_end_time is deprecated: use endtime.policy=joint"
    return None


def _simultaneous_order(values: dict) -> str | None:
    if (values.get("endtime") or {}).get("order") == "simultaneous":
        return ("endtime.order=simultaneous is deprecated (it is not TO-FLOW's Algorithm 1, which steps T "
                "after the weights): use endtime.order=algorithm1")
    return None


class EndTimeMethod(Method):
    """The end-time method (see the module docstring)."""

    name = "endtime"
    section = EndTimeConfig
    docs = "docs/endtime.md"
    deprecations = (_move_train_end_time, _simultaneous_order)
    deprecated_keys = frozenset({"model.train_end_time"})

    def check(self, cfg: Any) -> None:
        e, T0 = cfg.endtime, cfg.model.end_time
        if e.policy in _HOOKED:
            key, width = ("endtime.clip_eps", e.clip_eps) if e.policy == "toflow" else ("endtime.steer_b", e.steer_b)
            if not width < T0:
                raise ConfigError(f"{key}={width} must be below T0 = model.end_time = {T0}")

    def end_time_policy(self, cfg: Any, block_name: str) -> nn.Module | None:
        return POLICIES[cfg.endtime.policy](cfg.model.end_time, cfg.endtime)

    def hook(self, cfg: Any) -> Hook | None:
        return EndTimeHook(cfg) if cfg.endtime.policy in _HOOKED else None


END_TIME = EndTimeMethod()
