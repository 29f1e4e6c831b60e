"""Learned and random end times in the training loop: TO-FLOW coordinate descent and STEER.

The end-time policy of each CNF block comes from ``endtime.policy`` (:mod:`fastcnf.endtime`
gives the model builder each block's policy); T0 is ``model.end_time``:

* ``fixed`` — FFJORD, T = T0.
* ``joint`` — T is an ordinary parameter of the main optimiser (plain joint gradient).
* ``toflow`` — TO-FLOW Algorithm 1: each iteration solves once; the main optimiser steps the network
  with T excluded (T fixed), then :class:`EndTimeHook` steps every block's T with its own Adam
  (an :class:`~fastcnf.method.OwnOptimizer`: under torchrun T steps on the gradient averaged over
  every process's shard)
  (``endtime.lr``, 1e-2 in TO-FLOW §4, not following the learning-rate schedule) with the network
  fixed, and clips T to ``[eps, 2 T0 - eps]`` (eq. 17). The loss gains ``alpha * |T|`` per block
  (eq. 15-16), logged as ``temporal_reg``. ``endtime.order``:

  - ``algorithm1`` (default): Algorithm 1's order. The weights step first; T then steps on
    ``dL/dT(theta_new, T)`` by eq. 12-13 (:func:`fastcnf.endtime.policy.toflow_time_gradient`):
    ``<dL/dz(T), f(z(T), T)> + <dL/dlogdet, Tr df/dz>`` with f evaluated with the *updated*
    weights at this iteration's end state z(T) and adjoint dL/dz(T) (captured from the one solve
    and backward pass, as the paper does: "no additional computational cost"; one network
    evaluation per block), plus ``alpha sign(T)``.
  - ``simultaneous`` (deprecated: not the paper's order): T steps on autograd's dL/dT from the
    same backward pass (theta_old); the two coincide when the weights do not move.
* ``steer`` — T ~ U[T0 - b, T0 + b] for each training solve, T0 at evaluation; the sampled T is
  logged as ``T_sampled.<block>``.

Every run logs ``T.<block>`` per iteration (trainer) and, for toflow, ``dL_dT.<block>`` (the
gradient T stepped on), ``T_grad_norm`` (its norm over the blocks), ``T_clipped_fraction`` (the
share of blocks whose T eq. 17 clipped at this step) and ``grad_norm`` (the norm of the network
weights' gradient; TO-FLOW Figs. 6-9).

References: Du et al. 2022, "TO-FLOW: Efficient Continuous Normalizing Flows with Temporal
Optimization adjoint with Moving Speed", §3, Algorithm 1, eq. 11-17, §4 (settings); Ghosh et al.
2020, "STEER: Simple Temporal Regularization For Neural ODEs".
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fastcnf.endtime.policy import LearnedEndTime, RandomEndTime, toflow_time_gradient
from fastcnf.method import Hook, OwnOptimizer, StepContext, TrainerView as Trainer

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
        self.own: OwnOptimizer | None = None
        self.last_grad: dict[str, float] = {}
        self.order = getattr(self.cfg, "order", "algorithm1")
        self.blocks: dict[str, Any] = {}
        #: per block, this step's end states: [z(T), dL/dz(T), dL/dlogdet] (one per micro-batch)
        self.captured: dict[str, list[list]] = {}
        self.clipped_fraction = 0.0
        self.grad_norm = 0.0

    def setup(self, trainer: "Trainer") -> None:
        for block in trainer.model.cnf_blocks():
            p = block.end_time_policy
            if isinstance(p, LearnedEndTime):
                self.learned[block.name] = p
                self.blocks[block.name] = block
                if self.order == "algorithm1":
                    block.register_forward_hook(self._capture)
            elif isinstance(p, RandomEndTime):
                self.random[block.name] = p
        if self.learned:
            # the temporal optimiser Q of Algorithm 1: its own Adam, no weight decay, no schedule
            ends = [p.end_time for p in self.learned.values()]
            self.own = OwnOptimizer(ends, torch.optim.Adam(ends, lr=self.cfg.lr))

    def _capture(self, block, inputs, output) -> None:
        """Keep a training solve's end state and, during backward, its adjoint (Algorithm 1)."""
        if not (block.training and torch.is_grad_enabled() and isinstance(output, tuple)):
            return
        z, logdet = output[0], output[1]
        if not (z.requires_grad and logdet.requires_grad):
            return
        entry = [z.detach(), torch.zeros_like(z), torch.zeros_like(logdet)]
        self.captured.setdefault(block.name, []).append(entry)

        def keep(k):
            def hook(grad):
                entry[k] = entry[k] + grad.detach()
            return hook

        z.register_hook(keep(1))
        logdet.register_hook(keep(2))

    def own_optimizers(self, trainer: "Trainer") -> list[OwnOptimizer]:
        return [self.own] if self.own is not None else []

    def before_step(self, trainer: "Trainer", ctx: StepContext) -> None:
        # the main optimiser's zero_grad does not reach T
        for p in self.learned.values():
            p.end_time.grad = None
        self.captured = {}

    def loss_terms(self, trainer: "Trainer", ctx: StepContext) -> dict[str, Tensor]:
        if not self.learned:
            return {}
        return {"temporal_reg": sum(p.temporal_regularization() for p in self.learned.values())}

    def after_backward(self, trainer: "Trainer", ctx: StepContext) -> None:
        self.last_grad = {name: (float(p.end_time.grad) if p.end_time.grad is not None else 0.0)
                          for name, p in self.learned.items()}
        if self.learned:
            excluded = {id(p.end_time) for p in self.learned.values()}
            grads = [p.grad.detach().reshape(-1) for p in trainer.model.parameters()
                     if p.grad is not None and id(p) not in excluded]
            self.grad_norm = float(torch.cat(grads).norm()) if grads else 0.0

    def algorithm1_gradients(self) -> None:
        """Replace each T's gradient by eq. 12-13 at the updated weights (Algorithm 1, line 3)."""
        for name, p in self.learned.items():
            entries = self.captured.get(name, [])
            if not entries:  # the block did not run with a graph (e.g. another part trains)
                p.end_time.grad = None
                continue
            block = self.blocks[name]
            g = sum(toflow_time_gradient(block, z, gz, gl) for z, gz, gl in entries)
            g = g + p.alpha * torch.sign(p.end_time.detach())  # d/dT of alpha |T| (eq. 15)
            p.end_time.grad = g.reshape(p.end_time.shape).to(p.end_time)
            self.last_grad[name] = float(g)
        self.captured = {}

    def step_end_time(self) -> None:
        """One step of the temporal optimiser on the gradients already in ``T.grad`` (averaged over
        the processes), then eq. 17."""
        if self.own is None:
            return
        self.own.step()
        lo_hi = [p.clip_bounds() for p in self.learned.values()]
        clipped = [not lo < float(p.end_time.detach()) < hi for p, (lo, hi) in zip(self.learned.values(), lo_hi)]
        self.clipped_fraction = sum(clipped) / max(len(clipped), 1)
        for p in self.learned.values():
            p.clip_()

    def after_step(self, trainer: "Trainer", ctx: StepContext) -> None:
        if self.learned and self.order == "algorithm1":
            self.algorithm1_gradients()
        self.step_end_time()

    def log_columns(self, trainer: "Trainer") -> list[str]:
        cols = ["temporal_reg", "T_grad_norm", "T_clipped_fraction", "grad_norm"] if self.learned else []
        cols += [f"dL_dT.{n}" for n in self.learned] + [f"T_sampled.{n}" for n in self.random]
        return cols

    def log_values(self, trainer: "Trainer", ctx: StepContext) -> dict[str, Any]:
        out: dict[str, Any] = {f"dL_dT.{n}": g for n, g in self.last_grad.items()}
        if self.learned:
            out.update(T_grad_norm=sum(g * g for g in self.last_grad.values()) ** 0.5,
                       T_clipped_fraction=self.clipped_fraction, grad_norm=self.grad_norm)
        out.update({f"T_sampled.{n}": p.last_sample for n, p in self.random.items()})
        return out

    def eval_metrics(self, trainer: "Trainer") -> dict[str, Any]:
        return {"end_time_policy": self.cfg.policy, "end_time_T0": trainer.cfg.model.end_time}

    def load_state_dict(self, state: dict) -> None:
        if self.own is not None and "optimizer" in state:  # checkpoints that kept T's Adam here
            self.own.load_state_dict(state["optimizer"])
