"""A wall-time cap and progress for a group of solves (an evaluation, sampling, scoring, a grid
integration), on top of each solve's NFE cap (``solver.max_nfe``).

Inside ``with SolveBudget(max_seconds, "evaluation"):`` every function evaluation of every solve
(:func:`fastcnf.ode.solve.solve`, the lean and fused solvers) calls :func:`check_budget`: past
``max_seconds`` since the group began it returns the message with which the solve raises
:class:`~fastcnf.ode.solve.SolverBudgetExceeded` (naming the block, the NFE reached and what to
change), so the first batch that hits the cap ends the whole group; after ``progress_after``
seconds a progress line is printed every ``progress_every`` seconds (what runs, the block, its NFE
so far, the elapsed time). Outside any group solves are capped by their NFE only.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["SolveBudget", "check_budget", "set_status"]

_ACTIVE: list["SolveBudget"] = []


class SolveBudget:
    """Wall-time cap (``max_seconds``, 0: none) and progress lines for the solves run inside it.

    Args:
        max_seconds: the cap on the whole group, in seconds (``eval.max_seconds``); 0: no cap.
        what: what the solves are for, in messages (``evaluation``, ``sampling``, ...).
        setting: the option that sets the cap, named in the error.
        progress_after, progress_every: seconds before the first progress line and between lines.
        stream: where progress goes (standard error).

    Example:
        >>> from fastcnf.ode.solve import NFECounter, SolverConfig, solve
        >>> import torch
        >>> with SolveBudget(60.0, "a test"):
        ...     out = solve(lambda t, y: -y, torch.ones(3), torch.tensor([0.0, 1.0]), SolverConfig(), NFECounter())
        >>> round(float(out[-1, 0]), 4)
        0.3679
    """

    def __init__(self, max_seconds: float, what: str = "evaluation", setting: str = "eval.max_seconds",
                 progress_after: float = 5.0, progress_every: float = 10.0, stream: TextIO | None = None) -> None:
        self.max_seconds = float(max_seconds)
        self.what, self.setting = what, setting
        self.progress_after, self.progress_every = float(progress_after), float(progress_every)
        self.stream = stream
        self.status = ""
        self.start = self.next_report = 0.0

    def __enter__(self) -> "SolveBudget":
        self.start = time.monotonic()
        self.next_report = self.start + self.progress_after
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> bool:
        _ACTIVE.remove(self)
        return False

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def check(self, name: str, phase: str, nfe: int) -> str | None:
        """The error message once the cap is passed (else None); prints progress when due."""
        now = time.monotonic()
        elapsed = now - self.start
        where = f" ({self.status})" if self.status else ""
        if self.max_seconds > 0 and elapsed > self.max_seconds:
            return (
                f"{name}: {self.what} stopped after {elapsed:.0f} s ({self.setting}={self.max_seconds:g}) in a "
                f"{phase} solve at NFE {nfe}{where}; the dynamics are too stiff for the tolerances: check "
                f"whether training diverged (loss in log.csv), loosen eval.atol / eval.rtol, or raise "
                f"{self.setting}")
        if now >= self.next_report:
            self.next_report = now + self.progress_every
            cap = f", cap {self.max_seconds:g} s" if self.max_seconds > 0 else ""
            print(f"fastcnf: {self.what}{where}: {name} {phase} solve at NFE {nfe}, {elapsed:.0f} s{cap}",
                  file=self.stream or sys.stderr, flush=True)
        return None


def check_budget(name: str, phase: str, nfe: int) -> str | None:
    """Called at every function evaluation of a solve: the innermost group's error message once its
    cap is passed (the solve raises it), else None."""
    return _ACTIVE[-1].check(name, phase, nfe) if _ACTIVE else None


def set_status(text: str) -> None:
    """Where the innermost group is (e.g. ``batch 3/10``), shown in progress lines and errors."""
    if _ACTIVE:
        _ACTIVE[-1].status = text
