"""The tabular recipes validate and stop early: FFJORD's settings for the MAF sets, small-table
settings for ``tabular*``; a tiny table run stops early and ends with its best validation weights."""
import csv
import json

import numpy as np
import pytest
import torch

from fastcnf import load_run
from fastcnf.cli import main
from fastcnf.methods import load_recipe

MAF = ["power", "gas", "hepmass", "miniboone", "bsds300"]


@pytest.mark.parametrize("name", [f"maf-{s}" for s in MAF] + [f"maf-{s}-fm" for s in MAF])
def test_maf_recipes_use_ffjords_early_stopping(name):
    # FFJORD's train_tabular.py: validation every --val_freq 200 iterations, stop once more than
    # --early_stopping 30 validations in a row did not improve, i.e. after 31 (train.patience counts to P)
    cfg = load_recipe(name)
    assert (cfg.train.val_every, cfg.train.patience) == (200, 31)


@pytest.mark.parametrize("name", ["tabular", "tabular-fm", "tabular-cnf"])
def test_table_recipes_validate_and_stop_early(name):
    cfg = load_recipe(name)
    assert cfg.data.val_fraction > 0
    assert (cfg.train.val_every, cfg.train.patience) == (250, 31)


def _csv(path, x):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b"])
        w.writerows(x.tolist())


def test_tabular_stops_early_and_keeps_the_best_weights(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 2)) * [2.0, 0.5] + [10.0, -3.0]
    _csv(tmp_path / "x.csv", x[:240])
    _csv(tmp_path / "val.csv", x[240:])
    out = tmp_path / "run"
    # a large learning rate makes the validation NLL wander, so patience 2 ends the run long before 2000
    rc = main(["train", "tabular", "--quiet", "--out", str(out), "--set", f"data.path={tmp_path / 'x.csv'}",
               f"data.val_path={tmp_path / 'val.csv'}", "threads=1", "model.hidden_dims=[16,16]",
               "train.iterations=2000", "train.lr=0.05", "train.schedule=constant", "train.batch_size=64",
               "train.val_every=10", "train.patience=2", "eval.max_examples=0", "eval.n_samples=10",
               "eval.atol=1e-6", "eval.rtol=1e-6"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["stopped_early"] is True
    with open(out / "log.csv") as f:
        val = [(int(r["iteration"]), float(r["val_nll"])) for r in csv.DictReader(f) if r.get("val_nll")]
    last = val[-1][0]
    assert last < 2000 and last == m["best_iteration"] + 2 * 10   # two validations without improvement
    assert [it for it, _ in val] == list(range(10, last + 1, 10))
    best = min(nll for _, nll in val)
    assert m["best_val_nll_nats"] == pytest.approx(best, abs=1e-9)
    assert val[-1][1] > best and val[-2][1] > best
    # the run's model is the best one: its validation NLL, recomputed from the saved weights, is the best
    run = load_run(out)
    with torch.no_grad():
        nll = -run.log_prob(torch.as_tensor(x[240:])).double().mean().item()
    assert nll == pytest.approx(best, abs=2e-3)
