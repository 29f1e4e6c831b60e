"""What every benchmark records about its run, and how it writes and reads results.

A benchmark's JSON carries, besides its figures, the command that produced it, the commit and
whether the working tree had uncommitted changes, the date and the machine: ``run_metadata``,
taken when the run starts (the commit of the code that ran, even if one is made meanwhile) and
put first in the result that ``write_json`` writes. The rest are the small pieces the scripts
share: wall/CPU timing (``Timer``), mean ± std over seeds, time to reach a target, the
trainer's ``log.csv``, child processes that run this checkout, figures drawn without a display.

Importing this module puts the checkout's ``src/`` first on ``sys.path`` so that
``python benchmarks/X.py`` runs the fastcnf of this working tree without ``PYTHONPATH``; the
scripts therefore import it before any ``fastcnf`` name. Import it as ``from common import ...``
(a script's own folder is first on ``sys.path``).
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchdiffeq

__all__ = ["ROOT", "SRC", "RESULTS", "commit", "working_tree_dirty", "machine", "load_average", "command_line",
           "run_metadata", "write_json", "source_env", "Timer", "mean_std", "time_to_target", "read_log",
           "pyplot", "save_figure"]

#: the repository root, its ``src/`` and the folder of committed benchmark results
ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
RESULTS = ROOT / "benchmarks" / "results"

if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))


# ---- the run ------------------------------------------------------------------------------------
def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def commit() -> str:
    """The checked-out commit (``git rev-parse HEAD``), or ``"unknown"`` outside a git checkout."""
    return _git("rev-parse", "HEAD") or "unknown"


def working_tree_dirty() -> bool | None:
    """Whether tracked files differ from the commit (the result may not reproduce from it alone);
    ``None`` outside a git checkout."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (other jobs on a shared machine inflate wall times)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The machine and software a result was measured on: CPU model, cores, platform, Python,
    torch / torchdiffeq / numpy versions, torch's thread count now (a recipe's ``threads`` may
    set another while training), the CPU instruction set torch uses, the accelerator (``"cpu"``
    when none) and the load average now."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchdiffeq": getattr(torchdiffeq, "__version__", "unknown"),
        "numpy": np.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "load_average": load_average(),
    }


def command_line(script: str | Path, argv: Sequence[str] | None = None) -> str:
    """The command that reruns ``script`` with ``argv`` (default ``sys.argv[1:]``) from the
    repository root, shell-quoted: ``python benchmarks/X.py --flag value``."""
    path = Path(script).resolve()
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return shlex.join(["python", str(shown), *(sys.argv[1:] if argv is None else argv)])


def run_metadata(script: str | Path, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``command``, ``commit``, ``working_tree_dirty``, ``date`` (UTC, ISO 8601) and ``machine`` of
    a run of ``script`` (the benchmark's ``__file__``) with ``argv``; call it when the run starts.

    Example::

        result = {**run_metadata(__file__, argv), "runs": runs}
        write_json(args.out, result)
    """
    return {
        "command": command_line(script, argv),
        "commit": commit(),
        "working_tree_dirty": working_tree_dirty(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
    }


def write_json(path: str | Path, payload: dict[str, Any], indent: int | None = 2) -> Path:
    """Write ``payload`` to ``path`` as JSON (parent folders created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=indent)
    return path


def source_env(**overrides: str) -> dict[str, str]:
    """This process's environment with ``src/`` first on ``PYTHONPATH``, for a child process that
    must run this working tree's fastcnf; ``overrides`` set further variables."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(overrides)
    return env


# ---- measurements -------------------------------------------------------------------------------
class Timer:
    """Wall-clock and process-CPU seconds spent inside ``with`` blocks, summed over every use.

    Process CPU time is reported next to wall time because it is the steadier measure on a shared
    machine. Example::

        timer = Timer()
        for _ in range(10):
            with timer:
                step()
        print(timer.wall, timer.cpu)
    """

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0
        self._start = (0.0, 0.0)

    def __enter__(self) -> Timer:
        self._start = (time.perf_counter(), time.process_time())
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._start[0]
        self.cpu += time.process_time() - self._start[1]


def mean_std(values: Iterable[float | None], ddof: int = 0) -> dict[str, float] | None:
    """``{"mean", "std"}`` of the values that are not ``None`` (``None`` when there are none).

    ``ddof=0`` is the population standard deviation, ``ddof=1`` the sample one; one value has
    std 0 either way.
    """
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    if len(vals) == 1:
        std = 0.0
    else:
        std = statistics.pstdev(vals) if ddof == 0 else statistics.stdev(vals)
    return {"mean": statistics.fmean(vals), "std": std}


def time_to_target(curve: Iterable[dict[str, Any]], metric: str, target: float, clock: str) -> Any:
    """``point[clock]`` of the first point of ``curve`` whose ``metric`` is at most ``target``,
    ``None`` when no point reaches it (lower is better: NLL, bits/dim)."""
    for point in curve:
        if point.get(metric) is not None and point[metric] <= target:
            return point[clock]
    return None


def read_log(path: str | Path) -> list[dict[str, str]]:
    """The rows of a trainer's ``log.csv`` (column -> text as written)."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ---- figures ------------------------------------------------------------------------------------
def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (benchmarks run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> None:
    """Lay out ``fig``, write it to ``path`` (parent folders created) and close it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
