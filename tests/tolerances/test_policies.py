"""Tolerance policies (002 §3): per-block and adjoint tolerances reach the solver, the learned
policy hands the evaluation tolerance to eval-mode solves, out-of-range tolerances are clear
errors, and the learned-tolerance hook runs end to end in the trainer."""
from __future__ import annotations

import copy
import csv
import math
from types import SimpleNamespace

import pytest
import torch

from fastcnf.cnf import CNFBlock, ConcatSquashMLP, ExactTrace
from fastcnf.config import ConfigError, load_recipe
from fastcnf.ode import SolverConfig
from fastcnf.ode.tolerances import (FixedTolerance, LearnedTolerance, PerBlockTolerance, ToleranceError,
                                    check_tolerance, pinned_tolerance)
from fastcnf.training.tolerances import StaticToleranceHook


def _twin_blocks(adjoint: bool = False) -> list[CNFBlock]:
    """Two blocks with identical dynamics, so NFE differences come from the tolerances alone."""
    torch.manual_seed(0)
    net = ConcatSquashMLP(2, (16, 16))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(2.0)
    solver = SolverConfig(atol=1e-5, rtol=1e-5, adjoint=adjoint)
    return [CNFBlock(copy.deepcopy(net), ExactTrace(), solver, end_time=1.0, name=f"cnf{i}") for i in range(2)]


def test_per_block_tolerances_reach_the_forward_solver():
    blocks = _twin_blocks()
    PerBlockTolerance([1e-1, 1e-7]).apply(blocks)
    assert (blocks[0].solver.atol, blocks[1].solver.atol) == (1e-1, 1e-7)
    assert (blocks[0].solver.rtol, blocks[1].solver.rtol) == (1e-1, 1e-7)
    x = torch.randn(32, 2)
    with torch.no_grad():
        for b in blocks:
            b(x)
    assert blocks[0].nfe.forward < blocks[1].nfe.forward
    # a single value broadcasts to every block
    PerBlockTolerance([1e-3]).apply(blocks)
    with torch.no_grad():
        nfe = [(b(x), b.nfe.forward)[1] for b in blocks]
    assert nfe[0] == nfe[1]


def test_adjoint_tolerances_reach_the_backward_solve():
    blocks = _twin_blocks(adjoint=True)
    PerBlockTolerance([1e-4], adjoint_atol=[1e-1, 1e-5], adjoint_rtol=[1e-1, 1e-5]).apply(blocks)
    x = torch.randn(32, 2)
    for b in blocks:
        z, logdet = b(x)
        (z.pow(2).sum() - logdet.sum()).backward()
    assert blocks[0].nfe.forward == blocks[1].nfe.forward  # same forward tolerance
    assert blocks[0].nfe.backward < blocks[1].nfe.backward


def test_static_hook_applies_config_lists_per_block():
    cfg = load_recipe("toy-ffjord", ["model.num_blocks=2", "tolerances.policy=per_block",
                                     "tolerances.atol=[1e-2, 1e-6]", "tolerances.adjoint_atol=[1e-3]"])
    blocks = _twin_blocks()
    StaticToleranceHook(cfg).setup(SimpleNamespace(model=SimpleNamespace(cnf_blocks=lambda: blocks)))
    assert [b.solver.atol for b in blocks] == [1e-2, 1e-6]
    assert [b.solver.rtol for b in blocks] == [1e-2, 1e-6]
    assert [b.solver.adjoint_atol for b in blocks] == [1e-3, 1e-3]


@pytest.mark.parametrize("bad", [0.0, 1.0, -1e-5, 2.0, float("nan"), "abc"])
def test_tolerance_outside_unit_interval_is_a_clear_error(bad):
    with pytest.raises(ToleranceError, match=r"\(0, 1\)"):
        check_tolerance(bad, "atol")
    with pytest.raises(ToleranceError, match=r"\(0, 1\)"):
        FixedTolerance(bad)
    with pytest.raises(ToleranceError, match=r"\(0, 1\)"):
        with pinned_tolerance(_twin_blocks(), bad):
            pass


def test_config_rejects_bad_tolerances_with_the_accepted_values():
    with pytest.raises(ConfigError, match=r"tolerances.atol\[1\] must be in \(0, 1\)"):
        load_recipe("toy-ffjord", ["tolerances.atol=[1e-3, 1.5]"])
    with pytest.raises(ConfigError, match="accepted: fixed, per_block, learned"):
        load_recipe("toy-ffjord", ["tolerances.policy=lerned"])
    with pytest.raises(ConfigError, match="max_tol"):
        load_recipe("toy-ffjord", ["tolerances.max_tol=0"])
    with pytest.raises(ToleranceError, match="2 CNF blocks"):
        PerBlockTolerance([1e-3, 1e-4, 1e-5]).apply(_twin_blocks())


def test_learned_policy_samples_in_training_and_uses_eval_tolerance_in_eval():
    blocks = _twin_blocks()
    for b in blocks:
        b.eval_solver = b.solver.with_tolerance(1e-5)
    policy = LearnedTolerance(blocks, hidden=4, init_log10_tol=-3.0, init_std=0.3, eval_mode="fixed")
    policy.attach(blocks)
    x = torch.randn(16, 2)
    with torch.no_grad():
        blocks[0](x)
    (i, log_prob, tol, mu, sigma), = policy.records
    assert i == 0 and blocks[0].solver_override.atol == tol and tol != 1e-5
    assert log_prob.requires_grad and abs(mu + 3.0) < 0.1 and abs(sigma - 0.3) < 1e-3
    blocks[0].eval()
    with torch.no_grad():
        blocks[0](x)
    assert blocks[0].solver_override is None and blocks[0].current_solver().atol == 1e-5
    policy.eval_mode = "mean"
    with torch.no_grad():
        blocks[0](x)
    assert math.isclose(blocks[0].current_solver().atol, 10 ** policy.eval_records[-1][1], rel_tol=1e-9)
    with pinned_tolerance(blocks, 1e-6), torch.no_grad():  # pinned: the gate is bypassed
        n = len(policy.eval_records)
        blocks[0](x)
        assert blocks[0].current_solver().atol == 1e-6 and len(policy.eval_records) == n
    assert blocks[0].current_solver().atol != 1e-6


def test_learned_tolerance_hook_end_to_end_in_the_trainer(tmp_path):
    from fastcnf.training.trainer import Trainer

    cfg = load_recipe("mix1d-infocnf", [
        "train.iterations=6", "model.hidden_dims=[8]", "data.n_train=500", "data.n_test=300",
        "train.batch_size=64", "train.checkpoint_every=0", "tolerances.gate_lr=0.2",
        "tolerances.include_loss=false", "tolerances.alpha=1.0", "tolerances.init_tol=1e-6"])
    trainer = Trainer(cfg, tmp_path, progress=False)
    hook = next(h for h in trainer.hooks if h.name == "tolerances")
    before = [p.detach().clone() for p in hook.policy.parameters()]
    metrics = trainer.fit()
    after = list(hook.policy.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "the gates were not updated"
    assert not any(id(p) in {id(q) for g in trainer.optimizer.param_groups for q in g["params"]} for p in after)
    with open(tmp_path / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    tols = [float(r["tol.cnf0"]) for r in rows] + [float(r["tol.cnf1"]) for r in rows]
    assert len(set(tols)) > 2 and all(0 < t < 1 for t in tols)
    assert set(metrics["tolerances"]) == {"cnf0", "cnf1"} and metrics["eval_tol"] == 1e-5
    assert (tmp_path / "figures" / "tolerances.png").exists()
    assert (tmp_path / "figures" / "tolerance_distribution.png").exists()
    # overrides never leak out of a training step (sampling uses the evaluation tolerance)
    assert all(b.solver_override is None for b in trainer.model.cnf_blocks())
