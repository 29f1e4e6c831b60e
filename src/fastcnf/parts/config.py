"""The configuration section of this method: :class:`PartsConfig`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fastcnf.config import ConfigError, Section

__all__ = ["PartsConfig"]


@dataclass
class PartsConfig(Section):
    """Training a flow by gradient-isolated parts (Bhatt & Inouye, "Learning Flows by Parts").

    Give the part boundaries with exactly one of ``boundaries`` / ``level_boundaries``.

    Attributes:
        enabled: train by parts.
        boundaries: indices into ``flow.steps`` where parts 2, 3, ... start (strictly increasing).
        level_boundaries: flows with levels (Glow): positions in the paper's notation, levels
            counted from 1: ``2`` = the start of level 2 ("by blocks"), ``1.5`` = the middle flow
            step of level 1 ("across blocks").
        mechanism: ``alternate`` (parts take turns of ``turn`` units, the paper's stable mechanism)
            or ``sequential`` (the parts phase split in equal consecutive budgets).
        turn: ``alternate``: length of one part's turn, in ``unit``.
        finetune: end-to-end fine-tuning at the end of training, in ``unit`` (the paper: 30 epochs).
        unit: ``iterations`` or ``epochs`` (for ``turn`` and ``finetune``).
        lr_scales: per-part learning-rate factors on the scheduled rate (empty: all 1).
    """

    _key = "parts"
    enabled: bool = False
    boundaries: list[int] = field(default_factory=list)
    level_boundaries: list[float] = field(default_factory=list)
    mechanism: Literal["alternate", "sequential"] = "alternate"
    turn: int = 1
    finetune: int = 0
    unit: Literal["iterations", "epochs"] = "iterations"
    lr_scales: list[float] = field(default_factory=list)

    def check(self) -> None:
        if self.turn < 1:
            raise ConfigError(f"parts.turn must be >= 1, got {self.turn}")
        if self.finetune < 0:
            raise ConfigError(f"parts.finetune must be >= 0, got {self.finetune}")
        if any(not (s > 0 and s != float("inf")) for s in self.lr_scales):
            raise ConfigError(f"parts.lr_scales must be positive numbers, got {list(self.lr_scales)}")
        if self.boundaries and self.level_boundaries:
            raise ConfigError("give the part boundaries once: parts.boundaries (indices into flow.steps) or "
                              "parts.level_boundaries (levels, the paper's notation), not both")
        for key in ("boundaries", "level_boundaries"):
            b = list(getattr(self, key))
            if any(later <= earlier for earlier, later in zip(b, b[1:])):
                raise ConfigError(f"parts.{key}={b} must be strictly increasing: parts are contiguous and "
                                  "may neither overlap nor be empty")
        if self.enabled and not (self.boundaries or self.level_boundaries):
            raise ConfigError("parts.enabled=true needs at least one boundary: set parts.boundaries (indices "
                              "into flow.steps, e.g. [4]) or parts.level_boundaries (e.g. [1.5] or [2, 3])")
