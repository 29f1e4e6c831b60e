"""What a run needs to know about its data without reading it again: ``data.json`` in the run
directory (name, per-example shape, classes and their names, levels, the table's columns and standardisation).

``fastcnf score`` and :func:`fastcnf.load_run` rebuild the model from it, so a run scores new
rows in the user's units even where its training file has moved or is too large to reload.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .base import DataBundle, DataError
from .standardize import Standardizer

__all__ = ["DataRecord", "RECORD_FILE", "rows_for_run"]

RECORD_FILE = "data.json"


@dataclass
class DataRecord:
    """The data facts of a run (see the module docstring)."""

    name: str
    shape: tuple[int, ...]
    num_classes: int | None
    levels: int | None
    columns: list[str] | None
    standardizer: Standardizer | None
    class_names: list[str] | None = None

    @classmethod
    def of(cls, bundle: DataBundle) -> "DataRecord":
        return cls(bundle.name, tuple(bundle.shape), bundle.num_classes, bundle.levels,
                   getattr(bundle, "columns", None), bundle.standardizer, bundle.class_names)

    def save(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / RECORD_FILE
        d = {"name": self.name, "shape": list(self.shape), "num_classes": self.num_classes, "levels": self.levels,
             "columns": self.columns, "class_names": self.class_names,
             "standardizer": None if self.standardizer is None else self.standardizer.to_dict()}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(d, indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, run_dir: str | Path) -> "DataRecord | None":
        """The record of ``run_dir``, or None for runs written before it existed."""
        path = Path(run_dir) / RECORD_FILE
        if not path.exists():
            return None
        try:
            d = json.loads(path.read_text())
            return cls(d["name"], tuple(int(s) for s in d["shape"]), d["num_classes"], d["levels"], d["columns"],
                       None if d["standardizer"] is None else Standardizer.from_dict(d["standardizer"]),
                       d.get("class_names"))  # absent in runs written before names were kept
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path} is corrupt ({e}); delete it to rebuild it from the run's data") from e

    @property
    def dim(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def rows_for_run(path: str | Path, record: DataRecord, data_cfg) -> "torch.Tensor":
    """The rows of ``path`` read as the run's training data was (``data_cfg``: the run's
    :class:`~fastcnf.config.DataConfig`: ``key``, ``columns``, ``label_column``), in the data's own
    units: a table's feature columns (float64; a view of a memory-mapped ``.npy``) or a folder's
    ``uint8`` images. Raises :class:`DataError` when the file's columns (names or number) or its
    images' size differ from the run's."""
    import torch

    from .image_folder import read_image_folder
    from .table import check_rows_finite, read_table, select_columns, table_tensor

    if record.levels is not None:
        x, _, _, _ = read_image_folder(path, "--data", expect=tuple(record.shape))
        return x
    if len(record.shape) != 1:
        raise DataError(f"`fastcnf score` reads tables and image folders; this run's data {record.name!r} has "
                        f"examples of shape {record.shape}")
    table = read_table(path, data_cfg.key, "--data", data_cfg.columns, data_cfg.label_column)
    label = data_cfg.label_column
    if label is not None and isinstance(label, str) and table.header and label not in table.names:
        label = None  # the file to score may leave the labels out
    x, _, names = select_columns(table, data_cfg.columns, label)
    want = record.columns or [str(j) for j in range(record.dim)]
    if x.shape[1] != record.dim:
        raise DataError(f"{table.path} has {x.shape[1]} feature column(s) ({', '.join(names)}); the run was trained "
                        f"on {record.dim} ({', '.join(want)}): give a file with the training data's columns")
    trained_with_header = not all(n.isdigit() for n in want)
    if table.header and trained_with_header and names != want:
        raise DataError(f"{table.path} has feature columns {', '.join(names)}; the run was trained on "
                        f"{', '.join(want)}: give a file with the training data's columns, in that order")
    x, _ = check_rows_finite(table, x, None, False)
    return table_tensor(x)
