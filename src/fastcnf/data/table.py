"""Tables from the user's files: ``.npy``, ``.npz``, ``.csv``, ``.tsv``, ``.txt`` (rows = examples).

``data.name: table`` with ``data.path`` (and optionally ``data.test_path`` / ``data.val_path``).
Text files may have a header line (detected: a first line with a cell that is not a number); a
``.csv`` whose first line holds no comma but semicolons (or tabs) is read with that separator.
``data.columns`` selects feature columns by header name or 0-based index (only they are parsed, so
columns of text may stay in the file) and ``data.label_column`` names a column of class labels
(integers, or class names numbered in sorted order); empty cells and ``NA`` / ``null`` read as
missing (NaN). A ``.npy`` file is memory-mapped (``numpy.load(...,
mmap_mode="r")``): batches read only their rows, so a file larger than memory trains and scores
without a copy; its held-out splits are then contiguous blocks at the end of the file (as MAF's
loaders split their shuffled arrays), the other formats are split by a permutation drawn from
``seed``. Every problem with a file is one :class:`~fastcnf.data.base.DataError` line naming the
file, the row and column where it applies, and what to change.

Example:
    >>> import numpy as np, tempfile, os
    >>> from fastcnf.config import DataConfig
    >>> path = os.path.join(tempfile.mkdtemp(), "t.csv")
    >>> np.savetxt(path, np.random.default_rng(0).normal(size=(100, 3)), delimiter=",", header="a,b,c", comments="")
    >>> b = load_table(DataConfig(name="table", path=path, columns=["a", "c"]), seed=0)
    >>> b.shape, len(b.train), len(b.test), b.standardizer is None
    ((2,), 80, 20, True)
"""
from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .base import DataBundle, DataError, DataSplit

__all__ = ["TABLE_SUFFIXES", "Table", "TableBundle", "read_table", "select_columns", "load_table", "read_rows_like",
           "check_rows_finite", "table_tensor", "write_csv"]

#: file suffixes a table can be read from
TABLE_SUFFIXES = (".npy", ".npz", ".csv", ".tsv", ".txt")
_DELIMITERS = {".csv": ",", ".tsv": "\t", ".txt": None}  # None: any whitespace
_CHUNK_ROWS = 1 << 16


@dataclass
class Table:
    """The columns of one file: ``values`` ``(N, C)`` (possibly a read-only memory map) and the
    column names (the header, or ``"0"``, ``"1"``, ... without one)."""

    path: Path
    values: np.ndarray
    names: list[str]
    header: bool
    #: a label column of text (class names), by column index: its cells as written
    text: dict[int, list[str]] = field(default_factory=dict)
    #: the class names of a text label column, in label order (set by :func:`select_columns`)
    classes: list[str] | None = None

    @property
    def memory_mapped(self) -> bool:
        return isinstance(self.values, np.memmap) or isinstance(getattr(self.values, "base", None), np.memmap)


@dataclass
class TableBundle(DataBundle):
    """A :class:`DataBundle` of a table plus its feature columns' names; ``data.standardize``
    applies to it (:func:`fastcnf.data.registry.standardize`)."""

    columns: list[str] = field(default_factory=list)


def _existing(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: no such file; set {what} to an existing {'/'.join(TABLE_SUFFIXES)} file")
    if p.is_dir():
        raise DataError(f"{p} is a folder; set {what} to a {'/'.join(TABLE_SUFFIXES)} file "
                        "(folders of images: data.name=image_folder)")
    if p.suffix.lower() not in TABLE_SUFFIXES:
        raise DataError(f"{p}: unknown extension {p.suffix or '(none)'!r}; {what} must end in "
                        f"{', '.join(TABLE_SUFFIXES)}")
    if p.stat().st_size == 0:
        raise DataError(f"{p} is empty; {what} must hold at least one row")
    return p


def _as_2d(arr: np.ndarray, p: Path) -> np.ndarray:
    if arr.dtype.kind not in "fiub":
        raise DataError(f"{p}: array of dtype {arr.dtype} is not numeric; save it as float or int")
    if arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2:
        raise DataError(f"{p}: expected a 2-D array (rows, columns), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"{p} is empty (array of shape {arr.shape}); it must hold at least one row")
    return arr


#: cells read as a missing value (NaN), besides what ``float`` parses ("nan", "inf"); compared lower-cased
MISSING_CELLS = ("", "na", "n/a", "null", "none")


def _number(cell: str) -> float | None:
    """The cell's value; NaN for an empty or missing-value cell (:data:`MISSING_CELLS`); None if not a number."""
    try:
        return float(cell)
    except ValueError:
        return float("nan") if cell.strip().lower() in MISSING_CELLS else None


def _label_index(stub: Table, label_column: str | int | None) -> int | None:
    """The label column's index, or None; a label that does not resolve is left to :func:`select_columns`
    (its error, or a file to score without the labels)."""
    try:
        return None if label_column is None else _column_index(stub, label_column, "data.label_column")
    except DataError:
        return None


def _needed(stub: Table, columns: list | None, lab: int | None) -> list[int] | None:
    """The file's columns that ``columns`` and the label column ``lab`` read (sorted), or None for all."""
    if columns is None or not isinstance(columns, (list, tuple)) or not columns:
        return None
    return sorted({_column_index(stub, c, "data.columns") for c in columns} | ({lab} if lab is not None else set()))


def _read_text(p: Path, columns: list | None = None, label_column: str | int | None = None,
               label_text: bool = False) -> Table:
    """A text table; with ``columns`` only the selected columns (and the label) are parsed, the others are
    left NaN, so a column of names or dates can stay in the file. The label column's cells are kept as
    text when one is not a number, or always with ``label_text`` (a held-out file of a run with names)."""
    delim = _DELIMITERS[p.suffix.lower()]
    # utf-8-sig: a spreadsheet's byte-order mark is not part of the first name; a byte that is not UTF-8
    # (a Latin-1 name in a text column) becomes U+FFFD instead of stopping the read
    with open(p, newline="", encoding="utf-8-sig", errors="replace") as fh:
        lines = [(i + 1, line) for i, line in enumerate(fh) if line.strip()]
    if not lines:
        raise DataError(f"{p} is empty; it must hold at least one row")
    if delim == "," and "," not in lines[0][1]:  # a .csv separated by semicolons or tabs (spreadsheet locales)
        delim = next((d for d in (";", "\t") if d in lines[0][1]), delim)

    def cells(line: str) -> list[str]:
        if delim is None:
            return line.split()
        return next(csv.reader([line], delimiter=delim))

    first = [c.strip() for c in cells(lines[0][1])]
    header = any(_number(c) is None for c in first)
    names = first if header else [str(j) for j in range(len(first))]
    rows = lines[1:] if header else lines
    if not rows:
        raise DataError(f"{p} has a header line but no rows")
    stub = Table(p, np.empty((0, len(names))), names, header)
    lab = _label_index(stub, label_column)  # its cells may be class names
    need = _needed(stub, columns, lab)
    cols = range(len(names)) if need is None else need
    label_cells: list[str] = []
    out = np.full((len(rows), len(names)), np.nan, dtype=np.float64)
    if need is None and not (label_text and lab is not None):  # numpy's C parser; on any problem the loop
        # below finds the line and column to name
        try:
            fast = np.loadtxt(p, delimiter=delim, skiprows=lines[0][0] if header else 0, ndmin=2, comments=None,
                              dtype=np.float64, encoding="utf-8-sig")
            if fast.shape == out.shape:
                return Table(p, fast, names, header)
        except (ValueError, UnicodeDecodeError):
            pass
    # the csv module: quoted cells (a name with a comma) and a check that every row has the header's cells
    for r, (lineno, line) in enumerate(rows):
        row = cells(line)
        if len(row) != len(names):
            raise DataError(f"{p} line {lineno} has {len(row)} cells, the {'header' if header else 'first row'} "
                            f"{len(names)}; every row needs the same columns")
        for j in cols:
            v = _number(row[j])
            if j == lab:
                label_cells.append(row[j].strip())
                label_text = label_text or v is None
                v = np.nan if v is None else v
            if v is None:
                hint = "fix the cell" if need is not None else \
                    "fix the cell or leave the column out with data.columns (a list of the columns to model)"
                raise DataError(f"{p} line {lineno}, column {names[j]!r}: {row[j].strip()!r} is not a number; {hint}")
            out[r, j] = v
    table = Table(p, out, names, header)
    if lab is not None and label_text:
        table.text[lab] = label_cells
    return table


def read_table(path: str | Path, key: str | None = None, what: str = "data.path", columns: list | None = None,
               label_column: str | int | None = None, label_text: bool = False) -> Table:
    """Read a table file (see the module docstring); ``.npy`` is memory-mapped, ``.npz`` needs
    ``key`` when it holds several arrays. A text file's empty cells (and "NA", "null", ...) read as NaN;
    given ``columns`` (names or 0-based indices), only those and ``label_column`` are parsed (the others
    stay NaN), so a column of text may stay in the file. Raises :class:`DataError` (missing file, unknown
    extension, empty file, a cell that is not a number with its line and column, ragged rows)."""
    p = _existing(path, what)
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            return _numbered(p, _as_2d(np.load(p, mmap_mode="r", allow_pickle=False), p))
        if suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                keys = list(z.keys())
                if not keys:
                    raise DataError(f"{p} holds no arrays")
                if key is None and len(keys) > 1:
                    raise DataError(f"{p} holds several arrays ({', '.join(keys)}); choose one with data.key")
                k = keys[0] if key is None else key
                if k not in keys:
                    raise DataError(f"{p} has no array {k!r} (data.key); it holds {', '.join(keys)}")
                return _numbered(p, _as_2d(z[k], p))
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{p} is not a readable {suffix} file ({e}); save it with numpy.save / numpy.savez") from e
    return _read_text(p, columns, label_column, label_text)


def _numbered(p: Path, arr: np.ndarray) -> Table:
    """A table without a header: its columns are named by their 0-based index."""
    return Table(p, arr, [str(j) for j in range(arr.shape[1])], False)


def _column_index(table: Table, spec: str | int, what: str) -> int:
    if isinstance(spec, str) and spec in table.names and table.header:
        return table.names.index(spec)
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().lstrip("-").isdigit()):
        j = int(spec)
        if not 0 <= j < len(table.names):
            raise DataError(f"{table.path}: {what}={spec!r} is out of range; the file has {len(table.names)} columns "
                            f"(0..{len(table.names) - 1})")
        return j
    known = ", ".join(table.names) if table.header else "none: the file has no header, use 0-based indices"
    raise DataError(f"{table.path} has no column {spec!r} ({what}); its columns: {known}")


def select_columns(table: Table, columns: list | None, label_column: str | int | None,
                   classes: list[str] | None = None):
    """``(x, y, names)``: the feature columns (a view of a memory map when they are contiguous),
    integer labels (``int64``, or None) and the features' names. A label column of class names maps
    them to ``0..K-1`` in sorted order (as torchvision's ``ImageFolder`` orders its folders), or in the
    order of ``classes`` (a training file's: ``table.classes``) when given."""
    label = None if label_column is None else _column_index(table, label_column, "data.label_column")
    if columns is None:
        idx = [j for j in range(len(table.names)) if j != label]
    else:
        if not isinstance(columns, (list, tuple)) or not columns:
            raise DataError(f"data.columns must be a non-empty list of names or indices, got {columns!r}")
        idx = [_column_index(table, c, "data.columns") for c in columns]
        if label is not None and label in idx:
            raise DataError(f"{table.path}: column {table.names[label]!r} is both a feature (data.columns) and "
                            "the label (data.label_column); leave it out of data.columns")
    if not idx:
        raise DataError(f"{table.path} has no feature column besides the label column")
    if idx == list(range(idx[0], idx[-1] + 1)):
        x = table.values[:, idx[0]:idx[-1] + 1]  # a view: no copy of a memory map
    else:
        x = table.values[:, idx]
    y = None
    if label is not None and label in table.text:
        y = _class_labels(table, label, classes)
    elif label is not None:
        y = _labels(np.asarray(table.values[:, label], dtype=np.float64), table, label)
    return x, y, [table.names[j] for j in idx]


def _class_labels(table: Table, j: int, classes: list[str] | None) -> np.ndarray:
    """The labels of a column of class names (``table.classes`` is set to the names in label order)."""
    cells = table.text[j]
    if "" in cells:
        raise DataError(f"{table.path} {_row_name(table, cells.index(''))}, label column {table.names[j]!r}: "
                        "the label is empty; every row needs its class")
    names = sorted(set(cells)) if classes is None else list(classes)
    index = {c: k for k, c in enumerate(names)}
    unknown = [c for c in cells if c not in index]
    if unknown:
        r = cells.index(unknown[0])
        raise DataError(f"{table.path} {_row_name(table, r)}, label column {table.names[j]!r}: class {unknown[0]!r} "
                        f"is not one of the training file's ({', '.join(names)})")
    table.classes = names
    return np.array([index[c] for c in cells], dtype=np.int64)


def _labels(col: np.ndarray, table: Table, j: int) -> np.ndarray:
    bad = np.flatnonzero(~np.isfinite(col) | (col != np.round(col)) | (col < 0))
    if bad.size:
        r = int(bad[0])
        raise DataError(f"{table.path} {_row_name(table, r)}, label column {table.names[j]!r}: {col[r]!r} is not an "
                        f"integer >= 0 ({bad.size} such row(s)); class labels must be 0, 1, 2, ... or names")
    return col.astype(np.int64)


def _row_name(table: Table, r: int) -> str:
    if table.path.suffix.lower() in _DELIMITERS:
        return f"data row {r + 1}"
    return f"row {r} (0-based)"


def _finite_rows(x: np.ndarray) -> np.ndarray:
    """Boolean ``(N,)``: rows whose values are all finite (read in chunks)."""
    if x.dtype.kind not in "fc":
        return np.ones(x.shape[0], dtype=bool)
    ok = np.empty(x.shape[0], dtype=bool)
    for s in range(0, x.shape[0], _CHUNK_ROWS):
        ok[s:s + _CHUNK_ROWS] = np.isfinite(x[s:s + _CHUNK_ROWS]).all(1)
    return ok


def check_rows_finite(table: Table, x: np.ndarray, y: np.ndarray | None, drop: bool):
    """``(x, y)`` unchanged if every value of ``x`` is finite; else the rows without NaN / inf
    (``drop``) or a :class:`DataError` giving their number and the first row."""
    ok = _finite_rows(x)
    if ok.all():
        return x, y
    if not drop:
        r = int(np.flatnonzero(~ok)[0])
        nbad = int(sum(int((~np.isfinite(np.asarray(x[s:s + _CHUNK_ROWS]))).sum())
                       for s in range(0, x.shape[0], _CHUNK_ROWS)))
        raise DataError(f"{table.path} holds {nbad} missing (empty, NA), NaN or inf value(s) in {int((~ok).sum())} "
                        f"row(s), the first in "
                        f"{_row_name(table, r)}; remove them or set data.drop_nonfinite: true to drop those rows")
    if not ok.any():
        raise DataError(f"{table.path}: every row holds NaN or inf; nothing is left with data.drop_nonfinite")
    return np.asarray(x[ok]), (None if y is None else y[ok])


def read_rows_like(path: str | Path, key: str | None, columns: list | None, label_column: str | int | None,
                   drop_nonfinite: bool = False, what: str = "data.path", classes: list[str] | None = None):
    """``(x, y, names, table)`` of a file read and selected as a run's training file was (``classes``:
    the training file's class names, for a label column of names)."""
    table = read_table(path, key, what, columns, label_column, label_text=classes is not None)
    x, y, names = select_columns(table, columns, label_column, classes)
    x, y = check_rows_finite(table, x, y, drop_nonfinite)
    return x, y, names, table


def write_csv(path: str | Path, columns: np.ndarray, names: list[str]) -> None:
    """Write ``columns`` (``(N, C)``, or ``(N,)`` for one) as a CSV file under a header of ``names``, 17
    significant digits (float64 reads back exactly): the tables ``fastcnf score`` and ``sample`` write."""
    np.savetxt(path, np.asarray(columns, dtype=np.float64).reshape(len(columns), -1), delimiter=",", fmt="%.17g",
               header=",".join(names), comments="")


def table_tensor(x: np.ndarray) -> torch.Tensor:
    """float64 tensor sharing memory with ``x`` (a memory map stays on disk)."""
    with warnings.catch_warnings():  # a read-only memory map: batches only ever read from it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(x if x.dtype == np.float64 else np.asarray(x, dtype=np.float64))


def _split(x: np.ndarray, y: np.ndarray | None, n_out: int, ordered: bool, rng: np.random.Generator):
    """``(rest, held_out)``, each ``(x, y)``: the last ``n_out`` rows (ordered) or ``n_out`` rows of
    a permutation."""
    n = x.shape[0]
    if ordered:
        keep, out = slice(0, n - n_out), slice(n - n_out, n)
    else:
        perm = rng.permutation(n)
        keep, out = np.sort(perm[n_out:]), np.sort(perm[:n_out])
    pick = (lambda a, s: None if a is None else a[s])
    return (pick(x, keep), pick(y, keep)), (pick(x, out), pick(y, out))


def _listed(names: list[str], most: int = 12) -> str:
    """The names, comma-separated; a longer list as its first 9, "...", its last 2 (data.json keeps them all)."""
    if len(names) <= most:
        return ", ".join(names)
    return ", ".join(names[:9] + ["..."] + names[-2:])


def load_table(cfg, seed: int = 0) -> TableBundle:
    """The ``table`` data set of ``cfg`` (a :class:`~fastcnf.config.DataConfig`): see the module
    docstring. Standardisation is applied afterwards by :func:`fastcnf.data.load_data`."""
    if not cfg.path:
        raise DataError("data.name=table needs data.path: a .npy, .npz, .csv, .tsv or .txt file")
    x, y, names, table = read_rows_like(cfg.path, cfg.key, cfg.columns, cfg.label_column, cfg.drop_nonfinite)
    ordered = table.memory_mapped
    rng = np.random.default_rng(seed)
    parts = []

    def held_out(attr: str, fraction: float, x, y):
        p = getattr(cfg, attr)
        if p:
            hx, hy, hnames, _ = read_rows_like(p, cfg.key, cfg.columns, cfg.label_column, cfg.drop_nonfinite,
                                               f"data.{attr}", table.classes)
            if hnames != names and table.header:
                raise DataError(f"{p} ({'data.' + attr}) has columns {hnames}, {cfg.path} has {names}; "
                                "the files must have the same columns")
            if hx.shape[1] != x.shape[1]:
                raise DataError(f"{p} ({'data.' + attr}) has {hx.shape[1]} feature columns, {cfg.path} has "
                                f"{x.shape[1]}; the files must have the same columns")
            parts.append(f"{attr[:-5]} from {p}")
            return (x, y), (hx, hy)
        n_out = int(fraction * x.shape[0])
        if n_out == 0:
            return (x, y), None
        parts.append(f"{attr[:-5]}: {'the last' if ordered else 'a seeded random'} {fraction:g} of the rows "
                     f"({n_out})")
        return _split(x, y, n_out, ordered, rng)

    (x, y), test = held_out("test_path", cfg.test_fraction, x, y)
    if test is None:
        raise DataError(f"{cfg.path} has {x.shape[0]} rows: too few for data.test_fraction={cfg.test_fraction}; "
                        "give data.test_path or more rows")
    (x, y), val = held_out("val_path", cfg.val_fraction, x, y)
    if x.shape[0] == 0:
        raise DataError(f"{cfg.path}: no training rows are left after the held-out splits")
    labels = [a for a in (y, test[1], None if val is None else val[1]) if a is not None]
    num_classes = int(max(int(a.max()) for a in labels if a.size) + 1) if labels else None
    if table.classes is not None:  # class names: their labels 0..K-1 go in the split line
        num_classes = len(table.classes)
        parts.append("labels " + _listed([f"{c}={k}" for k, c in enumerate(table.classes)]))

    def split(xy) -> DataSplit:
        return DataSplit(table_tensor(xy[0]), None if xy[1] is None else torch.from_numpy(xy[1]))

    where = "memory-mapped, " if ordered else ""
    return TableBundle(
        columns=names, name="table", train=split((x, y)), test=split(test), shape=(x.shape[1],), num_classes=num_classes,
        levels=None, split=f"table {cfg.path} ({where}{len(names)} columns: {_listed(names)}); "
                           f"{'; '.join(parts)}; train: the remaining {x.shape[0]} rows",
        val=None if val is None else split(val), class_names=table.classes)
