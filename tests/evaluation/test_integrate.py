"""Density integrates to one (Nguyen et al. 2019, "InfoCNF", §4.2, Appendix C): the Riemann sum of integrate_run, the
trained 1-D model's integral at the evaluation tolerance, and the error for image models."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from fastcnf.cnf import CNFBlock, ConcatSquashMLP, ExactTrace
from fastcnf.config import ConfigError
from fastcnf.data.toy import load_mix1d
from fastcnf.evaluation.integrate import IntegrateError, integrate_run
from fastcnf.flows import SequentialFlow
from fastcnf.models import FlowModel
from fastcnf.ode import SolverConfig


def _trained_mix1d_model(steps: int = 25) -> tuple[FlowModel, object]:
    """A small 1-D CNF trained by maximum likelihood on the mixture of three Gaussians."""
    torch.manual_seed(0)
    bundle = load_mix1d(2000, 500, seed=0)
    train_solver = SolverConfig(atol=1e-3, rtol=1e-3)
    block = CNFBlock(ConcatSquashMLP(1, (16, 16)), ExactTrace(), train_solver, end_time=1.0,
                     eval_solver=SolverConfig(atol=1e-5, rtol=1e-5))
    model = FlowModel(SequentialFlow([block], (1,)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    first = last = None
    for _ in range(steps):
        idx = torch.randint(0, len(bundle.train), (64,), generator=gen)
        loss = -model.log_prob(bundle.train.x[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
        last = float(loss.detach())
    assert last < first - 0.05, "the model did not train"
    return model, bundle


def test_trained_1d_model_integrates_to_one_at_eval_tolerance(tmp_path):
    model, bundle = _trained_mix1d_model()
    out = integrate_run(model, bundle, tmp_path, tolerances=[1e-5, 1e-1], n_points=1500)
    res = out["results"]
    assert abs(res["1e-05"]["integral"] - 1.0) < 1e-3, res
    assert res["1e-05"]["abs_error"] == abs(res["1e-05"]["integral"] - 1.0)
    # a loose tolerance needs fewer evaluations
    assert res["1e-01"]["nfe_forward"] < res["1e-05"]["nfe_forward"]
    saved = json.loads((tmp_path / "integrate.json").read_text())
    assert saved["results"].keys() == res.keys() and (tmp_path / "figures" / "integrate.png").exists()
    assert next(model.parameters()).dtype == torch.float32  # restored after the float64 sweep


def test_riemann_sum_of_an_identity_flow_is_the_prior_mass_on_the_grid(tmp_path):
    """Zero dynamics: p(x) = N(x; 0, 1) in 2-D; the grid over [-2.5, 2.5]^2 (data [-1, 1]^2 padded
    by 0.75 of the range per side) holds (Phi(2.5) - Phi(-2.5))^2 of the mass."""
    net = ConcatSquashMLP(2, (4,))
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    model = FlowModel(SequentialFlow([CNFBlock(net, ExactTrace(), end_time=1.0)], (2,)))
    data = torch.tensor([[-1.0, -1.0], [1.0, 1.0]])
    bundle = SimpleNamespace(shape=(2,), name="toy", train=SimpleNamespace(x=data))
    out = integrate_run(model, bundle, tmp_path, tolerances=[1e-4], n_points=100, pad=0.75)
    from math import erf, sqrt
    expected = erf(2.5 / sqrt(2)) ** 2
    assert abs(out["results"]["1e-04"]["integral"] - expected) < 1e-4


def test_integrate_rejects_image_models_and_bad_tolerances(tmp_path):
    bundle = SimpleNamespace(shape=(1, 8, 8), name="digits")
    with pytest.raises(IntegrateError, match="1-D or 2-D"):
        integrate_run(None, bundle, tmp_path)
    bundle = SimpleNamespace(shape=(1,), name="mix1d", train=SimpleNamespace(x=torch.zeros(3, 1)))
    with pytest.raises(ConfigError, match=r"\(0, 1\)"):
        integrate_run(None, bundle, tmp_path, tolerances=[1e-5, 1.0])


def test_learned_tolerance_model_is_integrated_at_its_gates_mean_tolerances(tmp_path):
    """InfoCNF App. D: the density at the learned tolerances. With the gates' mean at 1e-5 the
    integral equals the one pinned at 1e-5 (same solves), and the tolerances used are reported."""
    from fastcnf.tolerances.gates import LearnedTolerance

    model, bundle = _trained_mix1d_model()
    policy = LearnedTolerance(model.cnf_blocks(), hidden=4, init_log10_tol=-5.0)
    policy.attach(model.cnf_blocks())
    model.tolerance_policy = policy
    out = integrate_run(model, bundle, tmp_path, tolerances=[1e-5], n_points=600)
    learned = out["learned"]
    tol = learned["tolerances"]["cnf"] if "cnf" in learned["tolerances"] else next(iter(learned["tolerances"].values()))
    assert tol == pytest.approx(1e-5, rel=0.05)
    assert abs(learned["integral"] - out["results"]["1e-05"]["integral"]) < 1e-4
    assert policy.eval_mode == "fixed"  # restored
