"""Training a flow by gradient-isolated parts as a method (Bhatt & Inouye 2021, "Learning Flows by
Parts").

``parts.enabled`` turns it on (:class:`~fastcnf.parts.config.PartsConfig`); the schedule, the
truncated objective and the per-part optimiser groups are :mod:`fastcnf.parts.hook`. Docs:
docs/parts.md.
"""
from __future__ import annotations

from typing import Any

from fastcnf.method import Hook, Method
from fastcnf.parts.config import PartsConfig
from fastcnf.parts.hook import PartsHook

__all__ = ["PARTS", "PartsMethod"]


class PartsMethod(Method):
    """The parts method (see the module docstring)."""

    name = "parts"
    section = PartsConfig
    docs = "docs/parts.md"

    def hook(self, cfg: Any) -> Hook | None:
        return PartsHook(cfg) if cfg.parts.enabled else None


PARTS = PartsMethod()
