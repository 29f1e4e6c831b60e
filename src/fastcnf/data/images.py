"""Image data sets: scikit-learn's digits, MNIST / Fashion-MNIST (IDX files) and CIFAR-10 (binary).

Images are returned as ``torch.uint8`` tensors of shape ``(N, C, H, W)`` with values in
``[0, levels - 1]``, labels as ``int64``; :func:`fastcnf.data.dequantize` turns a batch into
floats in ``[0, 1)``. Files are read from a directory the user names; nothing is downloaded.

File formats:

* IDX (LeCun et al. 1998, http://yann.lecun.com/exdb/mnist/): big-endian magic ``0x00000803``
  (2051) for ``uint8`` images ``N x 28 x 28`` and ``0x00000801`` (2049) for ``uint8`` labels, then
  one 32-bit big-endian size per dimension, then the bytes. Files may be gzipped (detected from
  the gzip magic bytes, whatever the name).
* CIFAR-10 binary version (Krizhevsky 2009): records of 1 label byte + 3072 pixel bytes
  (1024 red, 1024 green, 1024 blue, each 32 x 32 row-major), in ``data_batch_1.bin`` ..
  ``data_batch_5.bin`` and ``test_batch.bin``. The pickled Python version is never read.

References: FFJORD (Grathwohl et al. 2019) §5 and InfoCNF (Nguyen et al. 2019, "InfoCNF: Efficient
Conditional Continuous Normalizing Flow Using Adaptive Solvers") §4 train on MNIST and CIFAR-10;
scikit-learn's ``load_digits`` (UCI optical digits, 8 x 8, 17 grey levels) is the CPU-scale stand-in.
"""
from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from .base import DataBundle, DataError, DataSplit

__all__ = [
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "MNIST_FILES",
    "CIFAR10_TRAIN_FILES",
    "CIFAR10_TEST_FILE",
    "read_idx",
    "read_cifar10_batch",
    "load_digits_data",
    "load_mnist",
    "load_mnist_test_split",
    "load_cifar10",
]

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
"""The four standard IDX file names shared by MNIST and Fashion-MNIST (each may end in ``.gz``)."""
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch.bin"
_CIFAR10_RECORD = 1 + 3 * 32 * 32
_DIGITS_SPLIT_SEED = 0


def _fraction_count(train_fraction: float, total: int, what: str) -> int:
    """Number of training examples for a fraction; both parts must be non-empty."""
    if not 0.0 < train_fraction < 1.0:
        raise DataError(f"train_fraction must lie strictly between 0 and 1, got {train_fraction}")
    n_train = int(math.floor(train_fraction * total + 1e-9))
    if not 0 < n_train < total:
        raise DataError(f"train_fraction={train_fraction} of the {total} {what} leaves an empty "
                        "train or test split")
    return n_train


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped if it starts with the gzip magic; failures name the file."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from err
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"cannot decompress {path}: the gzip stream is truncated or corrupt "
                            f"({err})") from err
    return raw


def read_idx(path: str | Path, expected_magic: int | None = None) -> np.ndarray:
    """Read one IDX file of unsigned bytes (plain or gzipped) into a ``uint8`` array.

    Args:
        path: the file.
        expected_magic: 2051 for images, 2049 for labels; ``None`` accepts any ``uint8`` IDX.

    Raises:
        DataError naming the file: unreadable, bad gzip stream, wrong magic number, or a size
        that does not match the header (truncated or padded file).
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: only {len(raw)} bytes, too short for an IDX header "
                        "(truncated file)")
    magic = int.from_bytes(raw[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise DataError(f"{path}: IDX magic number is {magic}, expected {expected_magic} "
                        f"({'images' if expected_magic == IDX_IMAGES_MAGIC else 'labels'})")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] == 0:
        raise DataError(f"{path}: not an IDX file of unsigned bytes (magic 0x{magic:08x})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: IDX header for {ndim} dimensions is cut short "
                        "(truncated file)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(dims)
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX header says dimensions {dims} ({expected} bytes) but the "
                        f"file holds {len(raw) - header} data bytes (truncated or corrupt file)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _require_dir(root: str | Path | None, dataset: str, expected: list[str]) -> Path:
    listing = ", ".join(expected)
    if root is None:
        raise DataError(f"data set {dataset!r} is read from files: set data.root (DataConfig.root) to a "
                        f"directory holding {listing}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"data set {dataset!r}: directory {path} does not exist; expected it to "
                        f"hold {listing}")
    return path


def _find(root: Path, name: str) -> Path | None:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_idx_pair(images_path: Path, labels_path: Path) -> DataSplit:
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{images_path}: images have shape {images.shape}, expected (N, 28, 28)")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"{labels_path} holds {labels.shape[0]} labels but {images_path} holds "
                        f"{images.shape[0]} images")
    if labels.size and int(labels.max()) > 9:
        raise DataError(f"{labels_path}: label {int(labels.max())} outside 0..9 (corrupt file)")
    return DataSplit(torch.from_numpy(images).unsqueeze(1),
                     torch.from_numpy(labels.astype(np.int64)))


def _mnist_bundle(name: str, train: DataSplit, test: DataSplit, split: str) -> DataBundle:
    return DataBundle(name=name, train=train, test=test, shape=(1, 28, 28), num_classes=10,
                      levels=256, split=split)


def load_mnist(root: str | Path | None, name: str = "mnist") -> DataBundle:
    """MNIST or Fashion-MNIST (``name="fmnist"``) from the four standard IDX files in ``root``.

    Raises:
        DataError: missing directory or files (naming them), corrupt files; for ``mnist`` with
            only the ``t10k`` files present, a message pointing to ``mnist-test-split``.
    """
    expected = [f"{base}[.gz]" for base in MNIST_FILES.values()]
    path = _require_dir(root, name, expected)
    found = {key: _find(path, base) for key, base in MNIST_FILES.items()}
    missing = [MNIST_FILES[key] for key, value in found.items() if value is None]
    if missing:
        if name == "mnist" and all(found[k] for k in ("test_images", "test_labels")):
            raise DataError(f"{path} holds only MNIST's t10k (10,000-image test) files; "
                            f"{' and '.join(missing)} are missing. To train on the test images, "
                            "use the data set 'mnist-test-split' (first 9,000 train / last 1,000 "
                            "test)")
        raise DataError(f"data set {name!r}: missing {', '.join(missing)} (plain or .gz) in "
                        f"{path}; expected {', '.join(expected)}")
    train = _read_idx_pair(found["train_images"], found["train_labels"])
    test = _read_idx_pair(found["test_images"], found["test_labels"])
    title = "Fashion-MNIST" if name == "fmnist" else "MNIST"
    return _mnist_bundle(name, train, test,
                         f"{title} standard split: {len(train)} train / {len(test)} t10k test")


def load_mnist_test_split(root: str | Path | None, train_fraction: float = 0.9) -> DataBundle:
    """MNIST's 10,000 test images alone, split in file order: the first ``train_fraction``
    (9,000 by default) for training, the rest (1,000) for testing. Only the ``t10k`` files are
    read, so this works where the 60,000-image training set is not available."""
    name = "mnist-test-split"
    bases = [MNIST_FILES["test_images"], MNIST_FILES["test_labels"]]
    path = _require_dir(root, name, [f"{b}[.gz]" for b in bases])
    found = [_find(path, base) for base in bases]
    missing = [base for base, value in zip(bases, found) if value is None]
    if missing:
        raise DataError(f"data set {name!r}: missing {', '.join(missing)} (plain or .gz) in "
                        f"{path}")
    full = _read_idx_pair(found[0], found[1])
    n_train = _fraction_count(train_fraction, len(full), "MNIST t10k images")
    train = DataSplit(full.x[:n_train], full.y[:n_train])
    test = DataSplit(full.x[n_train:], full.y[n_train:])
    return _mnist_bundle(name, train, test,
                         f"MNIST t10k file only, in file order: first {n_train} train / last "
                         f"{len(full) - n_train} test (seed-independent; not the standard split)")


def load_digits_data(train_fraction: float = 0.8) -> DataBundle:
    """scikit-learn's bundled digits: 1,797 images of 8 x 8 pixels with values 0..16 (17 levels).

    The split is a fixed permutation (``numpy.random.default_rng(0)``, independent of the run
    seed): the first ``train_fraction`` of it (1,437 images at 0.8) trains, the rest tests.
    """
    from sklearn.datasets import load_digits  # imported here: scikit-learn is slow to import

    digits = load_digits()
    images = np.asarray(digits.images)
    if images.shape[1:] != (8, 8) or images.min() < 0 or images.max() > 16:
        raise DataError("scikit-learn's load_digits returned unexpected data "
                        f"(shape {images.shape}, range [{images.min()}, {images.max()}])")
    x = torch.from_numpy(images.astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(np.asarray(digits.target, dtype=np.int64))
    order = torch.from_numpy(np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(x)))
    n_train = _fraction_count(train_fraction, len(x), "digits")
    train_idx, test_idx = order[:n_train], order[n_train:]
    return DataBundle(
        name="digits", train=DataSplit(x[train_idx], y[train_idx]),
        test=DataSplit(x[test_idx], y[test_idx]), shape=(1, 8, 8), num_classes=10, levels=17,
        split=(f"sklearn digits: fixed permutation (numpy default_rng({_DIGITS_SPLIT_SEED})), "
               f"first {n_train} train / last {len(x) - n_train} test (seed-independent)"))


def read_cifar10_batch(path: str | Path) -> DataSplit:
    """One CIFAR-10 binary batch file: ``(N, 3, 32, 32)`` uint8 images and ``(N,)`` labels."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) == 0 or len(raw) % _CIFAR10_RECORD:
        raise DataError(f"{path}: {len(raw)} bytes is not a whole number of {_CIFAR10_RECORD}-byte"
                        " CIFAR-10 records (truncated or corrupt file)")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR10_RECORD)
    labels = records[:, 0].astype(np.int64)
    if int(labels.max()) > 9:
        raise DataError(f"{path}: label {int(labels.max())} outside 0..9 (corrupt file, or not "
                        "the CIFAR-10 binary version)")
    images = records[:, 1:].reshape(-1, 3, 32, 32).copy()
    return DataSplit(torch.from_numpy(images), torch.from_numpy(labels))


def load_cifar10(root: str | Path | None) -> DataBundle:
    """CIFAR-10 (binary version) from ``root`` or ``root/cifar-10-batches-bin``: the 50,000
    training images of ``data_batch_1..5.bin`` and the 10,000 of ``test_batch.bin``."""
    names = [*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE]
    path = _require_dir(root, "cifar10", names)
    if not (path / CIFAR10_TEST_FILE).is_file() and (path / "cifar-10-batches-bin").is_dir():
        path = path / "cifar-10-batches-bin"
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        raise DataError(f"data set 'cifar10': missing {', '.join(missing)} in {path} (the "
                        f"binary version; expected {', '.join(names)}, possibly inside "
                        "cifar-10-batches-bin/)")
    parts = [read_cifar10_batch(path / n) for n in CIFAR10_TRAIN_FILES]
    train = DataSplit(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))
    test = read_cifar10_batch(path / CIFAR10_TEST_FILE)
    return DataBundle(name="cifar10", train=train, test=test, shape=(3, 32, 32), num_classes=10,
                      levels=256, split=f"CIFAR-10 standard split: {len(train)} train "
                      f"(data_batch_1..5) / {len(test)} test (test_batch)")
