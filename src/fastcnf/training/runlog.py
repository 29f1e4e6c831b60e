"""What a run writes as it trains: ``log.csv`` rows, progress on the terminal, ``metrics.json``.

On a terminal progress is a tqdm bar; when stderr is not a terminal (CI logs, ``make demo > log``,
nohup) or with ``--quiet`` it is one plain line every ``train.log_every`` iterations, so logs hold
no carriage-return-joined bar states.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from fastcnf.evaluation.plots import read_log
from fastcnf.training.checkpoint import write_atomic

__all__ = ["RunLog", "training_summary", "write_metrics", "BASE_LOG_COLUMNS"]

#: log.csv columns every run has (hooks and end times add theirs after these)
BASE_LOG_COLUMNS = ["iteration", "loss", "nll", "bits_per_dim", "nfe_forward", "nfe_backward", "lr", "seconds"]


def _stream_is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class RunLog:
    """``log.csv`` and progress of one training run (rank 0 only writes; other ranks pass
    ``enabled=False``).

    Args:
        out_dir: the run directory.
        columns: the log's columns.
        start: the iteration the run starts from (a resumed run keeps the rows up to it).
        total: ``train.iterations``.
        log_every: progress period.
        mode: ``bar`` (tqdm), ``lines`` (plain lines) or ``off``; ``auto`` picks ``bar`` on a
            terminal and ``lines`` otherwise.
        desc: the progress bar's label.
    """

    def __init__(self, out_dir: str | Path, columns: list[str], start: int, total: int, log_every: int,
                 mode: str = "auto", desc: str = "train", enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.path = Path(out_dir) / "log.csv"
        self.columns, self.total, self.log_every = columns, total, max(int(log_every), 1)
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if _stream_is_terminal(self.stream) else "lines"
        self.mode = mode if enabled else "off"
        self.enabled = enabled
        new = not self.path.exists() or start == 0
        if enabled and not new:
            self._truncate(start)
        self.fh = open(self.path if enabled else os.devnull, "w" if new else "a", newline="")
        self.writer = csv.DictWriter(self.fh, fieldnames=columns, extrasaction="ignore")
        if new:
            self.writer.writeheader()
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True, file=self.stream)

    def _truncate(self, iteration: int) -> None:
        """Drop rows written after the checkpoint (they will be redone)."""
        with open(self.path, newline="") as fh:
            rows = list(csv.reader(fh))
        if rows:
            keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= iteration]
            text = io.StringIO(newline="")
            csv.writer(text).writerows(keep)
            write_atomic(self.path, text.getvalue())

    def row(self, row: dict[str, Any]) -> None:
        """Write one iteration's row and show progress."""
        self.writer.writerow(row)
        it = row["iteration"]
        due = it % self.log_every == 0 or it == self.total
        if self.bar is not None:
            self.bar.update(1)
            if due:
                post = {"loss": f"{row['loss']:.4f}", "nfe": f"{row['nfe_forward']}/{row['nfe_backward']}"}
                if row["bits_per_dim"] != "":
                    post["bpd"] = f"{row['bits_per_dim']:.4f}"
                self.bar.set_postfix(post, refresh=False)
        elif self.mode == "lines" and due:
            print(f"iter {it}/{self.total} loss {row['loss']:.4f} nfe {row['nfe_forward']}/{row['nfe_backward']} "
                  f"lr {row['lr']:.3g} {1.0 / max(row['seconds'], 1e-9):.2f} it/s", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        """A line between progress updates (e.g. an intermediate evaluation)."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        elif self.mode != "off":
            print(text, file=self.stream, flush=True)

    def flush(self) -> None:
        self.fh.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.fh.close()


def training_summary(out_dir: str | Path) -> dict[str, Any]:
    """NFE means per iteration and training time from ``log.csv`` (survives resumes)."""
    log = read_log(Path(out_dir) / "log.csv")
    if not log:
        return {"nfe_forward_mean": 0.0, "nfe_backward_mean": 0.0, "train_seconds": 0.0}
    return {"nfe_forward_mean": float(np.mean(log["nfe_forward"])),
            "nfe_backward_mean": float(np.mean(log["nfe_backward"])),
            "train_seconds": float(np.sum(log["seconds"]))}


def write_metrics(out_dir: str | Path, metrics: dict[str, Any], merge: bool = False) -> dict[str, Any]:
    """Write ``metrics.json`` atomically; with ``merge`` keep the keys of an existing file that
    ``metrics`` does not set (``fastcnf eval`` re-evaluates a finished run)."""
    path = Path(out_dir) / "metrics.json"
    if merge and path.exists():
        with open(path) as fh:
            metrics = {**json.load(fh), **metrics}
    write_atomic(path, json.dumps(metrics, indent=2))
    return metrics
