"""Every recipe whose data this machine lacks (MNIST's training files, Fashion-MNIST, CIFAR-10, the MAF
tables) trains one step and evaluates through ``fastcnf train``, at its own model, objective, methods and
schedule, on small files written in its data set's format: the recipes that cannot be measured here are
at least known to run. Overridden only: the data's root, the length (one step; the training-by-parts
recipes a turn of each part and one fine-tuning step), a batch of 8, evaluation on 8 examples at 1e-3,
no figures, checkpoints or validation. The larger models are marked ``slow`` (``pytest -m slow``).
``FASTCNF_TEST_DEVICE=cuda`` runs them on a GPU (benchmarks/gpu_check.sh)."""
from __future__ import annotations

import json
import math
import os
import struct

import numpy as np
import pytest

from fastcnf.cli import main
from fastcnf.config import list_recipes
from fastcnf.methods import load_recipe

MAF_SETS = ("power", "gas", "hepmass", "miniboone", "bsds300")
#: the data sets of the recipes concerned, and the folder under the fixture's root holding their files
ROOTS = {"mnist": "mnist", "fmnist": "fmnist", "cifar10": "cifar10", **{m: "maf" for m in MAF_SETS}}
#: over ~4 s each on a 2-core CPU (large multiscale models, large-batch micro-batches of one)
SLOW = {"cifar10-ccnf", "cifar10-ccnf-large", "cifar10-cnf", "cifar10-cnf-learned-tol", "cifar10-ffjord-1block",
        "cifar10-glow", "cifar10-glow-lr1e-5", "cifar10-glow-parts", "cifar10-glow-parts3", "cifar10-infocnf",
        "cifar10-infocnf-2x-large-learned-tol", "cifar10-infocnf-large", "cifar10-infocnf-large-learned-tol",
        "cifar10-infocnf-learned-tol", "cifar10-infocnf-manual-tol", "cifar10-toflow", "mnist-ccnf",
        "mnist-ccnf-large", "mnist-ffjord", "mnist-infocnf", "mnist-infocnf-large", "mnist-infocnf-learned-tol"}
RECIPES = sorted(r for r in list_recipes() if load_recipe(r).data.name in ROOTS)


def _idx(path, a: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 8, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape)
    path.write_bytes(header + a.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Small random files in each data set's own format (see fastcnf.data.images and fastcnf.data.maf)."""
    import h5py
    import pandas as pd

    root = tmp_path_factory.mktemp("formats")
    rng = np.random.default_rng(0)
    for name in ("mnist", "fmnist"):  # the four IDX files
        (root / name).mkdir()
        for prefix in ("train", "t10k"):
            _idx(root / name / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (24, 28, 28)))
            _idx(root / name / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, 24))
    (root / "cifar10").mkdir()  # binary batches: a label byte and 3,072 pixel bytes per record
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        records = np.concatenate([rng.integers(0, 10, (8, 1)), rng.integers(0, 256, (8, 3072))], 1)
        (root / "cifar10" / name).write_bytes(records.astype(np.uint8).tobytes())
    maf, n = root / "maf", 200
    for d in ("power", "gas", "hepmass", "miniboone", "BSDS300"):
        (maf / d).mkdir(parents=True)
    np.save(maf / "power" / "data.npy", rng.normal(size=(n, 8)))
    np.save(maf / "miniboone" / "data.npy", rng.normal(size=(n, 43)))
    pd.DataFrame({"Time": np.arange(n), "Meth": rng.normal(size=n), "Eth": rng.normal(size=n),
                  **{f"S{j}": rng.normal(size=n) for j in range(8)}}).to_pickle(maf / "gas" / "ethylene_CO.pickle")
    for name, extra in (("1000_train.csv", 0), ("1000_test.csv", 1)):  # the test file has one more column
        cols = np.column_stack([np.tile([1, 0], n // 2), rng.normal(size=(n, 22 + extra))])
        with open(maf / "hepmass" / name, "w") as fh:
            fh.write(",".join(["# label"] + [f"f{j}" for j in range(22 + extra)]) + "\n")
            fh.writelines(",".join(repr(float(v)) for v in r) + "\n" for r in cols)
    with h5py.File(maf / "BSDS300" / "BSDS300.hdf5", "w") as f:
        for k in ("train", "validation", "test"):
            f[k] = rng.normal(size=(n, 63)).astype(np.float32)
    return root


def test_the_recipes_concerned_are_the_ones_this_machine_cannot_measure():
    assert len(RECIPES) == 40 and SLOW <= set(RECIPES)
    assert {r.split("-")[0] for r in RECIPES} == {"cifar10", "fmnist", "mnist", "maf"}


@pytest.mark.parametrize("recipe", [pytest.param(r, marks=pytest.mark.slow) if r in SLOW else r for r in RECIPES])
def test_recipe_trains_a_step_and_evaluates_on_files_of_its_format(recipe, roots, tmp_path, capsys):
    cfg = load_recipe(recipe)
    sets = [f"data.root={roots / ROOTS[cfg.data.name]}", "train.iterations=1", "train.batch_size=8", "threads=1",
            "eval.max_examples=8", "eval.batch_size=8", "eval.atol=1e-3", "eval.rtol=1e-3", "eval.figures=false",
            "eval.n_samples=4", "eval.sample_accuracy_per_class=0", "train.checkpoint_every=0", "train.val_every=0",
            "train.patience=0", "train.warmup_iterations=0", f"device={os.environ.get('FASTCNF_TEST_DEVICE', 'cpu')}"]
    if cfg.parts.enabled:  # a turn of each part, then one end-to-end step
        sets += ["parts.unit=iterations", "parts.turn=1", "parts.finetune=1",
                 f"train.iterations={len(cfg.parts.level_boundaries) + 2}"]
    run = tmp_path / "run"
    rc = main(["train", recipe, "--quiet", "--out", str(run), "--set", *sets])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((run / "metrics.json").read_text())
    assert m["recipe"] == recipe and m["iterations"] >= 1 and math.isfinite(m["test_nll_nats"])
    if cfg.data.name in ("mnist", "fmnist", "cifar10"):
        assert math.isfinite(m["test_bits_per_dim"])
    if cfg.conditioning.kind != "none":
        assert 0.0 <= m["test_error"] <= 1.0
