"""The tolerance feature as a trainer hook (002 §3, §4.2, §4.4).

``tolerances.policy``:

* ``fixed`` / ``per_block`` — at setup, each block's training solver gets its tolerance
  (:class:`~fastcnf.ode.tolerances.FixedTolerance`, :class:`~fastcnf.ode.tolerances.PerBlockTolerance`);
  ``tolerances.adjoint_atol/adjoint_rtol`` set the backward (adjoint) solve's tolerances.
* ``learned`` — :class:`~fastcnf.ode.tolerances.LearnedTolerance` attaches a gate to every block
  (a forward pre-hook samples the block's tolerance from its input, once per batch). After
  ``loss.backward()`` both NFE counts of every block are known; :meth:`LearnedToleranceHook.after_backward`
  then forms the returns of 002 eq. 7, ``r_i = -[L - alpha/N sum_{j>=i} R_j]`` with
  ``R_j = -(NFE_forward_j + NFE_backward_j)``, subtracts a moving-average baseline (per block for
  the NFE part ``alpha/N sum R_j``; one for the loss part ``-L``, with its own momentum
  ``tolerances.loss_baseline_momentum``) and
  takes one step of the gates' **own Adam optimiser** on the REINFORCE surrogate (under
  torchrun: gates broadcast from rank 0 at setup, gate gradients averaged over the ranks before
  each step, so every rank keeps the same gates). The gates are
  not in the model's optimiser (no weight decay, no gradient clipping mixed with the model's);
  the model itself trains on the task's loss (NLL, + beta * cross-entropy when conditional) only.

log.csv gains ``tol.<block>`` (the tolerance sampled this iteration). Figures:
``tolerances.png`` (each block's tolerance over training) and ``tolerance_distribution.png``
(distribution over the train and test sets, 002 Figure 2b). metrics.json gains ``tolerances``.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastcnf.ode.tolerances import (
    LearnedTolerance,
    PerBlockTolerance,
    ReturnBaseline,
    ToleranceError,
    cumulative_returns,
    reinforce_loss,
)
from fastcnf.training import distributed as ddp
from fastcnf.training.hooks import HOOK_BUILDERS, Hook, StepContext

__all__ = ["StaticToleranceHook", "LearnedToleranceHook", "build_tolerance_hook"]


class StaticToleranceHook(Hook):
    """``fixed`` / ``per_block``: set every block's training solver once, at setup."""

    name = "tolerances"

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def setup(self, trainer) -> None:
        t, s = self.cfg.tolerances, self.cfg.solver
        blocks = trainer.model.cnf_blocks()
        if not blocks:
            return
        if t.policy == "fixed" and len(t.atol) > 1:
            raise ToleranceError(f"tolerances.policy=fixed takes one atol, got {len(t.atol)} values; "
                                 "use tolerances.policy=per_block for one tolerance per block")
        atol = t.atol or [b.solver.atol for b in blocks]
        rtol = t.rtol or (t.atol if t.atol else [b.solver.rtol for b in blocks])
        adj_a = t.adjoint_atol or [b.solver.adjoint_atol for b in blocks]
        adj_r = t.adjoint_rtol or [b.solver.adjoint_rtol for b in blocks]
        PerBlockTolerance(atol, rtol, adj_a, adj_r).apply(blocks)

    def log_columns(self, trainer) -> list[str]:
        return [f"tol.{b.name}" for b in trainer.model.cnf_blocks()]

    def log_values(self, trainer, ctx: StepContext) -> dict[str, Any]:
        return {f"tol.{b.name}": b.solver.atol for b in trainer.model.cnf_blocks()}


class LearnedToleranceHook(Hook):
    """``learned``: gates sample per-block tolerances; REINFORCE on -NFE (002 eq. 6-7)."""

    name = "tolerances"

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        t = cfg.tolerances
        self.alpha = float(t.alpha)
        self.include_loss = bool(t.include_loss)
        self.baseline = ReturnBaseline(t.baseline_momentum, t.loss_baseline_momentum)
        self.policy: LearnedTolerance | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.last: dict[str, Any] = {}

    def setup(self, trainer) -> None:
        t = self.cfg.tolerances
        blocks = trainer.model.cnf_blocks()
        if not blocks:
            raise ToleranceError("tolerances.policy=learned needs a model with CNF blocks "
                                 f"(model.arch={self.cfg.model.arch!r} has none)")
        # adjoint (and optional fixed forward) tolerances first; the gates override the forward ones
        StaticToleranceHook(self.cfg).setup(trainer)
        init = t.init_tol if t.init_tol > 0 else self.cfg.solver.atol
        self.policy = LearnedTolerance(blocks, t.gate_hidden, math.log10(init), t.init_std, t.min_std,
                                       t.min_tol, t.max_tol, t.eval_tolerance)
        self.policy.to(trainer.device, trainer.dtype)
        self.policy.attach(blocks)
        # [distributed] every rank starts from rank 0's gates (after_backward keeps them equal)
        ddp.broadcast_tensors(list(self.policy.parameters()))
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=t.gate_lr)
        self.names = [b.name for b in blocks]

    # ---- training --------------------------------------------------------------------------
    def before_step(self, trainer, ctx: StepContext) -> None:
        self.policy.records = []

    def after_backward(self, trainer, ctx: StepContext) -> None:
        policy = self.policy
        records = policy.records
        policy.records = []
        policy.clear_overrides()
        if not records:
            return
        blocks = trainer.model.cnf_blocks()
        nfe = [blocks[i].nfe.forward + blocks[i].nfe.backward for i, *_ in records]
        loss = float(ctx["loss"].detach()) if self.include_loss else 0.0
        # r_i = -L + alpha/N sum_{j>=i} R_j, split in its loss part and its NFE part, each with its
        # own moving-average baseline (the sum of two baselines from past steps is a baseline)
        nfe_part = cumulative_returns(0.0, nfe, self.alpha)
        returns = nfe_part - loss
        if len(records) == len(blocks):
            baseline = self.baseline(loss, nfe_part)
        else:  # a partial pass (e.g. training by parts): no per-block baseline
            baseline = returns.mean().expand_as(returns)
        surrogate = reinforce_loss([r[1] for r in records], returns, baseline)
        self.optimizer.zero_grad(set_to_none=True)
        surrogate.backward()
        # [distributed] each rank's REINFORCE estimate comes from its own shard (its own NFE and
        # loss); averaging them over the ranks gives every rank the same Adam step, so the gates
        # stay identical (no-op in one process)
        ddp.sync_gradients(list(self.policy.parameters()))
        self.optimizer.step()
        self.last = {f"tol.{self.names[i]}": tol for i, _, tol, _, _ in records}

    # ---- logging, evaluation, figures ------------------------------------------------------
    def log_columns(self, trainer) -> list[str]:
        return [f"tol.{n}" for n in self.names]

    def log_values(self, trainer, ctx: StepContext) -> dict[str, Any]:
        return dict(self.last)

    def eval_begin(self, trainer) -> None:
        self.policy.eval_records = []

    def eval_metrics(self, trainer) -> dict[str, Any]:
        self.policy.clear_overrides()
        out: dict[str, Any] = {}
        for i, name in enumerate(self.names):
            mus = [mu for j, mu, _ in self.policy.eval_records if j == i]
            sig = [s for j, _, s in self.policy.eval_records if j == i]
            if mus:
                out[name] = {"test_log10_tol_mean": float(np.mean(mus)), "test_log10_tol_sigma": float(np.mean(sig)),
                             # the tolerance actually used: 10**mu clamped to [min_tol, max_tol]
                             # (mu itself may drift past the clamp, where the reward is flat)
                             "test_mean_tol": self.policy.clamp(10 ** min(float(np.mean(mus)), 0.0)),
                             "batches": len(mus)}
        return {"tolerances": out, "tolerance_eval": self.policy.eval_mode}

    def _train_log10_tols(self, trainer) -> dict[str, np.ndarray]:
        """Sampled log10 tolerances of the second half of training (log.csv)."""
        path = Path(trainer.out_dir) / "log.csv"
        cols: dict[str, list[float]] = {n: [] for n in self.names}
        if not path.exists():
            return {}
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        for r in rows[len(rows) // 2:]:
            for n in self.names:
                v = r.get(f"tol.{n}", "")
                if v not in ("", None):
                    cols[n].append(math.log10(float(v)))
        return {n: np.asarray(v) for n, v in cols.items()}

    def figures(self, trainer, fig_dir) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from fastcnf.evaluation.plots import _read_log

        fig_dir = Path(fig_dir)
        log = _read_log(Path(trainer.out_dir) / "log.csv")
        if log:
            fig, ax = plt.subplots(figsize=(6, 3.5))
            for n in self.names:
                if f"tol.{n}" in log:
                    ax.plot(log["iteration"], log[f"tol.{n}"], lw=0.8, label=n)
            ax.set_yscale("log")
            ax.set_xlabel("iteration")
            ax.set_ylabel("sampled tolerance")
            ax.set_title("learned solver tolerance per block")
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(fig_dir / "tolerances.png", dpi=120)
            plt.close(fig)
        # 002 Figure 2b: distribution of each block's tolerance over the train and test sets
        train = self._train_log10_tols(trainer)
        rng = np.random.default_rng(0)
        n = len(self.names)
        fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3), squeeze=False)
        lo, hi = math.log10(self.policy.min_tol), math.log10(self.policy.max_tol)
        for i, name in enumerate(self.names):
            ax = axes[0, i]
            if name in train and len(train[name]):
                ax.hist(train[name], bins=30, alpha=0.6, density=True, label="train")
            test = [rng.normal(mu, s, 200) for j, mu, s in self.policy.eval_records if j == i]
            if test:
                ax.hist(np.clip(np.concatenate(test), lo, hi), bins=30, alpha=0.6, density=True, label="test")
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("log10 tolerance")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(fig_dir / "tolerance_distribution.png", dpi=120)
        plt.close(fig)

    # ---- checkpoint ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"gates": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(),
                "baseline": self.baseline.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.policy.load_state_dict(state["gates"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.baseline.load_state_dict(state["baseline"])


def build_tolerance_hook(cfg, trainer) -> Hook | None:
    """``tolerances.policy``: fixed without settings -> no hook; fixed/per_block -> static; learned."""
    t = cfg.tolerances
    if t.policy == "learned":
        return LearnedToleranceHook(cfg)
    if t.policy == "fixed" and not (t.atol or t.rtol or t.adjoint_atol or t.adjoint_rtol):
        return None
    if t.policy == "per_block" and not t.atol:
        raise ToleranceError("tolerances.policy=per_block needs tolerances.atol, a list with one "
                             "tolerance per CNF block (forward order), e.g. [1e-3, 1e-5]")
    return StaticToleranceHook(cfg)


HOOK_BUILDERS.append(build_tolerance_hook)
