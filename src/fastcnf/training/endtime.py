"""Learned and random end times in the training loop: TO-FLOW coordinate descent and STEER.

The end-time policy of each CNF block comes from ``endtime.policy`` (built by
:func:`fastcnf.models.builder.build_model` from :data:`fastcnf.cnf.endtime.END_TIME_POLICIES`);
T0 is ``model.end_time``:

* ``fixed`` — FFJORD, T = T0.
* ``joint`` — T is an ordinary parameter of the main optimiser (plain joint gradient).
* ``toflow`` — TO-FLOW Algorithm 1: each iteration solves once; the main optimiser steps the network
  with T excluded (T fixed), then :class:`EndTimeHook` steps every block's T with its own Adam
  (``endtime.lr``, 1e-2 in TO-FLOW §4, not following the learning-rate schedule) with the network
  fixed, and clips T to ``[eps, 2 T0 - eps]`` (eq. 17). The loss gains ``alpha * |T|`` per block
  (eq. 15-16), logged as ``temporal_reg``. The T step uses dL/dT computed by autograd in the
  same backward pass (one solve per iteration, as Algorithm 1); it equals eq. 12-13's end-state
  formula (:func:`fastcnf.cnf.endtime.toflow_time_gradient`) up to solver error (tests/endtime).
* ``steer`` — T ~ U[T0 - b, T0 + b] for each training solve, T0 at evaluation; the sampled T is
  logged as ``T_sampled.<block>``.

Every run logs ``T.<block>`` per iteration (trainer) and ``dL_dT.<block>`` (learned policies).

References: Du et al. 2022, "TO-FLOW: Efficient Continuous Normalizing Flows with Temporal
Optimization adjoint with Moving Speed", §3, Algorithm 1, eq. 11-17, §4 (settings); Ghosh et al.
2020, "STEER: Simple Temporal Regularization For Neural ODEs".
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fastcnf.cnf.endtime import LearnedEndTime, RandomEndTime
from fastcnf.training.hooks import Hook, StepContext, TrainerView as Trainer

__all__ = ["EndTimeHook"]


class EndTimeHook(Hook):
    """Runs TO-FLOW's step on T (Algorithm 1, line 3) and logs end times, sampled or learned.

    ``after_step`` is the coordinate-descent step: the network has just been updated by the main
    optimiser with T fixed (T is in :meth:`excluded_parameters`); now only T moves.
    """

    name = "endtime"

    def __init__(self, cfg) -> None:
        self.cfg = cfg.endtime
        self.learned: dict[str, LearnedEndTime] = {}
        self.random: dict[str, RandomEndTime] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.last_grad: dict[str, float] = {}

    def setup(self, trainer: "Trainer") -> None:
        for block in trainer.model.cnf_blocks():
            p = block.end_time_policy
            if isinstance(p, LearnedEndTime):
                self.learned[block.name] = p
            elif isinstance(p, RandomEndTime):
                self.random[block.name] = p
        if self.learned:
            # the temporal optimiser Q of Algorithm 1: its own Adam, no weight decay, no schedule
            self.optimizer = torch.optim.Adam([p.end_time for p in self.learned.values()], lr=self.cfg.lr)

    def excluded_parameters(self, trainer: "Trainer") -> list[Tensor]:
        return [p.end_time for p in self.learned.values()]

    def before_step(self, trainer: "Trainer", ctx: StepContext) -> None:
        # the main optimiser's zero_grad does not reach T
        for p in self.learned.values():
            p.end_time.grad = None

    def loss_terms(self, trainer: "Trainer", ctx: StepContext) -> dict[str, Tensor]:
        if not self.learned:
            return {}
        return {"temporal_reg": sum(p.temporal_regularization() for p in self.learned.values())}

    def after_backward(self, trainer: "Trainer", ctx: StepContext) -> None:
        self.last_grad = {name: (float(p.end_time.grad) if p.end_time.grad is not None else 0.0)
                          for name, p in self.learned.items()}

    def step_end_time(self) -> None:
        """One step of the temporal optimiser on the gradients already in ``T.grad``, then eq. 17."""
        if self.optimizer is None:
            return
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.learned.values():
            p.clip_()

    def after_step(self, trainer: "Trainer", ctx: StepContext) -> None:
        self.step_end_time()

    def log_columns(self, trainer: "Trainer") -> list[str]:
        cols = ["temporal_reg"] if self.learned else []
        cols += [f"dL_dT.{n}" for n in self.learned] + [f"T_sampled.{n}" for n in self.random]
        return cols

    def log_values(self, trainer: "Trainer", ctx: StepContext) -> dict[str, Any]:
        out: dict[str, Any] = {f"dL_dT.{n}": g for n, g in self.last_grad.items()}
        out.update({f"T_sampled.{n}": p.last_sample for n, p in self.random.items()})
        return out

    def eval_metrics(self, trainer: "Trainer") -> dict[str, Any]:
        return {"end_time_policy": self.cfg.policy, "end_time_T0": trainer.cfg.model.end_time}

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()} if self.optimizer is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.optimizer is not None and "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
