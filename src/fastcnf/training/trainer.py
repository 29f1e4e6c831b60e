"""The one training loop of fastcnf.

Every method (FFJORD, CCNF/InfoCNF, learned tolerances, TO-FLOW, STEER, RNODE, large batch,
parts, data-parallel, flow matching, LatentODE) trains here: the model and loss come from a task
(:data:`fastcnf.training.features.TASKS`), features plug in as hooks
(:data:`fastcnf.training.features.FEATURES`).

A run directory holds ``config.yaml`` (resolved), ``log.csv`` (one row per iteration),
``metrics.json``, ``checkpoints/last.pt`` (+ ``model.safetensors`` at the end) and ``figures/``.
Resuming from ``checkpoints/last.pt`` continues the run exactly: model, optimiser, RNG states,
data order and iteration are restored, so the final weights equal an uninterrupted run's.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import yaml

from fastcnf.config import Config, config_to_dict, load_run_config
from fastcnf.data import Batcher, check_finite, load_data
from fastcnf.evaluation.plots import training_curves
from fastcnf.training import distributed as ddp
from fastcnf.training.checkpoint import export_safetensors, load_checkpoint, save_checkpoint
from fastcnf.training.features import TASKS, build_hooks
from fastcnf.training.hooks import StepContext
from fastcnf.training.runlog import BASE_LOG_COLUMNS, RunLog, training_summary, write_metrics
from fastcnf.training.schedules import LRSchedule, build_optimizer, set_group_lrs
from fastcnf.cnf.gradient import gradient_paths
from fastcnf.training.startup import plan_gradients, precision_notes, start_line

__all__ = ["Trainer", "TrainingDiverged", "TrainingInterrupted", "BASE_LOG_COLUMNS"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C: a checkpoint was written; ``fastcnf train --resume DIR`` continues."""


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
        >>> metrics = Trainer(load_recipe("toy-ffjord", ["train.iterations=10"]), "runs/toy").fit()
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
        ddp.check_large_batch(cfg, self.dist.world_size)
        self.device = torch.device(cfg.device)
        if self.dist.enabled and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", self.dist.local_rank)
        self.dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
        torch.manual_seed(cfg.seed)
        self.bundle = load_data(cfg.data, cfg.seed)
        for split_name, split in (("training data", self.bundle.train), ("test data", self.bundle.test)):
            check_finite(split.x, f"{split_name} of {self.bundle.name!r}")
        self.task = TASKS[cfg.task](cfg, self.bundle)
        self.model = self.task.build_model().to(self.device, self.dtype)
        self.batcher = Batcher(self.bundle, cfg.train.batch_size, cfg.seed, self.dist.rank, self.dist.world_size,
                               hflip=cfg.data.hflip)
        self.steps_per_epoch = self.batcher.steps_per_epoch
        self.iteration = 0
        self.hooks = build_hooks(cfg)
        for h in self.hooks:
            h.setup(self)
        # [large batch] lr scaled with the global batch (train.lr_scaling, train.reference_batch_size)
        self.base_lr = ddp.scaled_lr(cfg.train.lr, cfg.train.batch_size, cfg.train.reference_batch_size,
                                     cfg.train.lr_scaling)
        self.optimizer = build_optimizer(self.cfg.train, self.model, self.hooks, self)
        # [distributed] every trained tensor (model + hook groups) has its gradient averaged
        seen: set[int] = set()
        self._synced_params = [p for p in [q for g in self.optimizer.param_groups for q in g["params"]]
                               + list(self.model.parameters())
                               if p.requires_grad and not (id(p) in seen or seen.add(id(p)))]
        if self.dist.enabled:
            # same start on every rank, then per-rank noise streams (Hutchinson, dequantisation)
            ddp.broadcast_tensors(self._synced_params + list(self.model.buffers()))
            torch.manual_seed(cfg.seed + 1000003 * self.dist.rank)
        self.schedule = LRSchedule.from_config(cfg.train, self.steps_per_epoch, self.base_lr)
        self.log_columns = list(BASE_LOG_COLUMNS)
        for h in self.hooks:
            self.log_columns += [c for c in h.log_columns(self) if c not in self.log_columns]
        self.log_columns += [f"T.{name}" for name in self.model_end_times()]
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
            "config": config_to_dict(self.cfg),
        }

    def save(self) -> None:
        """Write the checkpoint (rank 0; every rank must call it: RNG states are gathered)."""
        state = self.state_dict()
        if self.is_main:
            save_checkpoint(state, self.ckpt_path)
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
        self.iteration = int(state["iteration"])

    # ------------------------------------------------------------------ the loop
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
        micros = [(1.0, ctx)] if steps == 1 else ddp.split_micro(ctx, steps)
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
                raise TrainingDiverged(
                    f"loss became {float(loss.detach())} at iteration {self.iteration + 1}; the last good checkpoint "
                    f"({self.ckpt_path}) is kept. Lower train.lr, raise the solver tolerances' accuracy, or add "
                    "train.grad_clip")
            if k == 0:
                self.optimizer.zero_grad(set_to_none=True)
            (loss if steps == 1 else loss * share).backward()
            f, b = model.nfe_last() if hasattr(model, "nfe_last") else (0, 0)
            nfe_f, nfe_b = nfe_f + f / steps, nfe_b + b / steps
        if steps > 1:
            ddp.merge_contexts(ctx, micros)
        ctx["nfe"] = (nfe_f, nfe_b) if steps > 1 else (f, b)
        # [distributed] average every trained tensor's gradient over the ranks (no-op in one process)
        ddp.sync_gradients(self._synced_params)
        for h in self.hooks:
            h.after_backward(self, ctx)
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], self.cfg.train.grad_clip)
        self.optimizer.step()
        for h in self.hooks:
            h.after_step(self, ctx)
        ctx["lr"] = lr
        if self.dist.enabled:
            ddp.sync_after_step(self.cfg, model, self.optimizer, ctx, (nfe_f, nfe_b), self._synced_params,
                                self.iteration + 1, self.device)
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
        return row

    def fit(self) -> dict[str, Any]:
        """Train to ``train.iterations``, evaluate, write metrics and figures; returns the metrics."""
        cfg, main = self.cfg, self.is_main  # [distributed] only rank 0 writes files and prints
        if main:
            (self.out_dir / "figures").mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "config.yaml", "w") as fh:
                yaml.safe_dump(config_to_dict(cfg), fh, sort_keys=False)
        # [solver.gradient] each block's path, planned on the first batch, and the run's first line
        self.gradient_paths = plan_gradients(self) if self.iteration < cfg.train.iterations else {}
        log = RunLog(self.out_dir, self.log_columns, self.iteration, cfg.train.iterations, cfg.train.log_every,
                     self.progress_mode, cfg.recipe or "train", enabled=main)
        for line in [start_line(self, self.gradient_paths), *precision_notes(self.gradient_paths)]:
            log.message(line)
        interrupted = False
        try:
            while self.iteration < cfg.train.iterations:
                t0 = time.perf_counter()
                ctx = self.train_step()
                seconds = time.perf_counter() - t0
                self.iteration += 1
                log.row(self._row(ctx, seconds))
                if cfg.train.eval_every and self.iteration % cfg.train.eval_every == 0 \
                        and self.iteration < cfg.train.iterations:
                    log.flush()
                    if main:
                        m = self.evaluate()
                        log.message(f"[eval @ {self.iteration}] " + ", ".join(
                            f"{k}={v:.4f}" for k, v in m.items() if isinstance(v, float)))
                    ddp.barrier()
                if cfg.train.checkpoint_every and self.iteration % cfg.train.checkpoint_every == 0:
                    log.flush()
                    self.save()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            log.close()
        self.save()
        if interrupted:
            raise TrainingInterrupted(
                f"interrupted at iteration {self.iteration}; checkpoint written to {self.ckpt_path}; "
                f"continue with: fastcnf train --resume {self.out_dir}")
        metrics: dict[str, Any] = {}
        if main:
            export_safetensors(self.model, self.out_dir / "model.safetensors")
            metrics = self.evaluate_and_write()
            if cfg.eval.figures:
                self.figures()
        ddp.barrier()
        return metrics

    # ------------------------------------------------------------------ outputs
    def evaluate(self) -> dict[str, Any]:
        """The task's test metrics and the hooks' extra entries."""
        metrics = self.task.evaluate(self.model, self.device, self.dtype)
        for h in self.hooks:
            metrics.update(h.eval_metrics(self))
        return metrics

    def evaluate_and_write(self) -> dict[str, Any]:
        """Evaluate and write ``metrics.json`` (see the README for its keys)."""
        metrics: dict[str, Any] = {"recipe": self.cfg.recipe, "data": self.bundle.name, "split": self.bundle.split}
        metrics.update(training_summary(self.out_dir), iterations=self.iteration)
        metrics.update(self.evaluate())
        metrics["seed"] = self.cfg.seed
        metrics["end_times"] = self.model_end_times()
        # [solver.gradient] the path (and backward precision) of each block's last training solve
        metrics["gradient_paths"] = gradient_paths(self.model)
        metrics.update(ddp.large_batch_summary(self.cfg, self.dist.world_size, self.base_lr, self.iteration,
                                               metrics.get("train_seconds") or 0.0))
        return write_metrics(self.out_dir, metrics)

    def figures(self) -> None:
        fig_dir = self.out_dir / "figures"
        fig_dir.mkdir(exist_ok=True)
        training_curves(self.out_dir / "log.csv", fig_dir)
        self.task.figures(self.model, fig_dir, self.device, self.dtype)
        for h in self.hooks:
            h.figures(self, fig_dir)
