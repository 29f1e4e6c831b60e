"""Tolerance policies of the cnf layer (Nguyen et al. 2019, "InfoCNF", §3 and Appendix F): per-block
and adjoint tolerances reach the solver, the learned policy samples in training and hands the
evaluation tolerance to eval-mode solves, pinned tolerances override both, and out-of-range
tolerances are clear errors."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from fastcnf.cnf import CNFBlock, ConcatSquashMLP, ExactTrace
from fastcnf.tolerances.gates import ConvGate, LearnedTolerance, MLPGate, make_gate, per_block_solvers
from fastcnf.cnf.block import pinned_tolerance
from fastcnf.config import ConfigError, SolverConfig, check_tolerance


def _twin_blocks(adjoint: bool = False) -> list[CNFBlock]:
    """Two blocks with identical dynamics, so NFE differences come from the tolerances alone."""
    torch.manual_seed(0)
    net = ConcatSquashMLP(2, (16, 16))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(2.0)
    solver = SolverConfig(atol=1e-5, rtol=1e-5, gradient="adjoint" if adjoint else "auto")
    return [CNFBlock(copy.deepcopy(net), ExactTrace(), solver, end_time=1.0, name=f"cnf{i}") for i in range(2)]


def _apply(blocks: list[CNFBlock], solvers: list[SolverConfig]) -> None:
    for b, s in zip(blocks, solvers):
        b.solver = s


def test_per_block_tolerances_reach_the_forward_solver():
    blocks = _twin_blocks()
    _apply(blocks, per_block_solvers(blocks[0].solver, 2, [1e-1, 1e-7]))
    assert (blocks[0].solver.atol, blocks[1].solver.atol) == (1e-1, 1e-7)
    assert (blocks[0].solver.rtol, blocks[1].solver.rtol) == (1e-1, 1e-7)
    x = torch.randn(32, 2)
    with torch.no_grad():
        for b in blocks:
            b(x)
    assert blocks[0].nfe.forward < blocks[1].nfe.forward
    # a single value broadcasts to every block
    _apply(blocks, per_block_solvers(blocks[0].solver, 2, [1e-3]))
    with torch.no_grad():
        nfe = [(b(x), b.nfe.forward)[1] for b in blocks]
    assert nfe[0] == nfe[1]


def test_adjoint_tolerances_reach_the_backward_solve():
    blocks = _twin_blocks(adjoint=True)
    _apply(blocks, per_block_solvers(blocks[0].solver, 2, [1e-4], adjoint_atol=[1e-1, 1e-5],
                                     adjoint_rtol=[1e-1, 1e-5]))
    x = torch.randn(32, 2)
    for b in blocks:
        z, logdet = b(x)
        (z.pow(2).sum() - logdet.sum()).backward()
    assert blocks[0].nfe.forward == blocks[1].nfe.forward  # same forward tolerance
    assert blocks[0].nfe.backward < blocks[1].nfe.backward


def test_empty_lists_keep_the_solvers_tolerances_and_rtol_follows_atol():
    solver = SolverConfig(atol=1e-5, rtol=1e-4, adjoint_atol=1e-3)
    kept = per_block_solvers(solver, 3, [])
    assert [(s.atol, s.rtol, s.adjoint_atol) for s in kept] == [(1e-5, 1e-4, 1e-3)] * 3
    given = per_block_solvers(solver, 2, [1e-2, 1e-6], [1e-3])
    assert [(s.atol, s.rtol) for s in given] == [(1e-2, 1e-3), (1e-6, 1e-3)]


@pytest.mark.parametrize("bad", [0.0, 1.0, -1e-5, 2.0, float("nan"), "abc"])
def test_tolerance_outside_unit_interval_is_a_clear_error(bad):
    with pytest.raises(ConfigError, match=r"\(0, 1\)"):
        check_tolerance(bad, "atol")
    with pytest.raises(ConfigError, match=r"\(0, 1\)"):
        per_block_solvers(SolverConfig(), 2, [bad])
    with pytest.raises(ConfigError, match=r"\(0, 1\)"):
        with pinned_tolerance(_twin_blocks(), bad):
            pass


def test_more_values_than_blocks_is_a_config_error():
    with pytest.raises(ConfigError, match="2 CNF blocks"):
        per_block_solvers(SolverConfig(), 2, [1e-3, 1e-4, 1e-5])


def _spy(block: CNFBlock) -> list:
    """Record every solver the block's tolerance choice returns."""
    chosen, choice = [], block.tolerance

    def spy(b, x):
        chosen.append(choice(b, x))
        return chosen[-1]

    block.tolerance = spy
    return chosen


def test_learned_policy_samples_in_training_and_uses_eval_tolerance_in_eval():
    blocks = _twin_blocks()
    for b in blocks:
        b.eval_solver = b.solver.with_tolerance(1e-5)
    policy = LearnedTolerance(blocks, hidden=4, init_log10_tol=-4.0, init_std=0.3, eval_mode="fixed")
    policy.attach(blocks)
    chosen = _spy(blocks[0])
    x = torch.randn(16, 2)
    with torch.no_grad():
        blocks[0](x)
    (i, log_prob, tol, mu, sigma), = policy.records
    assert i == 0 and chosen[-1].atol == chosen[-1].rtol == tol and tol != 1e-5
    assert log_prob.requires_grad and abs(mu + 4.0) < 0.1 and abs(sigma - 0.3) < 1e-3
    blocks[0].eval()
    with torch.no_grad():
        blocks[0](x)
    assert chosen[-1] is None and blocks[0].current_solver(x).atol == 1e-5
    policy.eval_mode = "mean"
    with torch.no_grad():
        blocks[0](x)
    assert math.isclose(chosen[-1].atol, 10 ** policy.eval_records[-1][1], rel_tol=1e-9)
    with pinned_tolerance(blocks, 1e-6), torch.no_grad():  # pinned: the gate is bypassed
        n = len(policy.eval_records)
        blocks[0](x)
        assert blocks[0].current_solver(x).atol == 1e-6 and len(policy.eval_records) == n
    assert blocks[0].pinned_solver is None and blocks[0].current_solver().atol != 1e-6


def test_a_second_sample_of_a_block_replaces_its_record():
    blocks = _twin_blocks()
    policy = LearnedTolerance(blocks, hidden=4, init_log10_tol=-3.0)
    policy.attach(blocks)
    x = torch.randn(8, 2)
    with torch.no_grad():
        blocks[1](x)
        blocks[0](x)
        blocks[0](x)
    assert [r[0] for r in policy.records] == [1, 0]


def test_gates_start_at_the_initial_tolerance_and_fit_the_blocks_input():
    torch.manual_seed(0)
    gate = make_gate(CNFBlock(ConcatSquashMLP(3, (8,))), hidden=4, init_log10_tol=-4.0, init_std=0.5, min_std=0.05)
    assert isinstance(gate, MLPGate)
    mu, sigma = (v.detach() for v in gate(torch.randn(32, 3) * 10))
    assert abs(float(mu) + 4.0) < 0.5 and abs(float(sigma) - 0.5) < 0.05
    from fastcnf.cnf import ConcatSquashConvNet

    conv = make_gate(CNFBlock(ConcatSquashConvNet(3, (8,))), hidden=4, init_log10_tol=-4.0, init_std=0.5,
                     min_std=0.05)
    assert isinstance(conv, ConvGate) and conv(torch.randn(2, 3, 8, 8))[0].shape == ()
    with pytest.raises(ConfigError, match="must exceed min_std"):
        MLPGate(3, init_log10_tol=-4.0, init_std=0.05, min_std=0.1)


def test_learned_recipes_keep_the_ceiling_where_the_exact_nll_holds():
    """The gates judge a tolerance by the loss computed at it, so nothing in REINFORCE stops a model
    from exploiting a coarse solve: with a ceiling of 1e-1, digits-cnf-learned-tol ended at a training
    loss of 0.35 bits/dim and an exact test NLL of 4.65 (benchmarks/README.md, "Solver tolerances").
    Every learned recipe, and the default, clamp the sampled tolerance at 1e-3 or tighter."""
    from fastcnf.config.loader import list_recipes
    from fastcnf.methods import load_recipe
    from fastcnf.tolerances.config import TolerancesConfig

    assert TolerancesConfig().max_tol == 1e-3 == LearnedTolerance.__init__.__defaults__[5]
    learned = [n for n in list_recipes() if load_recipe(n).tolerances.policy == "learned"]
    assert len(learned) >= 8
    for name in learned:
        assert load_recipe(name).tolerances.max_tol <= 1e-3, name
    blocks = _twin_blocks()
    policy = LearnedTolerance(blocks, hidden=4, init_log10_tol=1.0, init_std=0.3)  # a gate far past it
    policy.attach(blocks)
    with torch.no_grad():
        blocks[0](torch.randn(8, 2))
    assert policy.records[-1][2] == 1e-3
