"""The one training loop of fastcnf.

Every method (FFJORD, CCNF/InfoCNF, learned tolerances, TO-FLOW, STEER, RNODE, large batch,
parts, data-parallel, flow matching, LatentODE) trains here: the model and loss come from a task
(:data:`TASKS`), the methods plug in as hooks (:func:`fastcnf.methods.build_hooks`). The trainer
is the one place that handles the tensors a method steps with its own optimiser
(:class:`fastcnf.method.OwnOptimizer`): it leaves them out of the main optimiser, checkpoints their
optimisers and, under torchrun, has their gradients averaged over the processes before each step.

A run directory holds ``config.yaml`` (resolved), ``log.csv`` (one row per iteration),
``metrics.json``, ``checkpoints/last.pt`` (+ ``model.safetensors`` at the end) and ``figures/``.
Resuming from ``checkpoints/last.pt`` continues the run exactly: model, optimiser, RNG states,
data order and iteration are restored, so the final weights equal an uninterrupted run's. With
``train.val_every`` the checkpoint also keeps the best validation weights, which the run ends with
(:mod:`fastcnf.training.validation`). With ``train.ema_decay`` the run validates, tests, samples
and exports an exponential moving average of the weights (:mod:`fastcnf.training.ema`).
"""
from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch.autograd.graph import increment_version

from fastcnf.cnf.gradient import gradient_paths
from fastcnf.config import Config, config_to_dict
from fastcnf.data import Batcher, check_finite, load_data
from fastcnf.data.base import DataBundle
from fastcnf.data.record import DataRecord
from fastcnf.evaluation.plots import training_curves
from fastcnf.method import StepContext
from fastcnf.methods import build_hooks, load_run_config
from fastcnf.ode.budget import SolveBudget
from fastcnf.ode.solve import SolverBudgetExceeded
from fastcnf.training import distributed as ddp
from fastcnf.training.accumulation import check_large_batch, merge_contexts, split_micro
from fastcnf.training.checkpoint import export_safetensors, load_checkpoint, save_checkpoint, write_atomic
from fastcnf.training.ema import WeightAverage
from fastcnf.training.latent_ode_task import LatentODETask
from fastcnf.training.runlock import RunLock, RunLocked
from fastcnf.training.runlog import BASE_LOG_COLUMNS, RunLog, training_summary, write_metrics
from fastcnf.training.startup import plan_gradients, precision_notes, start_line
from fastcnf.training.schedules import LRSchedule, build_optimizer, large_batch_summary, scaled_lr, set_group_lrs
from fastcnf.training.stopping import EXIT_CODES, CheckpointClock, StopSignals, agree
from fastcnf.training.tasks import DensityTask, Task
from fastcnf.training.validation import EarlyStopping, final_weights, validation_task

__all__ = ["Trainer", "TrainingDiverged", "TrainingInterrupted", "BASE_LOG_COLUMNS", "TASKS"]

#: ``task`` -> task class
TASKS: dict[str, Callable[[Config, DataBundle], Task]] = {"density": DensityTask, "latent_ode": LatentODETask}


class TrainingDiverged(RuntimeError):
    """The loss, a gradient or the parameters became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGUSR1: a checkpoint was written; ``fastcnf train --resume DIR`` continues.
    ``exit_code``: what ``fastcnf train`` exits with (130, or 128 + the signal number)."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _all_finite(tensors) -> bool:
    """Every entry of every tensor is finite (one device synchronisation).

    The tensors are flattened into one per device and dtype and checked there: two kernels per group
    instead of two per tensor, which on a small model is most of the check's time."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    with torch.no_grad():
        for t in tensors:
            if t is not None:
                groups.setdefault((t.device, t.dtype), []).append(t.reshape(-1))
        flags = [torch.isfinite(torch.cat(g)).all() for g in groups.values()]
        return bool(torch.stack(flags).all()) if flags else True


class Trainer:
    """Train ``cfg`` into ``out_dir``.

    Args:
        cfg: the resolved configuration.
        out_dir: the run directory (created).
        resume: continue from ``out_dir/checkpoints/last.pt``.
        quiet: plain log lines instead of a progress bar.
        progress: show progress at all (False in tests).

    Example:
        >>> from fastcnf import Trainer, load_recipe
        >>> cfg = load_recipe("toy-ffjord", ["train.iterations=10", "data.n_test=200", "eval.figures=false", "threads=1"])
        >>> metrics = Trainer(cfg, "runs/toy", progress=False).fit()
        >>> metrics["iterations"], metrics["test_nll_nats"] > 0
        (10, True)
    """

    def __init__(self, cfg: Config, out_dir: str | Path, resume: bool = False, quiet: bool = False,
                 progress: bool = True) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.progress_mode = "off" if not progress else ("lines" if quiet else "auto")
        self.ckpt_path = self.out_dir / "checkpoints" / "last.pt"
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        # [distributed] join torchrun's process group (no-op in one process); one GPU per rank
        self.dist = ddp.init_distributed(cfg)
        check_large_batch(cfg, self.dist.world_size)
        self.device = torch.device(cfg.device)
        if self.dist.enabled and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", self.dist.local_rank)
        self.dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
        torch.manual_seed(cfg.seed)
        self.bundle = load_data(cfg.data, cfg.seed)
        for split_name, split in (("training data", self.bundle.train), ("test data", self.bundle.test)):
            check_finite(split.x, f"{split_name} of {self.bundle.name!r}")
        self.task = TASKS[cfg.task](cfg, self.bundle)
        # [validation] best weights by validation NLL, early stopping (train.val_every, train.patience)
        self.early = EarlyStopping(cfg.train.val_every, cfg.train.patience)
        if self.early.enabled:
            self.val_task = validation_task(self.task, cfg)
            check_finite(self.bundle.val.x, f"validation data of {self.bundle.name!r}")
        self.model = self.task.build_model().to(self.device, self.dtype)
        self.batcher = Batcher(self.bundle, cfg.train.batch_size, cfg.seed, self.dist.rank, self.dist.world_size,
                               hflip=cfg.data.hflip)
        self.steps_per_epoch = self.batcher.steps_per_epoch
        self.iteration = 0
        self.skipped_steps = 0  # bad steps skipped under train.max_loss_spikes
        self.saved_iteration: int | None = None  # the iteration of the last checkpoint written or loaded
        self.hooks = build_hooks(cfg)
        for h in self.hooks:
            h.setup(self)
        # the tensors methods step with their own optimisers: out of the main optimiser, saved in
        # the checkpoint, and averaged over the processes before each of their steps
        self.own_optimizers = {f"{h.name}.{i}": o for h in self.hooks for i, o in enumerate(h.own_optimizers(self))}
        own_params = [p for o in self.own_optimizers.values() for p in o.params]
        for o in self.own_optimizers.values():
            o.average_gradients = ddp.sync_gradients
        # [large batch] lr scaled with the global batch (train.lr_scaling, train.reference_batch_size)
        self.base_lr = scaled_lr(cfg.train.lr, cfg.train.batch_size, cfg.train.reference_batch_size,
                                 cfg.train.lr_scaling)
        self.optimizer = build_optimizer(self.cfg.train, self.model, self.hooks, self, excluded=own_params)
        # [distributed] the main optimiser's tensors have their gradient averaged after backward
        self._synced_params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.dist.enabled:
            # same start on every rank, then per-rank noise streams (Hutchinson, dequantisation)
            seen = {id(p) for p in self.model.parameters()}
            ddp.broadcast_tensors(list(self.model.parameters()) + [p for p in own_params if id(p) not in seen]
                                  + list(self.model.buffers()))
            torch.manual_seed(cfg.seed + 1000003 * self.dist.rank)
        self.schedule = LRSchedule.from_config(cfg.train, self.steps_per_epoch, self.base_lr)
        # [train.ema_decay] the moving average of the weights that is validated, tested and exported
        self.ema = WeightAverage(self.model, cfg.train.ema_decay)
        self.log_columns = list(BASE_LOG_COLUMNS)
        for h in self.hooks:
            self.log_columns += [c for c in h.log_columns(self) if c not in self.log_columns]
        self.log_columns += [f"T.{name}" for name in self.model_end_times()]
        if self.early.enabled:
            self.log_columns.append("val_nll")
        if cfg.train.max_loss_spikes > 0:
            self.log_columns.append("skipped_steps")
        if resume:
            self._resume()

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, overrides: list[str] | None = None, **kwargs) -> "Trainer":
        """A trainer for an existing run directory (its config.yaml plus overrides)."""
        return cls(load_run_config(run_dir, overrides), run_dir, **kwargs)

    @property
    def is_main(self) -> bool:
        """Rank 0 (or the only process): the one that prints and writes files."""
        return self.dist.is_main

    def model_end_times(self) -> dict[str, float]:
        return self.model.end_times() if hasattr(self.model, "end_times") else {}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "batcher": self.batcher.state_dict(),
            "torch_rng": torch.get_rng_state(),
            # [distributed] each rank's noise stream, so a resumed run equals an uninterrupted one
            "torch_rng_ranks": ddp.gather_objects(torch.get_rng_state()) if self.dist.enabled else [],
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "hooks": {h.name: h.state_dict() for h in self.hooks},
            "own_optimizers": {name: o.state_dict() for name, o in self.own_optimizers.items()},
            "validation": self.early.state_dict(),
            "ema": self.ema.state_dict(),
            "skipped_steps": self.skipped_steps,
            "config": config_to_dict(self.cfg),
        }

    def save(self) -> None:
        """Write the checkpoint (rank 0; every rank must call it: RNG states are gathered)."""
        state = self.state_dict()
        if self.is_main:
            save_checkpoint(state, self.ckpt_path)
        self.saved_iteration = self.iteration
        ddp.barrier()

    def _resume(self) -> None:
        state = load_checkpoint(self.ckpt_path, map_location=self.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.batcher.load_state_dict(state["batcher"])
        torch.set_rng_state(state["torch_rng"].cpu())
        ranks = state.get("torch_rng_ranks") or []
        if self.dist.enabled and len(ranks) == self.dist.world_size:
            torch.set_rng_state(ranks[self.dist.rank].cpu())
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        for h in self.hooks:
            h.load_state_dict(state["hooks"].get(h.name, {}))
        for name, own in (state.get("own_optimizers") or {}).items():
            if name in self.own_optimizers:
                self.own_optimizers[name].load_state_dict(own)
        self.early.load_state_dict(state.get("validation", {}))
        self.ema.load_state_dict(state.get("ema", {}))
        self.iteration = int(state["iteration"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.saved_iteration = self.iteration

    # ------------------------------------------------------------------ the loop
    @staticmethod
    def reported_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The weights a checkpoint's run reports (best validation, else average, else last)."""
        return final_weights(state)

    def peek_batch(self, ahead: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model input ``(x, y)`` on the device of the step ``ahead`` steps from now (1: the next
        one), without consuming anything: the batcher's state and the global RNG (the task's
        ``prepare`` may draw) are put back, so the coming steps draw exactly these batches (for a
        hook that works batches ahead)."""
        if isinstance(ahead, bool) or int(ahead) < 1:
            raise ValueError(f"peek_batch(ahead) needs ahead >= 1, got {ahead!r}")
        batcher_state, rng = self.batcher.state_dict(), torch.get_rng_state()
        try:
            for _ in range(int(ahead)):
                x, y = self.task.prepare(*self.batcher.next())
        finally:
            self.batcher.load_state_dict(batcher_state)
            torch.set_rng_state(rng)
        return x.to(self.device, self.dtype), None if y is None else y.to(self.device)

    def train_step(self) -> StepContext:
        """One optimiser step; returns the step's context (loss, NFE, hook values)."""
        model = self.model
        model.train()
        x, y = self.task.prepare(*self.batcher.next())
        ctx = StepContext(x=x.to(self.device, self.dtype), y=None if y is None else y.to(self.device),
                          iteration=self.iteration)
        lr = set_group_lrs(self.optimizer, self.schedule(self.iteration))
        for h in self.hooks:
            h.before_step(self, ctx)
        # [large batch] train.accumulation_steps micro-batches, each loss scaled by its share n_k/n,
        # so the gradients sum to the full batch's
        steps = self.cfg.train.accumulation_steps
        micros = [(1.0, ctx)] if steps == 1 else split_micro(ctx, steps)
        nfe_f = nfe_b = 0.0
        for k, (share, mctx) in enumerate(micros):
            self.task.step(model, mctx)
            terms: dict[str, torch.Tensor] = {}
            for h in self.hooks:
                terms.update(h.loss_terms(self, mctx))
            reg = model.regularization_loss() if hasattr(model, "regularization_loss") else 0.0
            if isinstance(reg, torch.Tensor):
                terms["regularization"] = reg
            loss = mctx["loss"]
            for v in terms.values():
                loss = loss + v
            mctx["loss"], mctx["terms"] = loss, terms
            if ddp.any_rank(not bool(torch.isfinite(loss))):
                return self._bad_step(ctx, mctx, lr, f"the loss became {float(loss.detach())}")
            if k == 0:
                self.optimizer.zero_grad(set_to_none=True)
            (loss if steps == 1 else loss * share).backward()
            f, b = model.nfe_last() if hasattr(model, "nfe_last") else (0, 0)
            nfe_f, nfe_b = nfe_f + f / steps, nfe_b + b / steps
        if steps > 1:
            merge_contexts(ctx, micros)
        ctx["nfe"] = (nfe_f, nfe_b) if steps > 1 else (f, b)
        # [distributed] average every trained tensor's gradient over the ranks (no-op in one process)
        ddp.sync_gradients(self._synced_params)
        if not _all_finite(p.grad for p in self._synced_params):  # synced: every rank decides alike
            return self._bad_step(ctx, ctx, lr, "a gradient became non-finite")
        for h in self.hooks:
            h.after_backward(self, ctx)
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], self.cfg.train.grad_clip)
        self.optimizer.step()
        if self.optimizer.defaults.get("fused"):
            # torch's fused Adam kernel writes the weights in place without counting a new version:
            # count it, so what caches on the weights' versions (the packed trace kernel) sees the update
            increment_version(self._synced_params)
        if not _all_finite(self._synced_params):
            raise TrainingDiverged(self._diverged("the parameters became non-finite after the optimiser step"))
        for h in self.hooks:
            h.after_step(self, ctx)
        ctx["lr"] = lr
        if self.dist.enabled:
            ddp.sync_after_step(self.cfg, model, self.optimizer, ctx, (nfe_f, nfe_b), self._synced_params,
                                self.iteration + 1, self.device)
        self.ema.update(model)
        return ctx

    def _diverged(self, what: str) -> str:
        last = (f"the last good checkpoint {self.ckpt_path} (iteration {self.saved_iteration}) is kept"
                if self.saved_iteration is not None else "no checkpoint was written yet")
        spikes = self.cfg.train.max_loss_spikes
        skipped = f" after {self.skipped_steps} skipped step(s) (train.max_loss_spikes={spikes})" if spikes else ""
        return (f"training diverged at iteration {self.iteration + 1}: {what}{skipped}; {last}. Lower train.lr, "
                "add train.grad_clip, tighten the solver tolerances, or let train.max_loss_spikes skip rare bad steps")

    def _bad_step(self, ctx: StepContext, mctx: StepContext, lr: float, what: str) -> StepContext:
        """A non-finite loss or gradient: skip the step (no update, gradients zeroed) while
        ``train.max_loss_spikes`` allows, else stop with :class:`TrainingDiverged`."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.skipped_steps >= self.cfg.train.max_loss_spikes:
            raise TrainingDiverged(self._diverged(what))
        self.skipped_steps += 1
        loss = mctx["loss"].detach()
        ctx.update(loss=loss, nll=mctx.get("nll", loss), lr=lr, skipped=True,
                   nfe=self.model.nfe_last() if hasattr(self.model, "nfe_last") else (0, 0))
        return ctx

    def _row(self, ctx: StepContext, seconds: float) -> dict[str, Any]:
        f, b = ctx["nfe"]
        row: dict[str, Any] = {
            "iteration": self.iteration, "loss": float(ctx["loss"].detach()), "nll": float(ctx["nll"].detach()),
            "bits_per_dim": float(ctx["bits_per_dim"].detach()) if "bits_per_dim" in ctx else "",
            "nfe_forward": f, "nfe_backward": b, "lr": ctx["lr"], "seconds": round(seconds, 6),
        }
        row.update(ctx.get("reduced", {}))  # [distributed] losses averaged over ranks
        row.update({k: float(v.detach()) for k, v in ctx.get("terms", {}).items() if k in self.log_columns})
        for h in self.hooks:
            row.update(h.log_values(self, ctx))
        row.update({f"T.{name}": t for name, t in self.model_end_times().items()})
        if self.cfg.train.max_loss_spikes > 0:
            row["skipped_steps"] = self.skipped_steps
        return row

    def fit(self) -> dict[str, Any]:
        """Train to ``train.iterations``, evaluate, write metrics and figures; returns the metrics.

        Holds the run directory's lock (:mod:`fastcnf.training.runlock`) throughout. Ctrl-C,
        SIGTERM and SIGUSR1 finish the current iteration, write the checkpoint and raise
        :class:`TrainingInterrupted`; a checkpoint is also written every ``train.checkpoint_every``
        iterations or ``train.checkpoint_minutes``, whichever comes first
        (:mod:`fastcnf.training.stopping`).
        """
        lock = RunLock(self.out_dir) if self.is_main else None
        refused = None
        if lock is not None:
            try:
                lock.acquire()
            except RunLocked as e:
                refused = str(e)
        if self.dist.enabled:  # [distributed] every rank learns whether rank 0 holds the lock
            refused = ddp.broadcast_object(refused)
        if refused is not None:
            raise RunLocked(refused)
        try:
            return self._fit()
        finally:
            if lock is not None:
                lock.release()

    def _fit(self) -> dict[str, Any]:
        cfg, main = self.cfg, self.is_main  # [distributed] only rank 0 writes files and prints
        if main:
            (self.out_dir / "figures").mkdir(parents=True, exist_ok=True)
            write_atomic(self.out_dir / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
            DataRecord.of(self.bundle).save(self.out_dir)  # shape, columns, standardisation: for score / load_run
        # [solver.gradient] each block's path, planned on the first batch, and the run's first line
        self.gradient_paths = plan_gradients(self) if self.iteration < cfg.train.iterations else {}
        log = RunLog(self.out_dir, self.log_columns, self.iteration, cfg.train.iterations, cfg.train.log_every,
                     self.progress_mode, cfg.recipe or "train", enabled=main)
        for line in [start_line(self, self.gradient_paths), *precision_notes(self.gradient_paths)]:
            log.message(line)
        interrupted, signum = False, 0
        clock = CheckpointClock(cfg.train.checkpoint_minutes)
        signals = StopSignals().install()
        try:
            while self.iteration < cfg.train.iterations and not self.early.stopped:
                t0 = time.perf_counter()
                ctx = self.train_step()
                seconds = time.perf_counter() - t0
                self.iteration += 1
                row = self._row(ctx, seconds)
                if self.early.due(self.iteration, cfg.train.iterations):
                    row["val_nll"] = self.validate()
                    log.message(f"[validation @ {self.iteration}] val_nll={row['val_nll']} (best "
                                f"{self.early.best_nll:.4f} at iteration {self.early.best_iteration})"
                                + (", stopping early" if self.early.stopped else ""))
                log.row(row)
                if cfg.train.eval_every and self.iteration % cfg.train.eval_every == 0 \
                        and self.iteration < cfg.train.iterations:
                    log.flush()
                    capped = None
                    if main:
                        try:
                            with self.ema.applied(self.model):
                                m = self.evaluate()
                            log.message(f"[eval @ {self.iteration}] " + ", ".join(
                                f"{k}={v:.4f}" for k, v in m.items() if isinstance(v, float)))
                        except SolverBudgetExceeded as e:  # a runaway evaluation: save, then stop (every rank)
                            capped = str(e)
                    if self.dist.enabled:
                        capped = ddp.broadcast_object(capped)
                    if capped is not None:
                        self.save()
                        raise SolverBudgetExceeded(capped)
                    ddp.barrier()
                # [distributed] one decision for every rank: a signal on any rank, rank 0's clock
                signum, due = agree(signals.signum, clock.due(), self.dist.enabled, main)
                if signum:
                    break
                if due or (cfg.train.checkpoint_every and self.iteration % cfg.train.checkpoint_every == 0):
                    log.flush()
                    self.save()
                    clock.reset()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            signals.restore()
            log.close()
        self.save()
        if interrupted or signum:
            how = f"stopped by {signal.Signals(signum).name}" if signum else "interrupted"
            raise TrainingInterrupted(
                f"{how} at iteration {self.iteration}; checkpoint written to {self.ckpt_path}; "
                f"continue with: fastcnf train --resume {self.out_dir}", EXIT_CODES.get(signum, 130))
        metrics: dict[str, Any] = {}
        self.ema.copy_to(self.model)  # [train.ema_decay] the average is tested and exported
        self.early.restore_best(self.model)  # [validation] the best weights are tested and exported
        error = None
        if main:
            export_safetensors(self.model, self.out_dir / "model.safetensors")
            try:
                metrics = self.evaluate_and_write()
                if cfg.eval.figures:
                    self.figures()
            except SolverBudgetExceeded as e:  # the weights are saved; metrics.json says what happened
                error = str(e)
                write_metrics(self.out_dir, {**self._summary(), "eval_error": error})
        if self.dist.enabled:
            error = ddp.broadcast_object(error)
        if error is not None:
            raise SolverBudgetExceeded(error)
        ddp.barrier()
        return metrics

    # ------------------------------------------------------------------ outputs
    def evaluate(self) -> dict[str, Any]:
        """The task's test metrics and the hooks' extra entries."""
        with SolveBudget(self.cfg.eval.max_seconds, "evaluation"):  # wall-time cap and progress
            metrics = self.task.evaluate(self.model, self.device, self.dtype)
        for h in self.hooks:
            metrics.update(h.eval_metrics(self))
        return metrics

    def validate(self) -> float | None:
        """The validation NLL of the current weights (recorded in :attr:`early`); every rank computes
        it (same weights, same evaluation noise), so every rank stops at the same iteration."""
        with self.ema.applied(self.model):  # [train.ema_decay] the average is validated (and kept if best)
            with SolveBudget(self.cfg.eval.max_seconds, "validation"):  # wall-time cap and progress
                nll = self.val_task.evaluate(self.model, self.device, self.dtype)["test_nll_nats"]
            self.early.update(nll, self.iteration, self.model)
        return nll

    def _summary(self) -> dict[str, Any]:
        """The entries of metrics.json that need no evaluation."""
        metrics: dict[str, Any] = {"recipe": self.cfg.recipe, "data": self.bundle.name, "split": self.bundle.split}
        metrics.update(training_summary(self.out_dir), iterations=self.iteration, skipped_steps=self.skipped_steps)
        return metrics

    def evaluate_and_write(self) -> dict[str, Any]:
        """Evaluate and write ``metrics.json`` (see the README for its keys)."""
        metrics = self._summary()
        metrics.update(self.evaluate())
        metrics["seed"] = self.cfg.seed
        metrics["end_times"] = self.model_end_times()
        if self.early.enabled:
            metrics.update(self.early.summary())
        # [solver.gradient] the path (and backward precision) of each block's last training solve
        metrics["gradient_paths"] = gradient_paths(self.model)
        metrics.update(large_batch_summary(self.cfg, self.dist.world_size, self.base_lr, self.iteration,
                                           metrics.get("train_seconds") or 0.0))
        return write_metrics(self.out_dir, metrics)

    def figures(self) -> None:
        fig_dir = self.out_dir / "figures"
        fig_dir.mkdir(exist_ok=True)
        training_curves(self.out_dir / "log.csv", fig_dir)
        with SolveBudget(self.cfg.eval.max_seconds, "figures"):
            self.task.figures(self.model, fig_dir, self.device, self.dtype)
        for h in self.hooks:
            h.figures(self, fig_dir)
