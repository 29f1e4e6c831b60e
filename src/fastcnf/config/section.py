"""The base of every configuration section: ``Literal`` choices and range checks on construction."""
from __future__ import annotations

import typing
from dataclasses import fields
from typing import Literal

from fastcnf.config.errors import ConfigError, check_choice

__all__ = ["Section", "SolverMethod", "SOLVER_METHODS", "ADAPTIVE_METHODS"]

SolverMethod = Literal["dopri5", "bosh3", "adaptive_heun", "dopri8", "rk4", "euler", "midpoint", "heun"]
ADAPTIVE_METHODS = ("dopri5", "bosh3", "adaptive_heun", "dopri8")
SOLVER_METHODS = typing.get_args(SolverMethod)


class Section:
    """Base of every section: checks ``Literal`` fields, then the section's own ``check``."""

    _key = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            tp = hints[f.name]
            if typing.get_origin(tp) is Literal:
                check_choice(self._name(f.name), getattr(self, f.name), typing.get_args(tp))
        self.check()

    def _name(self, attr: str) -> str:
        return f"{self._key}.{attr}" if self._key else attr

    def _positive(self, *attrs: str) -> None:
        for a in attrs:
            v = getattr(self, a)
            if isinstance(v, bool) or not v > 0:
                raise ConfigError(f"{self._name(a)} must be positive, got {v!r}")

    def check(self) -> None:
        """Range checks of this section (override)."""
