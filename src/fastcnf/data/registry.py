"""One entry point for every data set: ``load_data(DataConfig(name=...), seed) -> DataBundle``.

Data sets are found through a name -> loader table (:data:`DATASETS` holds the one-line
descriptions), so adding a data set is one function and one line here.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from fastcnf.config import DataConfig, check_choice

from .base import DataBundle, DataError
from .images import load_cifar10, load_digits_data, load_mnist, load_mnist_test_split
from .image_folder import load_image_folder
from .maf import MAF_FILES, load_maf
from .standardize import Standardizer
from .table import TableBundle, load_table
from .spirals import load_spirals
from .toy import TOY_SAMPLERS, load_mix1d, load_toy
from .validation import carve_validation

__all__ = ["DataConfig", "DATASETS", "load_data", "standardize"]


_TOY_DESCRIPTIONS = {
    "swissroll": "FFJORD 2-D toy: swiss roll (scikit-learn, noise 1.0, scaled by 1/5)",
    "circles": "FFJORD 2-D toy: two concentric circles, radii 3 and 1.5",
    "rings": "FFJORD 2-D toy: four concentric rings, radii 3, 2.25, 1.5, 0.75",
    "moons": "FFJORD 2-D toy: two interleaved half-moons",
    "8gaussians": "FFJORD 2-D toy: eight Gaussians on a circle of radius 4/1.414",
    "pinwheel": "FFJORD 2-D toy: five-armed pinwheel",
    "2spirals": "FFJORD 2-D toy: two interleaved spirals",
    "checkerboard": "FFJORD 2-D toy: uniform on the black squares of a 4x4 checkerboard",
}

DATASETS: dict[str, str] = {
    **_TOY_DESCRIPTIONS,
    "mix1d": "1-D mixture of three Gaussians, labels = component (InfoCNF Appendix C)",
    "digits": "scikit-learn digits, 1,797 images 1x8x8, 17 levels, fixed 80/20 split (no files)",
    "mnist": "MNIST 1x28x28, 256 levels, standard 60,000/10,000 split (IDX files in root)",
    "fmnist": "Fashion-MNIST 1x28x28, 256 levels, standard 60,000/10,000 split (IDX files)",
    "mnist-test-split": "MNIST t10k file only: first 9,000 train / last 1,000 test (in root)",
    "cifar10": "CIFAR-10 3x32x32, 256 levels, binary version 50,000/10,000 (files in root)",
    "spirals": "bi-directional 2-D spirals (InfoCNF, Nguyen et al. 2019, App. E.1), 5,000/1,000 sequences of 200+100 steps",
    "table": "the user's table: data.path to .npy (memory-mapped) / .npz / .csv / .tsv / .txt, standardised",
    "image_folder": "the user's PNG / JPEG images: data.path to a folder, one sub-folder per class, 256 levels",
    **{name: f"MAF benchmark {name.upper()} (Papamakarios et al. 2017) from {', '.join(files)} in data.root"
       for name, files in MAF_FILES.items()},
}
"""Name -> one-line description of every data set :func:`load_data` knows."""

_Loader = Callable[[DataConfig, int], DataBundle]

#: the data sets read from ``data.path`` (and ``data.test_path`` / ``data.val_path``)
_PATH_SETS = ("table", "image_folder")


def _fraction(cfg: DataConfig, default: float) -> float:
    return default if cfg.train_fraction is None else float(cfg.train_fraction)


_LOADERS: dict[str, _Loader] = {
    **{name: (lambda cfg, seed, name=name: load_toy(name, cfg.n_train, cfg.n_test, seed))
       for name in TOY_SAMPLERS},
    "mix1d": lambda cfg, seed: load_mix1d(cfg.n_train, cfg.n_test, seed),
    "digits": lambda cfg, seed: load_digits_data(_fraction(cfg, 0.8)),
    "mnist": lambda cfg, seed: load_mnist(cfg.root, "mnist"),
    "fmnist": lambda cfg, seed: load_mnist(cfg.root, "fmnist"),
    "mnist-test-split": lambda cfg, seed: load_mnist_test_split(cfg.root, _fraction(cfg, 0.9)),
    "cifar10": lambda cfg, seed: load_cifar10(cfg.root),
    "spirals": lambda cfg, seed: load_spirals(cfg.n_train, cfg.n_test, seed),
    "table": load_table,
    "image_folder": load_image_folder,
    **{name: (lambda cfg, seed, name=name: load_maf(name, cfg.root)) for name in MAF_FILES},
}
assert set(_LOADERS) == set(DATASETS)


def _first(bundle: DataBundle, n_train: int, n_test: int) -> DataBundle:
    """Keep the first ``n_train`` / ``n_test`` examples of a file-backed data set."""
    if not n_train and not n_test:
        return bundle
    for what, n, split in (("n_train", n_train, bundle.train), ("n_test", n_test, bundle.test)):
        if n > len(split):
            raise DataError(f"{what}={n} exceeds the {len(split)} examples of {bundle.name!r}'s "
                            f"{what[2:]} split")
    train = bundle.train.head(n_train) if n_train else bundle.train
    test = bundle.test.head(n_test) if n_test else bundle.test
    return dataclasses.replace(
        bundle, train=train, test=test,
        split=f"{bundle.split}; subsampled to the first {len(train)} train / {len(test)} test")


def load_data(cfg: DataConfig, seed: int = 0) -> DataBundle:
    """Load the data set ``cfg.name``.

    Args:
        cfg: which data set, from where, and how much of it.
        seed: seeds the fixed draws of the synthetic sets (train: ``seed``, test: ``seed + 1``)
            and the validation split (:func:`~fastcnf.data.validation.carve_validation`);
            file-backed train and test splits do not depend on it.

    Raises:
        DataError: unknown name (listing valid names, with a close match if any), bad config
            values, missing or corrupt files.

    Example:
        >>> bundle = load_data(DataConfig(name="digits"))
        >>> bundle.shape, bundle.levels, len(bundle.train), len(bundle.test)
        ((1, 8, 8), 17, 1437, 360)
    """
    if not isinstance(cfg, DataConfig):
        raise DataError(f"load_data expects a DataConfig, got {type(cfg).__name__}")
    check_choice("data.name", cfg.name, DATASETS)
    if (cfg.path or cfg.test_path or cfg.val_path) and cfg.name not in _PATH_SETS:
        raise DataError(f"data.path / data.test_path / data.val_path are read by data.name={' or '.join(_PATH_SETS)}; "
                        f"{cfg.name!r} ignores them: set data.name=table (or image_folder) or remove them")
    bundle = _LOADERS[cfg.name](cfg, seed)
    if bundle.sampler is None:  # synthetic sets already drew n_train / n_test examples
        bundle = _first(bundle, cfg.n_train, cfg.n_test)
    return standardize(carve_validation(bundle, cfg.val_fraction, seed), cfg)


def standardize(bundle: DataBundle, cfg: DataConfig) -> DataBundle:
    """Attach the training split's :class:`~fastcnf.data.standardize.Standardizer` to a table
    (``data.standardize``, on by default); the splits keep the data's own units and the batches
    are standardised as they are drawn."""
    if not cfg.standardize or not isinstance(bundle, TableBundle):
        return bundle
    where = f"the training split of {cfg.path}" if cfg.path else "the training split"
    whiten = cfg.standardize == "whiten"
    return dataclasses.replace(bundle, standardizer=Standardizer.fit(bundle.train.x, bundle.columns, where, whiten))
