"""Training a flow by gradient-isolated parts (Bhatt & Inouye 2021, "Learning Flows by Parts").

The flow ``f = f_L o ... o f_1`` (the entries of ``flow.steps``) is cut into contiguous parts
``[b_0, b_1), [b_1, b_2), ...``. Part ``k`` is trained on the *truncated objective* (the paper, "Local/
Truncated Objective Function")::

    -log p_z(f^{(1:b_{k+1})}(x)) - sum_{l in part k} log|det df_l / dz^{(l-1)}|

evaluated on the part's output: its input ``z^{(b_k)}`` is computed by the earlier parts under
``torch.no_grad`` (detached, so no gradient crosses a boundary and no graph is kept for them) and
the later parts are not run at all. That is where the time goes: the paper reports ~30% less
wall time than end-to-end training at equal bits/dim.

In fastcnf the truncated latent is ``[factored pieces of parts 1..k, output of part k]`` — the
same size as the full latent — scored by the model's prior, plus the log-determinants of parts
``1..k`` (those of the earlier parts are constants). So the loss is the exact negative
log-likelihood of the truncated flow ``f^{(1:b_{k+1})}`` (bits/dim normalised by the full data
dimension), only its gradient is restricted to part ``k``; for the last part it *is* the full
objective. Parameters of inactive parts get no gradient (``.grad`` stays ``None``), so Adam
skips them: neither their weights nor their Adam moments move.

Schedule, as a pure function of the iteration (nothing to checkpoint): a parts phase
(:data:`MECHANISMS`: ``alternate`` = parts take turns of ``parts.turn`` units, each starting from
the previous parts' current weights, the paper's stable mechanism; ``sequential`` = equal consecutive
budgets, the paper's unstable greedy mechanism), then ``parts.finetune`` units of end-to-end training.
Each part has its own optimiser parameter group (``parts.lr_scales``). Evaluation always uses the
full model and objective. ``log.csv`` gets a ``part`` column: the part trained at that step, or
``all`` (end to end).

Part boundaries are indices into ``flow.steps``, so the same option trains a Glow, an FFJORD
multiscale model or a stack of CNF blocks; for flows with levels (``flow.level_boundaries``,
Glow) they can be given in the paper's notation (:func:`level_position_to_index`).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable

import torch
from torch import Tensor, nn

from fastcnf.cnf.block import CNFBlock
from fastcnf.config import ConfigError
from fastcnf.flows.glow import ActNorm, initialize_actnorm
from fastcnf.flows.sequential import FactorOut, SequentialFlow
from fastcnf.method import Hook, StepContext, TrainerView as Trainer

__all__ = [
    "MECHANISMS",
    "level_position_to_index",
    "resolve_boundaries",
    "truncated_forward",
    "PartsHook",
]


def _alternate(iteration: int, phase: int, n_parts: int, turn: int) -> int:
    """Parts take turns of ``turn`` iterations: 0, 1, ..., n-1, 0, 1, ..."""
    return (iteration // turn) % n_parts


def _sequential(iteration: int, phase: int, n_parts: int, turn: int) -> int:
    """The parts phase split into ``n_parts`` consecutive equal budgets (remainder to the last)."""
    share = max(phase // n_parts, 1)
    return min(iteration // share, n_parts - 1)


#: mechanism name -> ``(iteration in the parts phase, phase length, number of parts, turn) -> part``
MECHANISMS: dict[str, Callable[[int, int, int, int], int]] = {"alternate": _alternate, "sequential": _sequential}
def level_position_to_index(flow: SequentialFlow, position: float) -> int:
    """Index into ``flow.steps`` of a boundary given in the paper's level notation.

    Levels are counted from 1. An integer ``p`` is the start of level ``p`` (split "by blocks");
    ``p + f`` with ``0 < f < 1`` cuts level ``p`` after ``round(f * K)`` of its ``K`` invertible
    steps (split "across blocks": ``1.5`` is the paper's ``1_{1/2}``). Valid: ``1 < position < L + 1``.
    """
    starts = getattr(flow, "level_boundaries", None)
    if not starts:
        raise ConfigError("parts.level_boundaries needs a flow with levels (model.arch=glow); for other flows "
                         f"use parts.boundaries (indices 1..{len(flow.steps) - 1} into flow.steps)")
    n_levels = len(starts)
    if not 1 < position < n_levels + 1:
        raise ConfigError(f"level boundary {position} is out of range: this flow has {n_levels} levels, so a "
                         f"boundary must lie strictly between 1 and {n_levels + 1} (e.g. 1.5 or 2)")
    level = int(math.floor(position))
    fraction = position - level
    lo = starts[level - 1]
    if fraction == 0:
        return lo
    hi = starts[level] if level < n_levels else len(flow.steps)
    # the level's own invertible steps (not the squeeze, the preprocessing or the split)
    inner = [i for i in range(lo, hi) if sum(p.numel() for p in flow.steps[i].parameters()) > 0
             and not isinstance(flow.steps[i], FactorOut)]
    cut = int(round(fraction * len(inner)))
    if not 0 < cut < len(inner):
        raise ConfigError(f"level boundary {position} cuts level {level} after {cut} of its {len(inner)} steps: "
                         "choose a fraction that leaves steps on both sides, or an integer level start")
    return inner[cut]


def resolve_boundaries(flow: SequentialFlow, boundaries: list[int] | None = None,
                       level_boundaries: list[float] | None = None) -> list[int]:
    """Part starts and end ``[0, b_1, ..., len(flow.steps)]`` from either kind of boundary.

    Raises:
        ConfigError: a boundary out of ``1..len(flow.steps)-1``, boundaries not strictly increasing
            (overlapping or empty parts), or none given.
    """
    n = len(flow.steps)
    if boundaries and level_boundaries:
        raise ConfigError("give parts.boundaries or parts.level_boundaries, not both")
    if level_boundaries:
        cuts = [level_position_to_index(flow, float(p)) for p in level_boundaries]
        source = f"parts.level_boundaries={list(level_boundaries)} (steps {cuts})"
    elif boundaries:
        cuts = [int(b) for b in boundaries]
        source = f"parts.boundaries={cuts}"
    else:
        raise ConfigError("training by parts needs at least one boundary (parts.boundaries or parts.level_boundaries)")
    for b in cuts:
        if not 0 < b < n:
            raise ConfigError(f"{source}: boundary {b} is out of range; this flow has {n} steps, so boundaries "
                             f"must be in 1..{n - 1}")
    if any(later <= earlier for earlier, later in zip(cuts, cuts[1:])):
        raise ConfigError(f"{source}: boundaries must be strictly increasing (parts may neither overlap nor be empty)")
    return [0, *cuts, n]


def truncated_forward(model: nn.Module, x: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
    """``(z, logdet)`` of the truncated flow ``f^{(1:stop)}`` with gradients only through steps
    ``start..stop-1`` (the paper's truncated objective for the part ``[start, stop)``).

    Steps ``0..start-1`` run under ``torch.no_grad`` (their output, factored pieces and log-dets
    are constants); steps from ``stop`` on are not run. ``z`` is the flat concatenation of every
    factored piece so far and the output of step ``stop-1``: the full latent size, so the model's
    prior scores it; ``log p = prior.log_prob(z) + logdet`` is the truncated objective, and for
    ``stop = len(flow.steps)`` it equals the full model's ``(z, logdet)``.
    """
    flow: SequentialFlow = model.flow
    model.check_input(x)
    b = x.shape[0]
    with torch.no_grad():
        h, logdet_before, pieces_before = flow.forward_range(x, 0, start)
    out, logdet_part, pieces_part = flow.forward_range(h.detach(), start, stop)
    pieces = [p.detach() for p in pieces_before] + pieces_part
    z = torch.cat([p.reshape(b, -1) for p in pieces] + [out.reshape(b, -1)], dim=1)
    return z, logdet_before.detach() + logdet_part


def _unique_parameters(modules: list[nn.Module]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                seen.setdefault(id(p), p)
    return list(seen.values())


class PartsHook(Hook):
    """Training by parts as a trainer hook (see the module docstring).

    Per step: ``before_step`` picks the part from the iteration and puts the truncated forward pass
    into ``ctx["objective"]`` (read by the likelihood objective,
    :class:`fastcnf.models.objectives.Likelihood`, in place of the whole flow); during fine-tuning it
    puts nothing, so the step is the ordinary end-to-end one.
    """

    name = "parts"

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.parts_cfg = cfg.parts
        self.starts: list[int] = []
        self.part_params: list[list[nn.Parameter]] = []
        self.phase_iterations = 0
        self.turn_iterations = 1
        self._actnorm_checked = False
        self._inactive_blocks: list[list[nn.Module]] = []

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: "Trainer") -> None:
        pc = self.parts_cfg
        flow = trainer.model.flow
        self.starts = resolve_boundaries(flow, pc.boundaries, pc.level_boundaries)
        n_parts = len(self.starts) - 1
        if pc.lr_scales and len(pc.lr_scales) != n_parts:
            raise ConfigError(f"parts.lr_scales has {len(pc.lr_scales)} entries but the boundaries make {n_parts} "
                             f"parts (steps {self._ranges_text()}); give one scale per part or none")
        self.part_params = []
        owner: dict[int, int] = {}
        for k, (a, b) in enumerate(zip(self.starts, self.starts[1:])):
            params = _unique_parameters(list(flow.steps[a:b]))
            if not params:
                raise ConfigError(f"part {k} (steps {a}..{b - 1}: "
                                 f"{', '.join(type(s).__name__ for s in flow.steps[a:b])}) has no trainable "
                                 "parameters; move the boundary")
            for p in params:
                if owner.setdefault(id(p), k) != k:
                    raise ConfigError(f"a parameter is shared by parts {owner[id(p)]} and {k}; parts must be disjoint")
            self.part_params.append(params)
        self._inactive_blocks = []
        for a, b in zip(self.starts, self.starts[1:]):
            self._inactive_blocks.append([m for i, s in enumerate(flow.steps) if not a <= i < b
                                          for m in s.modules() if isinstance(m, CNFBlock)])
        scale = trainer.steps_per_epoch if pc.unit == "epochs" else 1
        total = self.cfg.train.iterations
        finetune = pc.finetune * scale
        if finetune >= total:
            raise ConfigError(f"parts.finetune={pc.finetune} {pc.unit} ({finetune} iterations) leaves no parts phase "
                              f"in train.iterations={total}; lower parts.finetune or raise train.iterations")
        self.phase_iterations = total - finetune
        self.turn_iterations = pc.turn * scale

    def _ranges_text(self) -> str:
        return ", ".join(f"{a}..{b - 1}" for a, b in zip(self.starts, self.starts[1:]))

    @property
    def n_parts(self) -> int:
        return len(self.starts) - 1

    def active_part(self, iteration: int) -> int | None:
        """The part trained at ``iteration`` (0-based), or None during end-to-end fine-tuning."""
        if iteration >= self.phase_iterations:
            return None
        mech = MECHANISMS[self.parts_cfg.mechanism]
        return mech(iteration, self.phase_iterations, self.n_parts, self.turn_iterations)

    # ------------------------------------------------------------------ optimiser
    def param_groups(self, trainer: "Trainer") -> list[dict]:
        scales = list(self.parts_cfg.lr_scales) or [1.0] * self.n_parts
        return [{"params": params, "name": f"part{k}", "follow_schedule": True, "lr_scale": float(scales[k])}
                for k, params in enumerate(self.part_params)]

    # ------------------------------------------------------------------ the step
    def _objective(self, part: int, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        z, logdet = truncated_forward(model, x, self.starts[part], self.starts[part + 1])
        # blocks outside the part did not run with a graph this step: their regulariser states
        # (RNODE) are stale or constant and must not enter the loss
        for block in self._inactive_blocks[part]:
            block.reg_states = {}
        return z, logdet

    def before_step(self, trainer: "Trainer", ctx: StepContext) -> None:
        if not self._actnorm_checked:
            # Glow's data-dependent init (Glow §3.1) on the first training batch, for every actnorm
            # at once, as end-to-end training does (later parts would otherwise initialise on a
            # later batch). A resumed model's actnorms are initialised already: nothing happens.
            norms = [m for m in trainer.model.modules() if isinstance(m, ActNorm)]
            if any(not bool(m.initialized) for m in norms):
                initialize_actnorm(trainer.model, ctx["x"])
            self._actnorm_checked = True
        part = self.active_part(int(ctx["iteration"]))
        ctx["part"] = "all" if part is None else part
        if part is not None:
            ctx["objective"] = partial(self._objective, part)

    # ------------------------------------------------------------------ logging
    def log_columns(self, trainer: "Trainer") -> list[str]:
        return ["part"]

    def log_values(self, trainer: "Trainer", ctx: StepContext) -> dict[str, Any]:
        return {"part": ctx.get("part", "all")}

    def eval_metrics(self, trainer: "Trainer") -> dict[str, Any]:
        return {"parts_boundaries": self.starts[1:-1], "parts_phase_iterations": self.phase_iterations}
