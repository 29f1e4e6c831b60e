"""Run logging (fastcnf.training.runlog): log.csv rows, plain progress lines off a terminal, the
truncation of rows redone after a resume, and metrics.json."""
from __future__ import annotations

import io
import json

from fastcnf.training.runlog import BASE_LOG_COLUMNS, RunLog, training_summary, write_metrics


def _row(i: int) -> dict:
    return {"iteration": i, "loss": 1.0 / i, "nll": 1.0 / i, "bits_per_dim": "", "nfe_forward": 20,
            "nfe_backward": 30, "lr": 1e-3, "seconds": 0.5}


def test_progress_off_a_terminal_is_plain_lines_without_carriage_returns(tmp_path):
    stream = io.StringIO()  # not a terminal
    log = RunLog(tmp_path, BASE_LOG_COLUMNS, 0, 4, 2, mode="auto", stream=stream)
    for i in range(1, 5):
        log.row(_row(i))
    log.close()
    text = stream.getvalue()
    assert "\r" not in text
    assert text.splitlines() == [line for line in text.splitlines() if line.startswith("iter ")]
    assert [line.split()[1] for line in text.splitlines()] == ["2/4", "4/4"]


def test_resumed_log_drops_rows_after_the_checkpoint(tmp_path):
    log = RunLog(tmp_path, BASE_LOG_COLUMNS, 0, 5, 1, mode="off")
    for i in range(1, 6):
        log.row(_row(i))
    log.close()
    log = RunLog(tmp_path, BASE_LOG_COLUMNS, 3, 5, 1, mode="off")
    for i in (4, 5):
        log.row(_row(i))
    log.close()
    lines = (tmp_path / "log.csv").read_text().splitlines()
    assert lines[0] == ",".join(BASE_LOG_COLUMNS)
    assert [int(r.split(",")[0]) for r in lines[1:]] == [1, 2, 3, 4, 5]
    summary = training_summary(tmp_path)
    assert summary["nfe_forward_mean"] == 20 and summary["nfe_backward_mean"] == 30


def test_metrics_merge_keeps_earlier_entries(tmp_path):
    write_metrics(tmp_path, {"a": 1.0, "b": None})
    merged = write_metrics(tmp_path, {"c": 2}, merge=True)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == merged and on_disk["a"] == 1.0 and on_disk["c"] == 2
    assert write_metrics(tmp_path, {"d": 3}) == {"d": 3}
