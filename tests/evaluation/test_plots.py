"""Figures and the one log reader (fastcnf.evaluation.plots)."""
from __future__ import annotations

import numpy as np
import torch

from fastcnf.methods import load_recipe
from fastcnf.data import load_data
from fastcnf.evaluation.plots import class_conditional_samples, plot_samples, read_log
from fastcnf.methods import build_model


def test_read_log_gives_one_array_per_column_with_blanks_as_nan(tmp_path):
    (tmp_path / "log.csv").write_text("iteration,loss,bits_per_dim\n1,2.5,\n2,1.5,\n")
    log = read_log(tmp_path / "log.csv")
    assert list(log["iteration"]) == [1, 2] and list(log["loss"]) == [2.5, 1.5]
    assert np.isnan(log["bits_per_dim"]).all()
    assert not read_log(tmp_path / "missing.csv")


def test_plot_samples_writes_vectors_and_image_grids(tmp_path):
    plot_samples(torch.randn(20, 2), tmp_path / "points.png", False)
    plot_samples(torch.rand(6, 1, 8, 8), tmp_path / "grid.png", True, nrow=3)
    assert (tmp_path / "points.png").stat().st_size > 0 and (tmp_path / "grid.png").stat().st_size > 0


def test_class_figure_draws_n_samples_spread_evenly_over_the_classes(tmp_path):
    cfg = load_recipe("mix1d-infocnf", ["model.hidden_dims=[4]", "eval.n_samples=7", "solver.atol=1e-3",
                                        "solver.rtol=1e-3", "eval.atol=1e-3", "eval.rtol=1e-3"])
    bundle = load_data(cfg.data, 0)
    model = build_model(cfg, bundle)
    drawn = []
    sample = model.sample
    model.sample = lambda n, y=None, **kw: drawn.append((n, y)) or sample(n, y, **kw)
    class_conditional_samples(model, bundle, tmp_path, cfg.eval.n_samples)
    (n, y), = drawn
    k = bundle.num_classes
    assert n >= 7 and torch.equal(torch.bincount(y, minlength=k), torch.full((k,), n // k))
    assert (tmp_path / "class_conditional_samples.png").exists()
