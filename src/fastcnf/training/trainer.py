"""The one training loop of fastcnf.

Every method (FFJORD, CCNF/InfoCNF, learned tolerances, TO-FLOW, STEER, RNODE, large batch,
parts, data-parallel) trains here: the model and loss come from a task, features plug in as
:class:`~fastcnf.training.hooks.Hook` objects built from the configuration.

A run directory holds ``config.yaml`` (resolved), ``log.csv`` (one row per iteration),
``metrics.json``, ``checkpoints/last.pt`` (+ ``model.safetensors`` at the end) and ``figures/``.
Resuming from ``checkpoints/last.pt`` continues the run exactly: model, optimiser, RNG states,
data order and iteration are restored, so the final weights equal an uninterrupted run's.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from fastcnf.config import Config, config_from_dict, config_to_dict
from fastcnf.data.base import check_finite
from fastcnf.data.registry import load_data
from fastcnf.training.checkpoint import export_safetensors, load_checkpoint, save_checkpoint
from fastcnf.training import features  # noqa: F401  (registers the feature hooks)
from fastcnf.training import distributed as ddp
from fastcnf.training.hooks import HOOK_BUILDERS, Hook, StepContext
from fastcnf.training.schedules import LRSchedule
from fastcnf.training.tasks import make_task

__all__ = ["Trainer", "TrainingDiverged", "TrainingInterrupted", "BASE_LOG_COLUMNS"]

#: log.csv columns every run has (hooks and end times add theirs after these)
BASE_LOG_COLUMNS = ["iteration", "loss", "nll", "bits_per_dim", "nfe_forward", "nfe_backward", "lr", "seconds"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C: a checkpoint was written; ``fastcnf train --resume DIR`` continues."""


class Batcher:
    """Mini-batches: fresh draws from a sampler (toy sets, as FFJORD) or epochs of a fixed
    permutation of the training split. Its whole state is checkpointed."""

    def __init__(self, bundle, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.bundle = bundle
        self.batch_size = batch_size
        # [distributed] every rank draws the same global batch (same seeds) and keeps its rows
        self.rank, self.world_size = rank, world_size
        self.rng = np.random.default_rng(seed + 7919)
        self.gen = torch.Generator().manual_seed(seed + 104729)
        self.perm: torch.Tensor | None = None
        self.pos = 0
        self.epoch = 0
        n = len(bundle.train)
        # [large batch] next() drops an epoch's last partial batch, so an epoch is n // batch_size
        # steps (ceil overstated it by up to one step: 17% at 50000 / 8000, shifting epoch decays)
        self.steps_per_epoch = max(1, n // batch_size) if n else 1

    def next(self):
        """This rank's shard of the next global batch (the whole batch in one process)."""
        return ddp.shard_rows(*self._next_global(), self.rank, self.world_size)

    def _next_global(self):
        b = self.bundle
        if b.sampler is not None:
            return b.sampler(self.batch_size, self.rng)
        n = len(b.train)
        if self.batch_size > n:
            raise ValueError(f"train.batch_size={self.batch_size} exceeds the {n} training examples")
        if self.perm is None or self.pos + self.batch_size > n:
            if self.perm is not None:
                self.epoch += 1
            self.perm = torch.randperm(n, generator=self.gen)
            self.pos = 0
        idx = self.perm[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return b.train.x[idx], (None if b.train.y is None else b.train.y[idx])

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "gen": self.gen.get_state(),
                "perm": self.perm, "pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, s: dict) -> None:
        self.rng.bit_generator.state = s["rng"]
        self.gen.set_state(s["gen"])
        self.perm, self.pos, self.epoch = s["perm"], int(s["pos"]), int(s["epoch"])


def _set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


class Trainer:
    """Train ``cfg`` into ``out_dir``.

    Args:
        cfg: the resolved configuration.
        out_dir: the run directory (created).
        resume: continue from ``out_dir/checkpoints/last.pt``.
        quiet: plain log lines instead of a progress bar.
        progress: show a progress bar at all (False in tests).

    Example:
        >>> from fastcnf.config import load_recipe
        >>> cfg = load_recipe("toy-ffjord", ["train.iterations=10"])
        >>> metrics = Trainer(cfg, "runs/toy").fit()
    """

    def __init__(self, cfg: Config, out_dir: str | Path, resume: bool = False, quiet: bool = False,
                 progress: bool = True) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.quiet = quiet
        self.progress = progress and not quiet
        self.ckpt_path = self.out_dir / "checkpoints" / "last.pt"
        _set_threads(cfg.threads)
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
        self.task = make_task(cfg, self.bundle)
        self.model = self.task.build_model().to(self.device, self.dtype)
        self.batcher = Batcher(self.bundle, cfg.train.batch_size, cfg.seed, self.dist.rank, self.dist.world_size)
        self.iteration = 0
        self.hooks: list[Hook] = []
        for build in HOOK_BUILDERS:
            hook = build(cfg, self)
            if hook is not None:
                self.hooks.append(hook)
        for h in self.hooks:
            h.setup(self)
        # [large batch] lr scaled with the global batch (train.lr_scaling, train.reference_batch_size)
        self.base_lr = ddp.scaled_lr(cfg.train.lr, cfg.train.batch_size, cfg.train.reference_batch_size,
                                     cfg.train.lr_scaling)
        self.optimizer = self._build_optimizer()
        # [distributed] every trained tensor (model + hook groups) has its gradient averaged
        seen: set[int] = set()
        self._synced_params = [p for p in [q for g in self.optimizer.param_groups for q in g["params"]]
                               + list(self.model.parameters())
                               if p.requires_grad and not (id(p) in seen or seen.add(id(p)))]
        if self.dist.enabled:
            # same start on every rank, then per-rank noise streams (Hutchinson, dequantisation)
            ddp.broadcast_tensors(self._synced_params + list(self.model.buffers()))
            torch.manual_seed(cfg.seed + 1000003 * self.dist.rank)
        self.schedule = LRSchedule.from_config(cfg.train, self.batcher.steps_per_epoch, self.base_lr)
        self.log_columns = self._log_columns()
        if resume:
            self._resume()

    # ------------------------------------------------------------------ setup
    def _build_optimizer(self) -> torch.optim.Optimizer:
        excluded = {id(p) for h in self.hooks for p in h.excluded_parameters(self)}
        params = [p for p in self.model.parameters() if p.requires_grad and id(p) not in excluded]
        groups = [{"params": params, "name": "model"}]
        for h in self.hooks:
            groups.extend(h.param_groups(self))
        t = self.cfg.train
        cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
        opt = cls(groups, lr=t.lr, weight_decay=t.weight_decay)
        for g in opt.param_groups:
            g.setdefault("lr_scale", 1.0)
            g.setdefault("follow_schedule", g.get("name") == "model")
            g["initial_lr_group"] = g["lr"]
        return opt

    def _log_columns(self) -> list[str]:
        cols = list(BASE_LOG_COLUMNS)
        for h in self.hooks:
            cols += [c for c in h.log_columns(self) if c not in cols]
        cols += [f"T.{name}" for name in self.model_end_times()]
        return cols

    @property
    def is_main(self) -> bool:
        """Rank 0 (or the only process): the one that prints and writes files."""
        return self.dist.is_main

    def model_end_times(self) -> dict[str, float]:
        m = self.model
        return m.end_times() if hasattr(m, "end_times") else {}

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
        if self.is_main:
            self._truncate_log(self.iteration)

    def _truncate_log(self, iteration: int) -> None:
        """Drop log rows written after the checkpoint (they will be redone)."""
        path = self.out_dir / "log.csv"
        if not path.exists():
            return
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
        if not rows:
            return
        keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= iteration]
        with open(path, "w", newline="") as fh:
            csv.writer(fh).writerows(keep)

    # ------------------------------------------------------------------ the loop
    def set_lr(self) -> float:
        """Set every group's rate for this iteration. The model's group (and hook groups with
        ``follow_schedule``) follow the schedule times their ``lr_scale``; other hook groups keep
        the rate they were created with (e.g. TO-FLOW's own Adam rate for T)."""
        lr = self.schedule(self.iteration)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"] if g["follow_schedule"] else g["initial_lr_group"]
        return lr

    def train_step(self) -> StepContext:
        """One optimiser step; returns the step's context (loss, NFE, hook values)."""
        model = self.model
        model.train()
        x, y = self.batcher.next()
        x, y = self.task.prepare(x, y)
        x = x.to(self.device, self.dtype)
        y = None if y is None else y.to(self.device)
        ctx = StepContext(x=x, y=y, iteration=self.iteration)
        lr = self.set_lr()
        for h in self.hooks:
            h.before_step(self, ctx)
        # [large batch] train.accumulation_steps micro-batches: forward, loss terms and backward
        # of each, its loss scaled by its share n_k/n, so the gradients sum to the full batch's
        steps = self.cfg.train.accumulation_steps
        micros = [(1.0, ctx)] if steps == 1 else ddp.split_micro(ctx, steps)
        nfe_f = nfe_b = 0.0
        for k, (share, mctx) in enumerate(micros):
            self.task.step(model, mctx)
            loss = mctx["loss"]
            terms: dict[str, torch.Tensor] = {}
            for h in self.hooks:
                terms.update(h.loss_terms(self, mctx))
            if hasattr(model, "regularization_loss"):
                reg = model.regularization_loss()
                if isinstance(reg, torch.Tensor):
                    terms["regularization"] = reg
            for v in terms.values():
                loss = loss + v
            mctx["loss"] = loss
            mctx["terms"] = terms
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
            ctx["nfe"] = (nfe_f, nfe_b)
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
            self._sync_after_step(ctx, nfe_f, nfe_b)
        return ctx

    def _sync_after_step(self, ctx: StepContext, nfe_f: float, nfe_b: float) -> None:
        """[distributed] rank 0's buffers and hook-stepped parameters everywhere; losses and NFE
        averaged over ranks for the log; optional check that all ranks agree."""
        dcfg = self.cfg.distributed
        if dcfg.broadcast_buffers:
            owned = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
            ddp.broadcast_tensors([p for p in self.model.parameters() if id(p) not in owned]
                                  + list(self.model.buffers()))
        bpd = ctx.get("bits_per_dim")
        vals = [float(ctx["loss"].detach()), float(ctx["nll"].detach()),
                float(bpd.detach()) if bpd is not None else 0.0, nfe_f, nfe_b]
        loss, nll, bpd_m, f, b = ddp.all_reduce_mean(vals, self.device)
        ctx["reduced"] = {"loss": loss, "nll": nll, "bits_per_dim": bpd_m if bpd is not None else ""}
        ctx["nfe"] = (f, b)
        if dcfg.check_every and (self.iteration + 1) % dcfg.check_every == 0:
            if not ddp.parameters_agree(self._synced_params + list(self.model.buffers())):
                raise RuntimeError(f"ranks hold different parameters after iteration {self.iteration + 1}; "
                                   "a hook updates parameters from rank-local values")

    def _row(self, ctx: StepContext, seconds: float) -> dict[str, Any]:
        f, b = self.model.nfe_last() if hasattr(self.model, "nfe_last") else (0, 0)
        f, b = ctx.get("nfe", (f, b))  # [large batch] mean over micro-batches and ranks
        row: dict[str, Any] = {
            "iteration": self.iteration,
            "loss": float(ctx["loss"].detach()),
            "nll": float(ctx["nll"].detach()),
            "bits_per_dim": float(ctx["bits_per_dim"].detach()) if "bits_per_dim" in ctx else "",
            "nfe_forward": f,
            "nfe_backward": b,
            "lr": ctx["lr"],
            "seconds": round(seconds, 6),
        }
        row.update(ctx.get("reduced", {}))  # [distributed] losses averaged over ranks
        for k, v in ctx.get("terms", {}).items():
            if k in self.log_columns:
                row[k] = float(v.detach())
        for h in self.hooks:
            row.update(h.log_values(self, ctx))
        for name, t in self.model_end_times().items():
            row[f"T.{name}"] = t
        return row

    def fit(self) -> dict[str, Any]:
        """Train to ``train.iterations``, evaluate, write metrics and figures; returns the metrics."""
        cfg = self.cfg
        main = self.is_main  # [distributed] only rank 0 writes files and prints
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "figures").mkdir(exist_ok=True)
            with open(self.out_dir / "config.yaml", "w") as fh:
                yaml.safe_dump(config_to_dict(cfg), fh, sort_keys=False)
        log_path = self.out_dir / "log.csv"
        new_log = not log_path.exists() or self.iteration == 0
        log_fh = open(log_path if main else os.devnull, "w" if new_log else "a", newline="")
        writer = csv.DictWriter(log_fh, fieldnames=self.log_columns, extrasaction="ignore")
        if new_log:
            writer.writeheader()
        bar = None
        if self.progress and main:
            from tqdm import tqdm

            bar = tqdm(total=cfg.train.iterations, initial=self.iteration, desc=cfg.recipe or "train",
                       dynamic_ncols=True, file=sys.stderr)
        interrupted = False
        try:
            while self.iteration < cfg.train.iterations:
                t0 = time.perf_counter()
                ctx = self.train_step()
                seconds = time.perf_counter() - t0
                self.iteration += 1
                row = self._row(ctx, seconds)
                writer.writerow(row)
                if bar is not None:
                    bar.update(1)
                    if self.iteration % cfg.train.log_every == 0 or self.iteration == cfg.train.iterations:
                        post = {"loss": f"{row['loss']:.4f}", "nfe": f"{row['nfe_forward']}/{row['nfe_backward']}"}
                        if row["bits_per_dim"] != "":
                            post["bpd"] = f"{row['bits_per_dim']:.4f}"
                        bar.set_postfix(post, refresh=False)
                elif self.quiet and main and (self.iteration % max(cfg.train.log_every, 1) == 0):
                    print(f"iter {self.iteration}/{cfg.train.iterations} loss {row['loss']:.4f} "
                          f"nfe {row['nfe_forward']}/{row['nfe_backward']} lr {row['lr']:.3g} "
                          f"{1.0 / max(seconds, 1e-9):.2f} it/s", flush=True)
                if cfg.train.eval_every and self.iteration % cfg.train.eval_every == 0 \
                        and self.iteration < cfg.train.iterations:
                    log_fh.flush()
                    if main:
                        m = self.task.evaluate(self, self.hooks)
                        self._print(f"[eval @ {self.iteration}] " + ", ".join(
                            f"{k}={v:.4f}" for k, v in m.items() if isinstance(v, float)))
                    ddp.barrier()
                if cfg.train.checkpoint_every and self.iteration % cfg.train.checkpoint_every == 0:
                    log_fh.flush()
                    self.save()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if bar is not None:
                bar.close()
            log_fh.close()
        if interrupted:
            self.save()
            raise TrainingInterrupted(
                f"interrupted at iteration {self.iteration}; checkpoint written to {self.ckpt_path}; "
                f"continue with: fastcnf train --resume {self.out_dir}")
        self.save()
        metrics: dict[str, Any] = {}
        if main:
            export_safetensors(self.model, self.out_dir / "model.safetensors")
            metrics = self.evaluate_and_write()
            if self.cfg.eval.figures:
                self.figures()
        ddp.barrier()
        return metrics

    def _print(self, msg: str) -> None:
        if self.progress:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)
        else:
            print(msg, flush=True)

    # ------------------------------------------------------------------ outputs
    def training_summary(self) -> dict[str, Any]:
        """NFE means and training time from log.csv (survives resumes)."""
        path = self.out_dir / "log.csv"
        f = b = secs = 0.0
        n = 0
        if path.exists():
            with open(path, newline="") as fh:
                for r in csv.DictReader(fh):
                    f += float(r["nfe_forward"])
                    b += float(r["nfe_backward"])
                    secs += float(r["seconds"])
                    n += 1
        return {"nfe_forward_mean": f / max(n, 1), "nfe_backward_mean": b / max(n, 1),
                "train_seconds": secs, "iterations": self.iteration}

    def large_batch_summary(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """[large batch] the effective batch / learning-rate values of this run."""
        t = self.cfg.train
        world = self.dist.world_size
        secs = metrics.get("train_seconds") or 0.0
        return {"world_size": world, "global_batch_size": t.batch_size,
                "micro_batch_size": t.batch_size // (world * t.accumulation_steps),
                "accumulation_steps": t.accumulation_steps, "lr_scaling": t.lr_scaling,
                "reference_batch_size": t.reference_batch_size or t.batch_size,
                "base_lr": t.lr, "effective_lr": self.base_lr,
                "examples_per_second": (t.batch_size * self.iteration / secs) if secs > 0 else None}

    def evaluate_and_write(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        metrics: dict[str, Any] = {"recipe": self.cfg.recipe, "data": self.bundle.name, "split": self.bundle.split}
        metrics.update(self.training_summary())
        metrics.update(self.task.evaluate(self, self.hooks))
        metrics["seed"] = self.cfg.seed
        metrics["end_times"] = self.model_end_times()
        metrics.update(self.large_batch_summary(metrics))
        if extra:
            metrics.update(extra)
        tmp = self.out_dir / "metrics.json.tmp"
        with open(tmp, "w") as fh:
            json.dump(metrics, fh, indent=2)
        os.replace(tmp, self.out_dir / "metrics.json")
        return metrics

    def figures(self) -> None:
        fig_dir = self.out_dir / "figures"
        fig_dir.mkdir(exist_ok=True)
        from fastcnf.evaluation import plots

        plots.training_curves(self.out_dir / "log.csv", fig_dir)
        self.task.figures(self, fig_dir)
        for h in self.hooks:
            h.figures(self, fig_dir)

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, overrides: list[str] | None = None, **kwargs) -> "Trainer":
        """A trainer for an existing run directory (its config.yaml plus overrides)."""
        from fastcnf.config import apply_overrides

        run_dir = Path(run_dir)
        path = run_dir / "config.yaml"
        if not path.exists():
            raise FileNotFoundError(f"{run_dir} is not a fastcnf run directory (no config.yaml)")
        with open(path) as fh:
            values = yaml.safe_load(fh) or {}
        apply_overrides(values, list(overrides or []))
        return cls(config_from_dict(values), run_dir, **kwargs)
