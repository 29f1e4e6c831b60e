"""Each CNF block's gradient path (``solver.gradient``), measured where ``auto`` needs it.

:func:`fastcnf.ode.solve.gradient_path` maps the setting to a path; this module gives it, per block,
what ``auto`` weighs: at a block's first training solve (or in the trainer's planning pass,
:func:`planning`) it solves that batch once without gradients (a scratch NFE counter: the
evaluations a solve makes) and evaluates the dynamics once under a
``saved_tensors_hooks`` probe (the bytes one evaluation saves for its backward pass), both per
example. Every later training solve re-weighs the path with the batch at hand and the block's
latest forward NFE, so a model whose NFE grows in training moves to a leaner exact path before it
outgrows the budget (direct, fused and recomputation compute the same gradient).

References: Chen et al. 2018, "Neural Ordinary Differential Equations" (adjoint); Gholami et al.
2019, "ANODE" and Zhuang et al. 2020, "ACA" (direct back-propagation with recomputation).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from fastcnf.ode.solve import (GradientPath, MemoryEstimate, NFECounter, SolverConfig, gradient_path,
                               memory_budget_bytes, saved_bytes)

__all__ = ["plan_and_run", "planning", "gradient_paths"]

#: a solve that computes no gradient
_NO_GRAD = GradientPath("direct", "no gradient")
_NO_GRAD_FUSED = GradientPath("fused", "no gradient")


@dataclass
class _Probe:
    """Per-example bytes of one evaluation's saved tensors and of the state; evaluations per solve;
    the budget (bytes) when measured."""

    per_eval: float
    state: float
    evals: int
    budget: float


def _bytes(tensors: Sequence[Tensor]) -> float:
    return float(sum(t.numel() * t.element_size() for t in tensors))


def plan_and_run(block: nn.Module, solver: SolverConfig, state: tuple[Tensor, ...], fused_ok: bool,
                 func: Callable, t: Tensor, params: Sequence[Tensor],
                 run: Callable[[GradientPath], tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    """Choose the path of this solve of ``block`` and ``run`` it (``run(path)`` solves ``state``).

    ``func(t, state)`` is one evaluation of the solve's right-hand side (the memory probe);
    ``params`` are excluded from its count. The choice is kept in ``block.gradient_record``."""
    if not torch.is_grad_enabled():  # fused wherever it applies, unless direct is asked for
        return run(_NO_GRAD_FUSED if fused_ok and solver.gradient != "direct" else _NO_GRAD)
    device = state[0].device
    path = gradient_path(solver, device=device, fused_ok=fused_ok)
    if solver.gradient != "auto" or path.backward_precision == "bfloat16":  # no estimate needed
        block.gradient_record = path
        return run(path)
    batch = max(1, state[0].shape[0])
    planning_now = getattr(block, "_planning", False)
    probe = getattr(block, "_gradient_probe", None)
    measured = None
    if probe is None or planning_now:
        counter, block.nfe = block.nfe, NFECounter(block.nfe.name)
        try:
            with torch.no_grad():
                measured = run(_NO_GRAD_FUSED if fused_ok else _NO_GRAD)
            evals = block.nfe.forward
        finally:
            block.nfe = counter
        _, per_eval = saved_bytes(lambda: func(t[0], state), exclude=params)
        budget = memory_budget_bytes(solver, device)
        ledger = getattr(block, "_budget_ledger", None) if planning_now else None
        if ledger is not None:  # the blocks of one model share the budget: what earlier ones took is gone
            budget = max(0.0, budget - ledger["used"])
        probe = _Probe(per_eval / batch, _bytes(state) / batch, evals, budget)
        block._gradient_probe = probe
    evals = max(probe.evals, block.nfe.forward)
    estimate = MemoryEstimate(probe.per_eval * batch, probe.state * batch, evals, probe.budget)
    path = gradient_path(solver, device=device, fused_ok=fused_ok, estimate=estimate)
    block.gradient_record = path
    if planning_now and getattr(block, "_budget_ledger", None) is not None:
        block._budget_ledger["used"] += estimate.need(path.path)
    if planning_now and measured is not None:
        # the planning pass only measures: leaves stand in for the solution (no graph is kept)
        return tuple(o.detach().requires_grad_(o.is_floating_point()) for o in measured)
    return run(path)


def _blocks(module: nn.Module) -> Iterator[nn.Module]:
    return (m for m in module.modules() if hasattr(m, "gradient_record"))


@contextmanager
def planning(module: nn.Module):
    """Within this context every CNF block of ``module`` that solves with gradients under ``auto``
    measures and records its path and returns its no-grad solution (as leaves) without building the
    solve's graph: one forward pass of the training loss plans every block. The blocks share the
    budget: each is planned against what the blocks planned before it left (their graphs coexist
    in the backward pass)."""
    blocks = list(_blocks(module))
    ledger = {"used": 0.0}
    for b in blocks:
        b._planning, b._budget_ledger = True, ledger
    try:
        yield
    finally:
        for b in blocks:
            b._planning, b._budget_ledger = False, None


def gradient_paths(module: nn.Module) -> dict[str, dict[str, str]]:
    """Block name -> ``{path, why, backward_precision}`` of its last training solve (blocks that
    have not solved with gradients are left out)."""
    out: dict[str, dict[str, str]] = {}
    for i, b in enumerate(_blocks(module)):
        if b.gradient_record is not None:
            name = b.name if b.name not in out else f"{b.name}.{i}"
            out[name] = b.gradient_record.as_dict()
    return out
