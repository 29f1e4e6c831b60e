"""``solver.gradient``: the one mapping from the setting to a solve's path (fastcnf.ode.solve.gradient_path),
auto's measured choice per block (fastcnf.cnf.gradient), the budget, bfloat16 detection, deprecations."""
from __future__ import annotations

import importlib
import math
import warnings

import pytest
import torch
from torch import nn

from fastcnf.cnf import CNFBlock, ConcatSquashMLP, ExactTrace, Hutchinson
from fastcnf.config import ConfigError, DeprecatedOption
from fastcnf.methods import load_recipe
from fastcnf.ode import SolverConfig
from fastcnf.ode.solve import (BUDGET_SHARE, MemoryEstimate, gradient_path, memory_budget_bytes, saved_bytes)

solve_module = importlib.import_module("fastcnf.ode.solve")
D = torch.float64
GIB = float(1 << 30)


def _estimate(budget: float) -> MemoryEstimate:
    # direct: 1000 * 50 = 50,000 bytes; recompute: 1000 + 100 * 50 = 6,000 bytes
    return MemoryEstimate(per_eval=1000.0, state=100.0, evals=50, budget=budget)


@pytest.mark.parametrize("budget,fused_ok,backend,expected", [
    (math.inf, True, "fastcnf", "fused"),
    (50_000.0, True, "fastcnf", "fused"),  # exactly at the budget still fits
    (50_000.0, False, "fastcnf", "direct"),
    (49_999.0, True, "fastcnf", "recompute"),  # direct does not fit, recomputation does
    (5_999.0, True, "fastcnf", "adjoint"),  # the fallback when nothing exact fits
    (49_999.0, False, "torchdiffeq", "adjoint"),  # recomputation needs the lean solver
])
def test_auto_takes_the_fastest_exact_path_that_fits(budget, fused_ok, backend, expected):
    path = gradient_path(SolverConfig(backend=backend), fused_ok=fused_ok, estimate=_estimate(budget))
    assert path.path == expected
    assert path.backward_precision == "float32"
    if expected == "adjoint":
        assert "no exact path fits" in path.why


@pytest.mark.parametrize("setting", ["direct", "adjoint", "recompute"])
def test_an_explicit_setting_is_taken_as_set(setting):
    path = gradient_path(SolverConfig(gradient=setting), fused_ok=True, estimate=_estimate(0.0))
    assert (path.path, path.why) == (setting, f"solver.gradient={setting}")


def test_auto_without_an_estimate_is_direct_or_fused():
    assert gradient_path(SolverConfig()).path == "direct"
    assert gradient_path(SolverConfig(), fused_ok=True).path == "fused"


def _fake_cpu(monkeypatch, flags: set[str], capability: str = "AVX2") -> None:
    monkeypatch.setattr(solve_module, "_cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)


@pytest.mark.parametrize("flags,capability", [({"avx512_bf16"}, "AVX512"), ({"amx_bf16"}, "AVX512"),
                                              (set(), "AVX512_BF16")])
def test_bfloat16_is_honoured_where_native(monkeypatch, flags, capability):
    _fake_cpu(monkeypatch, flags, capability)
    assert solve_module.bfloat16_native("cpu")[0]
    for gradient in ("auto", "recompute"):
        path = gradient_path(SolverConfig(gradient=gradient, backward_precision="bfloat16"), fused_ok=True,
                             estimate=_estimate(math.inf))
        assert (path.path, path.backward_precision) == ("recompute", "bfloat16")


def test_bfloat16_is_not_honoured_where_emulated(monkeypatch):
    _fake_cpu(monkeypatch, {"avx2", "fma"}, "AVX2")
    native, why = solve_module.bfloat16_native("cpu")
    assert not native and "avx512_bf16" in why
    auto = gradient_path(SolverConfig(backward_precision="bfloat16"), fused_ok=False, estimate=_estimate(math.inf))
    assert (auto.path, auto.backward_precision) == ("direct", "float32")  # the defaults' path, float32 kept
    assert "not honoured" in auto.why
    forced = gradient_path(SolverConfig(gradient="recompute", backward_precision="bfloat16"))
    assert (forced.path, forced.backward_precision) == ("recompute", "float32")


def test_bfloat16_on_a_block_runs_float32_where_emulated(monkeypatch):
    """The backward pass of the block is then exactly the float32 recomputation's."""
    _fake_cpu(monkeypatch, set(), "AVX2")
    grads = []
    for precision in ("bfloat16", "float32"):
        torch.manual_seed(0)
        block = CNFBlock(ConcatSquashMLP(2, (8,)), ExactTrace("vmap"),
                         SolverConfig(gradient="recompute", backward_precision=precision, atol=1e-6, rtol=1e-6))
        _, logdet = block(torch.randn(5, 2))
        grads.append(torch.autograd.grad(logdet.sum(), [p for p in block.parameters() if p.requires_grad]))
        assert block.gradient_record.backward_precision == "float32"
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_saved_bytes_counts_what_one_evaluation_keeps_against_a_hand_count():
    lin = nn.Linear(10, 20).to(D)
    x = torch.randn(4, 10, dtype=D)
    _, n = saved_bytes(lambda: torch.tanh(lin(x)), exclude=list(lin.parameters()))
    # Linear keeps its input (for dW), tanh its output (for its derivative): 4*10 + 4*20 doubles
    assert n == (4 * 10 + 4 * 20) * 8


def test_the_budget_is_the_setting_or_a_share_of_the_free_memory(monkeypatch):
    assert memory_budget_bytes(SolverConfig(memory_budget=2.0)) == 2.0 * GIB
    monkeypatch.setattr(solve_module, "free_memory_bytes", lambda device="cpu": 8.0 * GIB)
    assert memory_budget_bytes(SolverConfig()) == BUDGET_SHARE * 8.0 * GIB
    monkeypatch.setattr(solve_module, "free_memory_bytes", lambda device="cpu": None)
    assert memory_budget_bytes(SolverConfig()) == math.inf
    with pytest.raises(ConfigError, match="solver.memory_budget"):
        SolverConfig(memory_budget=-1.0)


def _hutchinson_block(budget_gib: float) -> CNFBlock:
    torch.manual_seed(0)
    return CNFBlock(ConcatSquashMLP(3, (32, 32)), Hutchinson("rademacher"),
                    SolverConfig(atol=1e-6, rtol=1e-6, memory_budget=budget_gib), name="blk").to(D)


def _grads(block: CNFBlock, x: torch.Tensor):
    torch.manual_seed(3)  # the Hutchinson noise
    z, logdet = block(x)
    loss = (z ** 2).sum() - logdet.sum()
    return [loss.detach(), *torch.autograd.grad(loss, [p for p in block.parameters() if p.requires_grad])]


def test_auto_on_a_block_measures_and_falls_back_when_the_budget_is_small():
    """The probe's estimate decides; a budget between recomputation's and direct's estimates picks
    recomputation, one below both the adjoint; recomputation's gradient equals direct's."""
    x = torch.randn(16, 3, dtype=D, generator=torch.Generator().manual_seed(1))
    roomy = _hutchinson_block(64.0)
    reference = _grads(roomy, x)
    assert roomy.gradient_record.path == "direct"
    probe = roomy._gradient_probe
    assert probe.per_eval > 0 and probe.evals == roomy.nfe.forward > 6
    est = MemoryEstimate(probe.per_eval * 16, probe.state * 16, probe.evals, 0.0)
    assert est.recompute() < est.direct()
    between = _hutchinson_block((est.recompute() + est.direct()) / 2 / GIB)
    got = _grads(between, x)
    assert between.gradient_record.path == "recompute"
    for a, b in zip(got, reference):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    tiny = _hutchinson_block(est.recompute() / 2 / GIB)
    _grads(tiny, x)
    assert tiny.gradient_record.path == "adjoint"
    assert "no exact path fits" in tiny.gradient_record.why


def test_old_switches_load_with_one_line_saying_what_they_became():
    cases = {("solver.adjoint=true",): "adjoint", ("solver.adjoint=false",): "auto",
             ("solver.fused=false",): "direct", ("solver.adjoint=false", "solver.recompute=true"): "recompute"}
    for overrides, expected in cases.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cfg = load_recipe("toy-ffjord", list(overrides))
        assert cfg.solver.gradient == expected
        messages = [str(w.message) for w in caught if issubclass(w.category, DeprecatedOption)]
        assert messages == [f"{' '.join(overrides)} is deprecated: it became solver.gradient={expected}"]


def test_planned_blocks_share_the_budget():
    """Two identical blocks planned together: a budget that holds one direct graph but not two gives
    the first block direct and the second a leaner path."""
    from fastcnf.cnf.gradient import planning
    from fastcnf.flows.sequential import SequentialFlow

    x = torch.randn(16, 3, dtype=D, generator=torch.Generator().manual_seed(1))
    probe_block = _hutchinson_block(64.0)
    _grads(probe_block, x)
    p = probe_block._gradient_probe
    direct = p.per_eval * 16 * p.evals
    blocks = [_hutchinson_block(1.5 * direct / GIB) for _ in range(2)]
    flow = SequentialFlow(blocks, (3,))
    with planning(flow), torch.enable_grad():
        torch.manual_seed(3)
        flow(x)
    assert [b.gradient_record.path for b in blocks] == ["direct", "recompute"]


@pytest.mark.parametrize("var", ["ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"])
def test_a_onednn_cap_below_bfloat16_makes_it_emulated_whatever_the_cpu(monkeypatch, var):
    """oneDNN runs the convolutions and matrix products: capped at AVX2 it emulates bfloat16."""
    _fake_cpu(monkeypatch, {"avx512_bf16", "amx_bf16"}, "AVX512")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv(var, "avx2")
    native, why = solve_module.bfloat16_native("cpu")
    assert not native and "AVX2" in why and var in why
    path = gradient_path(SolverConfig(backward_precision="bfloat16"), estimate=_estimate(math.inf))
    assert path.backward_precision == "float32" and "not honoured" in path.why
    monkeypatch.setenv(var, "AVX512_CORE_AMX")  # a cap that keeps bfloat16 arithmetic
    assert solve_module.bfloat16_native("cpu")[0]
