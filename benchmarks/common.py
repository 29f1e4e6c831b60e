"""What every benchmark records about its run, and how it writes and reads results.

A benchmark's JSON carries, besides its figures, the command that produced it, the commit and
whether the working tree had uncommitted changes, the date and the machine: ``run_metadata``,
taken when the run starts (the commit of the code that ran, even if one is made meanwhile) and
put first in the result that ``write_json`` writes. The rest are the small pieces the scripts
share: wall/CPU timing (``Timer``), mean ± std over seeds, time to reach a target, the
trainer's ``log.csv``, child processes that run this checkout (one run each, a few at a time), a
results file that several scripts share (one section each, kept when another script rewrites it),
Markdown table cells, figures drawn without a display.

Importing this module puts the checkout's ``src/`` first on ``sys.path`` so that
``python benchmarks/X.py`` runs the fastcnf of this working tree without ``PYTHONPATH``; the
scripts therefore import it before any ``fastcnf`` name. Import it as ``from common import ...``
(a script's own folder is first on ``sys.path``).
"""
from __future__ import annotations

import argparse
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
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torchdiffeq

__all__ = ["ROOT", "SRC", "RESULTS", "FLOW_MATCHING_JSON", "FLOW_MATCHING_DESCRIPTION", "commit", "working_tree_dirty",
           "machine", "load_average", "command_line", "run_metadata", "write_json", "source_env", "worker_main",
           "start_worker", "run_worker", "run_jobs", "open_report", "save_section", "print_section",
           "merge_earlier_runs", "add_section_arguments", "add_resumable_arguments", "load_resumable", "run_section", "Timer", "mean_std", "time_to_target",
           "read_log", "fmt", "pyplot", "save_figure"]

#: the repository root, its ``src/`` and the folder of committed benchmark results
ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
RESULTS = ROOT / "benchmarks" / "results"
#: the results file of ``fm_toys.py``, ``fm_digits.py`` and ``fm_torchcfm.py`` (sections ``toys``, ``digits``,
#: ``torchcfm``) and what it holds
FLOW_MATCHING_JSON = RESULTS / "flow_matching.json"
FLOW_MATCHING_DESCRIPTION = ("Flow matching vs maximum likelihood: toys (fm_toys.py), digits (fm_digits.py) and "
                             "torchcfm side by side (fm_torchcfm.py).")

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


# ---- child processes: one run each, a few at a time ---------------------------------------------
def worker_main(spec_path: str | Path, run: Callable[[dict], dict]) -> None:
    """The child's side of :func:`start_worker`: ``run`` the JSON spec at ``spec_path`` and write
    what it returns, as JSON, to the spec's ``result`` path."""
    spec = json.loads(Path(spec_path).read_text())
    Path(spec["result"]).write_text(json.dumps(run(spec)))


def start_worker(script: str | Path, job: dict, work: Path) -> tuple[subprocess.Popen, IO[str]]:
    """Launch ``python SCRIPT --worker SPEC`` for ``job`` (a spec with ``tag`` and ``result``) from
    the repository root, with one OpenMP thread and this working tree's fastcnf; its output goes
    to ``work/TAG.log``. ``job["launched"]`` (``time.time()``) is set before the spec is written,
    so the child knows when it was launched. Returns the process and its open log."""
    spec_path = work / f"{job['tag']}.spec.json"
    Path(job["result"]).unlink(missing_ok=True)
    log = open(work / f"{job['tag']}.log", "w")
    job["launched"] = time.time()
    spec_path.write_text(json.dumps(job))
    proc = subprocess.Popen([sys.executable, str(Path(script).resolve()), "--worker", str(spec_path)], cwd=ROOT,
                            env=source_env(OMP_NUM_THREADS="1"), stdout=log, stderr=subprocess.STDOUT)
    return proc, log


def run_worker(script: str | Path, job: dict, work: Path) -> tuple[dict, float, float]:
    """Run ``job`` in its own process (:func:`start_worker`) and wait for it: its result, launch
    and end times (``time.time()``); ``RuntimeError`` naming the log if it fails."""
    proc, log = start_worker(script, job, work)
    with log:
        rc = proc.wait()
    ended = time.time()
    if rc != 0:
        raise RuntimeError(f"{job['tag']} failed ({rc}); see {work / (job['tag'] + '.log')}")
    return json.loads(Path(job["result"]).read_text()), job["launched"], ended


def run_jobs(script: str | Path, jobs: list[dict], work: Path, concurrency: int,
             on_done: Callable[[dict, dict, float, float], None]) -> None:
    """Run each job as :func:`start_worker` does, at most ``concurrency`` at a time, in order;
    ``on_done(job, result, launched, ended)`` after each that succeeds (each end is printed)."""
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < concurrency:
            job = pending.pop(0)
            proc, log = start_worker(script, job, work)
            running.append((job, proc, log))
            print(f"started {job['tag']} (pid {proc.pid})", flush=True)
        time.sleep(1.0)
        for item in list(running):
            job, proc, log = item
            if proc.poll() is None:
                continue
            ended = time.time()
            log.close()
            running.remove(item)
            if proc.returncode != 0:
                print(f"{job['tag']} failed ({proc.returncode}); see {work / (job['tag'] + '.log')}", flush=True)
                continue
            on_done(job, json.loads(Path(job["result"]).read_text()), job["launched"], ended)
            print(f"done {job['tag']} in {ended - job['launched']:.1f} s", flush=True)


# ---- a results file that several scripts share -----------------------------------------------------
_RUN_KEYS = ("command", "commit", "working_tree_dirty", "date", "machine")


def open_report(path: Path, metadata: dict[str, Any], description: str, first_part: str,
                summarize_only: bool = False) -> tuple[dict, dict]:
    """The report a script writes into the shared results file ``path``, and the file as it was.

    The report keeps every section of the file and its ``verdicts``; its top carries ``metadata``
    (this invocation's :func:`run_metadata`) and ``description``, or, with ``summarize_only``,
    the file's own top with this invocation as ``resummarized_by``. A file written before it had
    sections (one experiment's ``runs`` at its top level) is read as the section ``first_part``.
    """
    previous = json.loads(path.read_text()) if path.exists() else {}
    if "runs" in previous:
        previous = {first_part: previous}
    if summarize_only:
        return {**previous, "resummarized_by": metadata}, previous
    kept = {k: v for k, v in previous.items() if k not in (*_RUN_KEYS, "description", "resummarized_by")}
    return {**metadata, "description": description, **kept}, previous


def save_section(path: Path, report: dict, part: str, about: str, section: dict,
                 verdicts: dict[str, dict] | None = None) -> None:
    """Put ``section`` as ``report[part]`` (described by ``about`` in ``report["sections"]``) and
    write the report to ``path``. ``verdicts``, keyed ``"PART/..."``, replace the part's earlier
    ones in ``report["verdicts"]`` (``None``: leave them, e.g. for a partial save)."""
    report.setdefault("sections", {})[part] = about
    report[part] = section
    if verdicts is not None:
        others = {k: v for k, v in report.get("verdicts", {}).items() if not k.startswith(f"{part}/")}
        report["verdicts"] = {**others, **verdicts}
    write_json(path, report)


def print_section(path: Path, report: dict, part: str) -> None:
    """Print a section's Markdown table and note, then the part's verdicts (``MET`` / ``MISSED``)."""
    section = report.get(part, {})
    if section.get("table"):
        print(f"\n## {part}: {report['sections'][part]}\n\n{section['table']}")
        if section.get("note"):
            print("\nNote: " + section["note"])
    for name, v in report.get("verdicts", {}).items():
        if name.startswith(f"{part}/"):
            print(f"{'MET   ' if v['met'] else 'MISSED'} {name}: {v['value']}")
    print(f"wrote {path}")


def merge_earlier_runs(section: dict, earlier: dict | None, rerun: set[str]) -> None:
    """Keep ``earlier``'s runs (the same section as last written) whose keys are not rerun now,
    each stamped with the command and commit that produced it (the section's own command is this
    invocation's); a run that is a dict of runs (method -> run) has each of them stamped."""
    if not earlier:
        return
    kept = []
    for key, run in earlier.get("runs", {}).items():
        if key in rerun:
            continue
        stamp = {"command": earlier.get("command"), "commit": earlier.get("commit"), "date": earlier.get("date")}
        if isinstance(run, dict) and all(isinstance(v, dict) for v in run.values()) and "methods" not in run:
            run = {m: {**stamp, **r} for m, r in run.items()}  # method -> run
        else:
            run = {**stamp, **run}
        section["runs"][key] = run
        kept.append(key)
    if kept:
        section["kept_from_earlier_invocation"] = {"runs": kept, "command": earlier.get("command"),
                                                   "commit": earlier.get("commit"), "date": earlier.get("date")}


def add_resumable_arguments(parser: argparse.ArgumentParser, out: Path, work: str) -> None:
    """``--set``, ``--json``, ``--work``, ``--table`` of a script whose JSON file is resumed run by run
    (:func:`load_resumable`)."""
    parser.add_argument("--set", action="extend", nargs="+", default=[], help="extra overrides for every run")
    parser.add_argument("--json", type=Path, default=out)
    parser.add_argument("--work", type=Path, default=Path(work))
    parser.add_argument("--table", action="store_true", help="only print the table of the JSON file")


def load_resumable(path: Path) -> dict[str, Any]:
    """The results file at ``path`` (``runs`` by key, ``invocations``), or an empty one."""
    return json.loads(path.read_text()) if path.exists() else {"runs": {}, "invocations": []}


def add_section_arguments(parser: argparse.ArgumentParser, part: str, out: Path, work: str) -> None:
    """The flags of a script that writes the section ``part`` of a shared results file: the
    hidden ``--worker SPEC`` (a child's job, :func:`start_worker`), ``--summarize-only``, ``--work``
    (run directories and logs) and ``--out`` (default ``out``)."""
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--summarize-only", action="store_true",
                        help=f"recompute the {part} summary, table and verdicts in --out from its runs; run nothing")
    parser.add_argument("--work", default=work, help="run directories and logs")
    parser.add_argument("--out", default=str(out))


def run_section(args: argparse.Namespace, argv: Sequence[str] | None, script: str | Path, part: str, about: str, *,
                description: str, first_part: str, worker: Callable[[dict], dict],
                run: Callable[[dict | None, Path, Callable[[dict], None]], dict],
                summarize: Callable[[dict], None], verdicts: Callable[[dict], dict]) -> None:
    """The body of such a script (flags from :func:`add_section_arguments`). As a child
    (``--worker``): ``worker(spec)``. Otherwise ``run(earlier, work, save)`` makes the section
    (``earlier``: the file's section as it was; ``save(section)`` writes a partial one, summarized
    and stamped with ``load_average_end``), or with ``--summarize-only`` the file's section is taken
    as it is; then ``summarize(section)`` fills its summary and table from its runs, and the section
    and its ``verdicts(section)`` are written into ``args.out`` (:func:`open_report`,
    :func:`save_section`; ``description`` and ``first_part`` as there) and printed."""
    if args.worker:
        worker_main(args.worker, worker)
        return
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    report, previous = open_report(out, run_metadata(script, argv), description, first_part, args.summarize_only)
    if args.summarize_only:
        if part not in previous:
            raise SystemExit(f"{out} has no {part} section to summarize")
        section = previous[part]
    else:
        def save(partial: dict) -> None:
            summarize(partial)
            partial["load_average_end"] = load_average()
            save_section(out, report, part, about, partial)

        section = run(previous.get(part), work, save)
    summarize(section)
    save_section(out, report, part, about, section, verdicts(section))
    print_section(out, report, part)


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


def fmt(value: float | None, spec: str = ".1f") -> str:
    """``value`` formatted by ``spec`` for a Markdown table cell, ``"-"`` when ``None``."""
    return "-" if value is None else format(value, spec)


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
