"""The tolerance feature in the training loop (Nguyen et al. 2019, "InfoCNF: Efficient
Conditional Continuous Normalizing Flow Using Adaptive Solvers", §3, §4.2, §4.4).

The policy itself is part of the model (:mod:`fastcnf.tolerances.gates`, attached to the built
model by :mod:`fastcnf.tolerances`). This hook logs each
block's tolerance (``tol.<block>`` in log.csv) and, for ``learned``, trains the gates: after
``loss.backward()`` both NFE counts of every block are known, so it forms the returns of eq. 7,
``r_i = -[L - alpha/N sum_{j>=i} R_j]`` with ``R_j = -(NFE_forward_j + NFE_backward_j)``,
subtracts a moving-average baseline (per block for the NFE part; one for the loss part, with its
own momentum ``tolerances.loss_baseline_momentum``) and takes one step of the gates' **own Adam
optimiser** (an :class:`~fastcnf.method.OwnOptimizer`: under torchrun the gate gradients are
averaged over the processes, so every process keeps the same gates). The gates are not in the
model's optimiser.

With gradient accumulation (``train.accumulation_steps > 1``) a block's tolerance is sampled once
per optimiser step, on the first micro-batch, and reused for the others (InfoCNF App. D: one
tolerance per batch); its reward is the NFE per micro-batch, averaged over the step. When only
some blocks run (training by parts), the returns of that set of blocks get their own
moving-average baselines, built from past steps only, so the REINFORCE estimate stays unbiased.
Figures: ``tolerances.png`` and ``tolerance_distribution.png`` (InfoCNF Figure 2b).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fastcnf.evaluation.plots import tolerance_figures
from fastcnf.method import Hook, OwnOptimizer, StepContext, TrainerView
from fastcnf.tolerances.reinforce import ReturnBaseline, cumulative_returns, reinforce_loss

__all__ = ["StaticToleranceHook", "LearnedToleranceHook"]


class StaticToleranceHook(Hook):
    """``per_block``: logs each block's training tolerance (set when the model was built)."""

    name = "tolerances"

    def log_columns(self, trainer: TrainerView) -> list[str]:
        return [f"tol.{b.name}" for b in trainer.model.cnf_blocks()]

    def log_values(self, trainer: TrainerView, ctx: StepContext) -> dict[str, Any]:
        return {f"tol.{b.name}": b.solver.atol for b in trainer.model.cnf_blocks()}


def _cumulative_nfe(block) -> float:
    """Forward + backward evaluations of every solve of ``block`` since its counter's last reset
    (the committed solves and the current one)."""
    return float(block.nfe.total)


class LearnedToleranceHook(Hook):
    """``learned``: REINFORCE on -NFE for the model's tolerance gates (InfoCNF eq. 6-7)."""

    name = "tolerances"

    def __init__(self, cfg) -> None:
        t = cfg.tolerances
        self.alpha = float(t.alpha)
        self.include_loss = bool(t.include_loss)
        self.gate_lr = float(t.gate_lr)
        self.momenta = (t.baseline_momentum, t.loss_baseline_momentum)
        self.baseline = ReturnBaseline(*self.momenta)
        #: baselines of partial passes, one per set of blocks that ran (key: their indices)
        self.partial_baselines: dict[str, ReturnBaseline] = {}
        self.last: dict[str, Any] = {}
        self._nfe_before: list[float] = []

    def setup(self, trainer: TrainerView) -> None:
        self.policy = trainer.model.tolerance_policy
        gates = list(self.policy.parameters())
        self.own = OwnOptimizer(gates, torch.optim.Adam(gates, lr=self.gate_lr))
        self.names = list(self.policy.names)
        # InfoCNF App. D: one tolerance per batch, also when the batch is accumulated in micro-batches
        self.policy.hold_per_step = trainer.cfg.train.accumulation_steps > 1
        self.micro_batches = int(trainer.cfg.train.accumulation_steps)

    def own_optimizers(self, trainer: TrainerView) -> list[OwnOptimizer]:
        return [self.own]

    def before_step(self, trainer: TrainerView, ctx: StepContext) -> None:
        self.policy.records = []
        self._nfe_before = [_cumulative_nfe(b) for b in trainer.model.cnf_blocks()]

    def after_backward(self, trainer: TrainerView, ctx: StepContext) -> None:
        records, self.policy.records = self.policy.records, []
        if not records:
            return
        blocks = trainer.model.cnf_blocks()
        # NFE per micro-batch of this step (every solve since before_step, averaged)
        nfe = [(_cumulative_nfe(blocks[i]) - self._nfe_before[i]) / self.micro_batches for i, *_ in records]
        loss = float(ctx["loss"].detach()) if self.include_loss else 0.0
        # r_i = -L + alpha/N sum_{j>=i} R_j, split in its loss part and its NFE part, each with its
        # own moving-average baseline (the sum of two baselines from past steps is a baseline)
        nfe_part = cumulative_returns(0.0, nfe, self.alpha)
        returns = nfe_part - loss
        if len(records) == len(blocks):
            baseline = self.baseline(loss, nfe_part)
        else:  # a partial pass (training by parts): a baseline of its own, from past steps only
            key = ",".join(str(i) for i, *_ in records)
            baseline = self.partial_baselines.setdefault(key, ReturnBaseline(*self.momenta))(loss, nfe_part)
        surrogate = reinforce_loss([r[1] for r in records], returns, baseline)
        for p in self.own.params:
            p.grad = None
        surrogate.backward()
        self.own.step()  # each process's REINFORCE estimate, averaged over the processes
        self.last = {f"tol.{self.names[i]}": tol for i, _, tol, _, _ in records}

    def log_columns(self, trainer: TrainerView) -> list[str]:
        return [f"tol.{n}" for n in self.names]

    def log_values(self, trainer: TrainerView, ctx: StepContext) -> dict[str, Any]:
        return dict(self.last)

    def figures(self, trainer: TrainerView, fig_dir) -> None:
        tolerance_figures(Path(trainer.out_dir) / "log.csv", fig_dir, self.names, self.policy.eval_records,
                          self.policy.min_tol, self.policy.max_tol)

    def state_dict(self) -> dict:
        return {"baseline": self.baseline.state_dict(),
                "partial_baselines": {k: b.state_dict() for k, b in self.partial_baselines.items()}}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if "gates" in state:  # checkpoints before the gates moved into the model
            self.policy.load_state_dict(state["gates"])
        if "optimizer" in state:  # checkpoints that kept the gates' Adam here
            self.own.load_state_dict(state["optimizer"])
        self.baseline.load_state_dict(state["baseline"])
        for key, b in state.get("partial_baselines", {}).items():
            self.partial_baselines.setdefault(key, ReturnBaseline(*self.momenta)).load_state_dict(b)
