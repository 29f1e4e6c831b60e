"""Image readers (IDX, CIFAR-10 binary, digits), the MNIST test-set split, and dequantisation."""
from __future__ import annotations

import gzip
import hashlib
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from fastcnf.config import ConfigError
from fastcnf.data import (
    DataConfig,
    DataError,
    check_finite,
    dequantize,
    load_data,
    read_cifar10_batch,
    read_idx,
)

REAL_MNIST = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist"
MNIST_NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte"]


def idx_bytes(array: np.ndarray) -> bytes:
    """Standard IDX encoding of a uint8 array (magic 0x0000 08 ndim, big-endian dims)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    data = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def fake_mnist(root: Path, n_train: int, n_test: int, seed: int = 0, gz: bool = True,
               with_train: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, array) in enumerate(arrays.items()):
        if with_train or name.startswith("t10k"):
            write_idx(root / name, array, gz=gz and i % 2 == 0)  # mix plain and gzipped files
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reader_round_trips_images_and_labels_exactly(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 5, dtype=np.uint8)
    got_images = read_idx(write_idx(tmp_path / "img", images, gz), expected_magic=2051)
    got_labels = read_idx(write_idx(tmp_path / "lab", labels, gz), expected_magic=2049)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert got_images.dtype == np.uint8


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx_file_is_a_data_error_naming_the_file(tmp_path, gz):
    data = idx_bytes(np.zeros((4, 28, 28), dtype=np.uint8))
    path = tmp_path / ("cut-images.gz" if gz else "cut-images")
    path.write_bytes(gzip.compress(data)[:-30] if gz else data[:-100])
    with pytest.raises(DataError, match="cut-images"):
        read_idx(path, expected_magic=2051)


def test_idx_with_wrong_magic_or_extra_bytes_is_a_data_error(tmp_path):
    labels = write_idx(tmp_path / "labels", np.arange(10, dtype=np.uint8))
    with pytest.raises(DataError, match="magic number is 2049, expected 2051"):
        read_idx(labels, expected_magic=2051)
    padded = tmp_path / "padded"
    padded.write_bytes(idx_bytes(np.arange(10, dtype=np.uint8)) + b"\x00")
    with pytest.raises(DataError, match="padded"):
        read_idx(padded, expected_magic=2049)
    (tmp_path / "junk").write_bytes(b"\x12\x34\x56\x78" + bytes(20))
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "junk")


def test_mnist_reads_the_four_idx_files_plain_or_gzipped(tmp_path):
    arrays = fake_mnist(tmp_path, n_train=12, n_test=5)
    bundle = load_data(DataConfig(name="mnist", root=str(tmp_path)))
    assert bundle.shape == (1, 28, 28) and bundle.levels == 256 and bundle.num_classes == 10
    assert bundle.is_image and bundle.dim == 784
    assert bundle.train.x.dtype == torch.uint8 and bundle.train.y.dtype == torch.int64
    np.testing.assert_array_equal(bundle.train.x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(bundle.train.y.numpy(), arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(bundle.test.x[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(bundle.test.y.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert load_data(DataConfig(name="fmnist", root=str(tmp_path))).name == "fmnist"


def test_mnist_subsamples_the_first_n_examples(tmp_path):
    arrays = fake_mnist(tmp_path, n_train=12, n_test=5)
    bundle = load_data(DataConfig(name="mnist", root=str(tmp_path), n_train=4, n_test=2))
    np.testing.assert_array_equal(bundle.train.x[:, 0].numpy(),
                                  arrays["train-images-idx3-ubyte"][:4])
    assert len(bundle.test) == 2 and "first 4 train / 2 test" in bundle.split
    with pytest.raises(DataError, match="n_train=13 exceeds the 12"):
        load_data(DataConfig(name="mnist", root=str(tmp_path), n_train=13))


def test_missing_directory_or_files_name_the_path_and_expected_files(tmp_path):
    absent = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        load_data(DataConfig(name="mnist", root=str(absent)))
    assert str(absent) in str(err.value)
    assert all(name in str(err.value) for name in MNIST_NAMES)
    with pytest.raises(DataError, match="DataConfig.root"):
        load_data(DataConfig(name="fmnist"))
    fake_mnist(tmp_path / "part", 3, 3)
    (tmp_path / "part" / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="missing train-labels-idx1-ubyte"):
        load_data(DataConfig(name="fmnist", root=str(tmp_path / "part")))


def test_mnist_with_only_test_files_points_to_mnist_test_split(tmp_path):
    fake_mnist(tmp_path, 0, 10, with_train=False)
    with pytest.raises(DataError, match="mnist-test-split"):
        load_data(DataConfig(name="mnist", root=str(tmp_path)))


def test_image_label_count_mismatch_is_a_data_error(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((4, 28, 28), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(DataError, match="3 labels but"):
        load_data(DataConfig(name="mnist-test-split", root=str(tmp_path)))


def test_mnist_test_split_takes_the_first_90_percent_in_file_order(tmp_path):
    arrays = fake_mnist(tmp_path, 0, 20, with_train=False, gz=False)
    bundle = load_data(DataConfig(name="mnist-test-split", root=str(tmp_path)))
    images, labels = arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"]
    np.testing.assert_array_equal(bundle.train.x[:, 0].numpy(), images[:18])
    np.testing.assert_array_equal(bundle.test.x[:, 0].numpy(), images[18:])
    np.testing.assert_array_equal(bundle.test.y.numpy(), labels[18:])
    assert "first 18 train / last 2 test" in bundle.split
    half = load_data(DataConfig(name="mnist-test-split", root=str(tmp_path), train_fraction=0.5))
    assert (len(half.train), len(half.test)) == (10, 10)
    with pytest.raises(ConfigError, match="train_fraction"):
        DataConfig(name="mnist-test-split", root=str(tmp_path), train_fraction=1.0)


@pytest.mark.skipif(not REAL_MNIST.is_dir(), reason=f"real MNIST test set not at {REAL_MNIST}")
def test_real_mnist_test_set_splits_9000_1000_with_the_published_label_counts():
    raw = gzip.decompress((REAL_MNIST / "t10k-labels-idx1-ubyte.gz").read_bytes())
    assert hashlib.sha256(raw).hexdigest() == (
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2")
    bundle = load_data(DataConfig(name="mnist-test-split", root=str(REAL_MNIST)))
    assert bundle.train.x.shape == (9000, 1, 28, 28) and bundle.test.x.shape == (1000, 1, 28, 28)
    counts = torch.bincount(torch.cat([bundle.train.y, bundle.test.y]), minlength=10)
    assert counts.tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert bundle.train.y[:9000].tolist() == list(raw[8:9008])
    assert int(bundle.train.x.max()) == 255 and bundle.levels == 256


def cifar_records(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, bytes]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    data = b"".join(bytes([labels[i]]) + images[i].tobytes() for i in range(n))
    return images, labels, data


def test_cifar10_binary_batches_read_back_exactly_from_the_subfolder(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    expected = []
    for i in range(1, 6):
        images, labels, data = cifar_records(2, seed=i)
        (folder / f"data_batch_{i}.bin").write_bytes(data)
        expected.append((images, labels))
    test_images, test_labels, data = cifar_records(3, seed=9)
    (folder / "test_batch.bin").write_bytes(data)
    bundle = load_data(DataConfig(name="cifar10", root=str(tmp_path)))
    assert bundle.shape == (3, 32, 32) and bundle.levels == 256 and bundle.num_classes == 10
    np.testing.assert_array_equal(bundle.train.x.numpy(),
                                  np.concatenate([e[0] for e in expected]))
    np.testing.assert_array_equal(bundle.train.y.numpy(),
                                  np.concatenate([e[1] for e in expected]))
    np.testing.assert_array_equal(bundle.test.x.numpy(), test_images)
    np.testing.assert_array_equal(bundle.test.y.numpy(), test_labels)


def test_cifar10_truncated_or_missing_files_are_data_errors(tmp_path):
    _, _, data = cifar_records(2, seed=0)
    (tmp_path / "test_batch.bin").write_bytes(data[:-5])
    with pytest.raises(DataError, match="test_batch.bin"):
        read_cifar10_batch(tmp_path / "test_batch.bin")
    with pytest.raises(DataError, match="missing data_batch_1.bin"):
        load_data(DataConfig(name="cifar10", root=str(tmp_path)))


def test_digits_has_1797_images_with_17_levels_split_disjointly_and_deterministically():
    from sklearn.datasets import load_digits

    bundle = load_data(DataConfig(name="digits"), seed=0)
    assert (len(bundle.train), len(bundle.test)) == (1437, 360)
    assert bundle.shape == (1, 8, 8) and bundle.levels == 17 and bundle.num_classes == 10
    assert bundle.train.x.dtype == torch.uint8 and int(bundle.train.x.max()) == 16
    again = load_data(DataConfig(name="digits"), seed=7)  # the split ignores the run seed
    assert torch.equal(bundle.train.x, again.train.x) and torch.equal(bundle.test.y, again.test.y)

    def rows(split) -> Counter:
        return Counter(zip(map(bytes, split.x.reshape(len(split), -1).numpy()),
                           split.y.tolist()))

    digits = load_digits()
    full = Counter(zip(map(bytes, digits.images.reshape(1797, -1).astype(np.uint8)),
                       digits.target.tolist()))
    assert rows(bundle.train) + rows(bundle.test) == full  # a partition of the 1,797 images
    assert "1437 train / last 360 test" in bundle.split


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_dequantize_stays_in_the_pixels_bin(levels):
    x = torch.arange(levels, dtype=torch.uint8 if levels <= 256 else torch.int64).repeat(2000)
    v = dequantize(x, levels, generator=torch.Generator().manual_seed(0))
    assert v.dtype == torch.float32 and float(v.min()) >= 0.0 and float(v.max()) < 1.0
    assert torch.equal(torch.floor(v.double() * levels).long(), x.long())
    # Uniform noise: the mean offset inside each bin is 1/2.
    assert float((v.double() * levels - x.double()).mean()) == pytest.approx(0.5, abs=0.01)


def test_dequantize_is_reproducible_and_rejects_bad_input():
    x = torch.full((1000,), 255, dtype=torch.uint8)
    a = dequantize(x, 256, torch.Generator().manual_seed(1))
    assert torch.equal(a, dequantize(x, 256, torch.Generator().manual_seed(1)))
    with pytest.raises(DataError, match="integer"):
        dequantize(x.float(), 256)
    with pytest.raises(DataError, match=r"\[0, 16\]"):
        dequantize(torch.tensor([17]), 17)


def test_dequantize_steps_back_inside_the_bin_when_float32_rounds_onto_its_edge(monkeypatch):
    # u just below 1: (255 + u) / 256 rounds to exactly 1.0 in float32 without the correction.
    def almost_one(shape, generator=None, **kw):
        return torch.full(shape, 1 - 2.0**-40, **kw)

    monkeypatch.setattr(torch, "rand", almost_one)
    x = torch.tensor([0, 16, 255], dtype=torch.uint8)
    v = dequantize(x, 256)
    assert float(v.max()) < 1.0
    assert torch.equal(torch.floor(v.double() * 256).long(), x.long())
    assert torch.equal(v, torch.nextafter((x.float() + 1) / 256, torch.zeros(3)))


def test_check_finite_names_what_holds_nan():
    check_finite(torch.zeros(3), "ok")
    check_finite(np.arange(3), "integers")
    with pytest.raises(DataError, match="train batch holds 1 non-finite"):
        check_finite(torch.tensor([0.0, float("nan")]), "train batch")
    with pytest.raises(DataError, match="array"):
        check_finite(np.array([np.inf]), "array")
