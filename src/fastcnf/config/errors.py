"""The one error type for a bad configuration, and the checks every section shares."""
from __future__ import annotations

import difflib
import math
from typing import Iterable

__all__ = ["ConfigError", "did_you_mean", "check_choice", "check_tolerance"]


class ConfigError(ValueError):
    """A bad configuration: unknown key or recipe, malformed value, value out of range, or a
    setting that does not fit the model or data (the CLI prints it as one line, exit code 2)."""


def did_you_mean(value: object, choices: Iterable[str], cutoff: float = 0.6) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_choice(key: str, value: object, choices: Iterable[str]) -> None:
    """Raise a :class:`ConfigError` naming ``key`` unless ``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid{did_you_mean(value, choices)}; "
                          f"accepted: {', '.join(map(str, choices))}")


def check_tolerance(value: float | None, name: str = "tolerance", allow_none: bool = False) -> float | None:
    """``value`` as a float if it lies in (0, 1); otherwise a :class:`ConfigError` naming ``name``."""
    if value is None and allow_none:
        return None
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number in (0, 1), got {value!r}") from None
    if not (0.0 < v < 1.0) or math.isnan(v):
        raise ConfigError(f"{name} must be in (0, 1) (e.g. 1e-5), got {value!r}")
    return v
