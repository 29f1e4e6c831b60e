"""A trained run as one object: ``fastcnf.load_run(RUN)`` returns its model with the run's
preprocessing, so a notebook scores and samples in the data's own units.

Example:
    >>> import numpy as np, os, tempfile
    >>> from fastcnf import Trainer, load_recipe, load_run
    >>> d = tempfile.mkdtemp(); path = os.path.join(d, "t.npy")
    >>> np.save(path, np.random.default_rng(0).normal(5.0, 2.0, size=(300, 2)))
    >>> cfg = load_recipe("tabular-fm", [f"data.path={path}", "train.iterations=2", "threads=1",
    ...                                  "model.hidden_dims=[8]", "eval.max_examples=16"])
    >>> _ = Trainer(cfg, os.path.join(d, "run"), progress=False).fit()
    >>> run = load_run(os.path.join(d, "run"))
    >>> run.log_prob(torch.tensor([[5.0, 5.0]])).shape, run.sample(3).shape
    (torch.Size([1]), torch.Size([3, 2]))
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from fastcnf.config import Config
from fastcnf.data import load_data
from fastcnf.data.base import DataBundle, DataSplit
from fastcnf.data.record import DataRecord, rows_for_run
from fastcnf.data.table import write_csv
from fastcnf.evaluation.scoring import ScoreResult, score_rows
from fastcnf.methods import load_run_config
from fastcnf.models.flow_model import FlowModel, bits_per_dim_from_log_prob
from fastcnf.ode.budget import SolveBudget
from fastcnf.ode.fixed_step import check_fixed_step
from fastcnf.training.checkpoint import load_checkpoint
from fastcnf.training.trainer import TASKS
from fastcnf.training.validation import final_weights

__all__ = ["TrainedModel", "load_run", "restore_run"]


class TrainedModel(nn.Module):
    """A run's flow plus its preprocessing: ``log_prob`` takes rows in the data's own units
    (tables: as in the file; images: pixels dequantised to ``[0, 1)``) and adds the
    standardisation's log-Jacobian; ``sample`` returns rows in those units.

    Attributes:
        flow: the :class:`~fastcnf.models.FlowModel` (it works in the standardised scale).
        record: the run's :class:`~fastcnf.data.record.DataRecord` (shape, columns, standardizer).
        config: the run's :class:`~fastcnf.config.Config`.
    """

    def __init__(self, flow: FlowModel, record: DataRecord, config: Config) -> None:
        super().__init__()
        self.flow = flow
        self.record = record
        self.config = config

    @property
    def standardizer(self):
        return self.record.standardizer

    def _dtype(self) -> torch.dtype:
        return next(self.flow.parameters()).dtype

    def log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """``log p(x)`` in nats (``log p(x | y)`` given labels of a conditional model)."""
        s = self.record.standardizer
        u = s.transform(x) if s is not None else x
        lp = self.flow.log_prob(u.to(self.config.device, self._dtype()), y)
        return lp + (s.log_abs_det if s is not None else 0.0)

    def bits_per_dim(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Bits per dimension of dequantised images (``levels`` of the run)."""
        if self.record.levels is None:
            raise ValueError("bits/dim is defined for image runs; this run holds a table")
        return bits_per_dim_from_log_prob(self.log_prob(x, y), self.record.dim, self.record.levels)

    def sample(self, n: int, y: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """``n`` samples in the data's own units (float64 for tables)."""
        u = self.flow.sample(n, y, generator=generator)
        s = self.record.standardizer
        return s.inverse(u.cpu()) if s is not None else u

    def score(self, x: Tensor | np.ndarray, batch_size: int = 10000, probes: int = 1, exact: bool | None = None,
              seed: int = 0, progress: bool = False, row_steps: bool = True, steps: int | None = None,
              method: str = "rk4") -> ScoreResult:
        """Per-row log-densities of ``x`` (see :func:`fastcnf.evaluation.scoring.score_rows`)."""
        x = torch.as_tensor(x)
        return score_rows(self.flow, x, standardizer=self.record.standardizer, levels=self.record.levels,
                          batch_size=batch_size, probes=probes, exact=exact, seed=seed, device=self.config.device,
                          dtype=self._dtype(), progress=progress, row_steps=row_steps, steps=steps, method=method)


def _skeleton(record: DataRecord) -> DataBundle:
    """A data-free bundle with the run's shape and classes: enough to rebuild its model (the
    label prior and every other buffer come from the checkpoint)."""
    x = torch.zeros((0, *record.shape))
    y = torch.zeros(0, dtype=torch.int64) if record.num_classes else None
    empty = DataSplit(x, y)
    return DataBundle(record.name, empty, empty, record.shape, record.num_classes, record.levels,
                      split="(rebuilt from the run's data.json)", standardizer=record.standardizer,
                      class_names=record.class_names)


def restore_run(run_dir: str | Path, overrides: list[str] | None = None, *, record: DataRecord | None = None):
    """``(cfg, bundle, task, flow)`` of a finished or interrupted run: its configuration, its data
    (given the run's ``record`` (``data.json``), a data-free bundle rebuilt from it; else the splits
    loaded as the run loaded them) and the weights of its last
    checkpoint (the best validation NLL's when the run validated), in evaluation mode: the one way
    to reopen a run, used by ``load_run`` and by the CLI's ``eval``, ``sample`` and ``distill``.

    Raises:
        ConfigError: not a run directory; CheckpointError: no or a corrupt checkpoint.
    """
    cfg = load_run_config(run_dir, overrides)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # as the trainer: seeded before the data are loaded
    bundle = load_data(cfg.data, cfg.seed) if record is None else _skeleton(record)
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    task = TASKS[cfg.task](cfg, bundle)
    flow = task.build_model().to(cfg.device, dtype)
    state = load_checkpoint(Path(run_dir) / "checkpoints" / "last.pt", map_location=cfg.device)
    flow.load_state_dict(final_weights(state))
    flow.eval()
    return cfg, bundle, task, flow


def load_run(run_dir: str | Path, overrides: list[str] | None = None) -> TrainedModel:
    """The trained model of ``run_dir`` (its ``config.yaml``, ``data.json`` and last checkpoint:
    the weights of the best validation NLL when the run validated, else the last ones), in
    evaluation mode. Runs without ``data.json`` reload their data to rebuild the model.

    Raises:
        ConfigError: not a run directory; CheckpointError: no or a corrupt checkpoint.
    """
    record = DataRecord.load(run_dir)
    cfg, bundle, _, flow = restore_run(run_dir, overrides, record=record)
    record = record or DataRecord.of(bundle)
    return TrainedModel(flow, record, cfg).eval()


#: default rows per solve of ``fastcnf score`` (the run's ``eval.batch_size`` when smaller)
SCORE_BATCH = 2000


def score_command(run_dir: str | Path, data: str | Path, out: str | Path, batch_size: int | None = None,
                  probes: int = 8, trace: str = "auto", overrides: list[str] | None = None,
                  progress: bool = True, error_control: str = "rows", check_rows: int = 1000,
                  steps: int | None = None, method: str = "rk4") -> int:
    """``fastcnf score``: write one log-density per row of ``data`` to ``out`` (nats in the data's own
    units): ``.npy``, with ``<stem>_stderr.npy`` (Hutchinson) and ``<stem>_bits_per_dim.npy`` (images)
    beside it, or ``.csv``, one file with the columns ``log_prob`` [, ``stderr``] [, ``bits_per_dim``];
    every input is checked before anything is written.

    ``error_control``: ``rows`` (per-row error control and step sizes where the solve allows) or ``batch``
    (evaluation's solve, one step size per batch). ``steps``: solve with ``steps`` equal steps of the
    fixed-step ``method`` instead (``steps`` x stages evaluations per row, whatever the accuracy).
    ``check_rows``: with the exact trace on a table, that many random rows (at most) are scored again
    by the adaptive solver at 10x tighter ``eval.atol``/``eval.rtol`` (with ``error_control``); the
    largest and mean absolute difference are printed and written to ``<stem>_check.json``, the
    accuracy the scores reached (0: no check)."""
    import json
    import time

    out = Path(out)
    if out.suffix not in (".npy", ".csv"):
        raise ValueError(f"--out must end in .npy or .csv, got {out.name!r}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if probes < 1:
        raise ValueError(f"--probes must be >= 1, got {probes}")
    if check_rows < 0:
        raise ValueError(f"--check-rows must be >= 0, got {check_rows}")
    if error_control not in ("rows", "batch"):
        raise ValueError(f"--error-control must be rows or batch, got {error_control!r}")
    if steps is not None:
        check_fixed_step(method, steps)
    run = load_run(run_dir, overrides)
    x = rows_for_run(data, run.record, run.config.data)
    # batches of at most SCORE_BATCH rows by default: 6-column tables scored 1.9x faster per CPU second
    # with 2,000 than with 10,000 rows per solve (benchmarks/score_speed.py), the working set staying in cache
    batch = batch_size or min(run.config.eval.batch_size, SCORE_BATCH)
    exact = None if trace == "auto" else trace == "exact"
    t0 = time.perf_counter()
    with SolveBudget(run.config.eval.max_seconds, "scoring"):  # wall-time cap (eval.max_seconds)
        res = run.score(x, batch, probes, exact, seed=run.config.eval.seed,
                        progress=progress, row_steps=error_control == "rows", steps=steps, method=method)
    seconds = time.perf_counter() - t0
    ev = run.config.eval
    check = None
    if check_rows and res.exact and run.record.levels is None:
        k = min(check_rows, len(res.log_prob))
        idx = np.sort(np.random.default_rng(ev.seed).choice(len(res.log_prob), size=k, replace=False))
        ref_atol, ref_rtol = float(f"{ev.atol / 10:g}"), float(f"{ev.rtol / 10:g}")
        tight = load_run(run_dir, list(overrides or []) + [f"eval.atol={ref_atol!r}", f"eval.rtol={ref_rtol!r}"])
        t1 = time.perf_counter()
        ref = tight.score(x[torch.as_tensor(idx)], batch, probes, exact,
                          seed=ev.seed, row_steps=error_control == "rows")
        diff = np.abs(res.log_prob[idx] - ref.log_prob)
        check = {"rows": int(k), "atol": ev.atol, "rtol": ev.rtol, "steps": steps,
                 "method": method if steps is not None else run.config.solver.method, "reference_atol": ref_atol,
                 "reference_rtol": ref_rtol, "reference_method": run.config.solver.method,
                 "error_control": error_control, "max_abs_diff_nats": float(diff.max()),
                 "mean_abs_diff_nats": float(diff.mean()), "seconds": time.perf_counter() - t1}
    out.parent.mkdir(parents=True, exist_ok=True)
    written = [out]
    extra = [(name, v) for name, v in (("stderr", res.stderr), ("bits_per_dim", res.bits_per_dim)) if v is not None]
    if out.suffix == ".csv":  # one file: a header line, then a row per input row (17 digits: float64 read back exactly)
        write_csv(out, np.column_stack([res.log_prob] + [v for _, v in extra]), ["log_prob"] + [n for n, _ in extra])
    else:
        np.save(out, res.log_prob)
        for name, values in extra:
            written.append(out.with_name(f"{out.stem}_{name}.npy"))
            np.save(written[-1], values)
    if check is not None:
        written.append(out.with_name(out.stem + "_check.json"))
        written[-1].write_text(json.dumps(check, indent=2) + "\n")
    how = "exact trace" if res.exact else f"Hutchinson, {probes} probe(s) per row (standard error per row saved)"
    if steps is not None:
        solver = f"{method}, {steps} fixed step{'s' if steps > 1 else ''} ({res.nfe:.0f} evaluations per row)"
    else:
        solver = (f"{run.config.solver.method} at atol={ev.atol:g}, rtol={ev.rtol:g} ({res.nfe:.0f} evaluations per "
                  f"{'row' if error_control == 'rows' else 'batch'})")
    print(f"scored {len(res.log_prob)} rows of {data} in {seconds:.1f} s ({len(res.log_prob) / max(seconds, 1e-9):.0f} "
          f"rows/s): mean log p = {float(np.mean(res.log_prob)):.4f} nats; {how}; solver {solver}")
    if check is not None:
        print(f"accuracy: {check['rows']} random rows scored again by {check['reference_method']} at "
              f"atol={check['reference_atol']:g}, "
              f"rtol={check['reference_rtol']:g} differ by at most {check['max_abs_diff_nats']:.2g} nats "
              f"(mean {check['mean_abs_diff_nats']:.2g})")
    print("wrote " + ", ".join(map(str, written)))
    return 0
