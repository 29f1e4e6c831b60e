"""Solver tolerances as a method: fixed, per block, or learned by gates trained with REINFORCE.

``tolerances.policy`` chooses it (:class:`~fastcnf.tolerances.config.TolerancesConfig`). The model
side is :mod:`fastcnf.tolerances.gates` (per-block solvers, gate networks), the REINFORCE estimate
:mod:`fastcnf.tolerances.reinforce`, the training side :mod:`fastcnf.tolerances.hook`. Docs:
docs/tolerances.md.

References: Nguyen et al. 2019, "InfoCNF: Efficient Conditional Continuous Normalizing Flow Using
Adaptive Solvers", §3, §4.2, Appendix D and F; Nguyen et al., "On Mixed Conditional FFJORD with
Large-Batch Training", §3 (a tight first block in each stack).
"""
from __future__ import annotations

import math
from typing import Any

from torch import nn

from fastcnf.config import ConfigError
from fastcnf.method import Hook, Method
from fastcnf.tolerances.config import TolerancesConfig
from fastcnf.tolerances.gates import LearnedTolerance, per_block_solvers
from fastcnf.tolerances.hook import LearnedToleranceHook, StaticToleranceHook

__all__ = ["TOLERANCES", "TolerancesMethod"]


def _stack_position(blocks: list) -> list[int]:
    """0 for the first CNF block of each scale's stack (``scale{i}.cnf0``; the first block of a
    flow without scales), 1 for the others."""
    return [0 if i == 0 or b.name.endswith(".cnf0") else 1 for i, b in enumerate(blocks)]


def _per_block(cfg: Any, model: nn.Module) -> None:
    t, blocks = cfg.tolerances, model.cnf_blocks()
    lists = [t.atol, t.rtol, t.adjoint_atol, t.adjoint_rtol]
    if t.layout == "stacks":  # Mixed Conditional FFJORD §3: a tight first block in each stack
        where = _stack_position(blocks)
        lists = [[values[k] for k in where] if values else [] for values in lists]
    for b, s in zip(blocks, per_block_solvers(cfg.solver, len(blocks), *lists)):
        b.solver = s


def _learned(cfg: Any, model: nn.Module) -> None:
    t, blocks = cfg.tolerances, model.cnf_blocks()
    if not blocks:
        raise ConfigError(f"tolerances.policy=learned needs a model with CNF blocks (model.arch={cfg.model.arch!r} "
                          "has none)")
    # adjoint tolerances (optional) per block; the gates choose the forward ones per batch
    for b, s in zip(blocks, per_block_solvers(cfg.solver, len(blocks), [], [], t.adjoint_atol, t.adjoint_rtol)):
        b.solver = s
    init = t.init_tol if t.init_tol > 0 else cfg.solver.atol
    policy = LearnedTolerance(blocks, t.gate_hidden, math.log10(init), t.init_std, t.min_std, t.min_tol,
                              t.max_tol, t.eval_tolerance)
    policy.attach(blocks)
    model.tolerance_policy = policy


#: ``tolerances.policy`` -> how it sets the built model's solvers (fixed: solver.atol / rtol as built)
POLICIES = {"fixed": lambda cfg, model: None, "per_block": _per_block, "learned": _learned}


def _move_fixed_tolerances(values: dict) -> str | None:
    """``tolerances.atol`` with the fixed policy is ``solver.atol`` (and rtol, adjoint_*)."""
    tol = values.get("tolerances") or {}
    if tol.get("policy", "fixed") != "fixed":
        return None
    moved = []
    for key in ("atol", "rtol", "adjoint_atol", "adjoint_rtol"):
        v = tol.get(key)
        if v in (None, []):
            continue
        v = v if isinstance(v, list) else [v]
        if len(v) != 1:
            raise ConfigError(f"tolerances.policy=fixed takes one {key}, got {len(v)} values; "
                              "use tolerances.policy=per_block for one tolerance per block")
        values.setdefault("solver", {})[key] = v[0]
        tol[key] = []
        moved.append(key)
    if moved:
        return (f"tolerances.{'/'.join(moved)} with tolerances.policy=fixed is deprecated: "
                f"use solver.{'/'.join(moved)}")
    return None


class TolerancesMethod(Method):
    """The tolerance method (see the module docstring)."""

    name = "tolerances"
    section = TolerancesConfig
    docs = "docs/tolerances.md"
    deprecations = (_move_fixed_tolerances,)

    def attach(self, cfg: Any, model: nn.Module) -> None:
        POLICIES[cfg.tolerances.policy](cfg, model)

    def hook(self, cfg: Any) -> Hook | None:
        policy = cfg.tolerances.policy
        if policy == "learned":
            return LearnedToleranceHook(cfg)
        return StaticToleranceHook() if policy == "per_block" else None


TOLERANCES = TolerancesMethod()
