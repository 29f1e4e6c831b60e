"""The pairs as the training data of the one trainer: a hook that hands flow matching each batch's
examples with their paired noise, and the time sampler of distillation.

Every step, :class:`PairsSource` replaces the batch with ``train.batch_size`` pairs of the pairs
file (epochs of a permutation drawn from its own checkpointed generator) and sets ``ctx["noise"]``
(the flow-matching objective then keeps the pairs: no fresh noise, no re-pairing); with
``reflow.grid_steps = k`` also ``ctx["time_sampler"] = GridTime(k)``. The data set's test split
still serves evaluation (test NLL / bits/dim of the student), figures and sample accuracy.

References: Liu et al. 2023, "Flow Straight and Fast: Learning to Generate and Transfer Data with
Rectified Flow", eq. 1 (the rectified-flow objective on a fixed coupling), §2.3 (distillation).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastcnf.config import Config, ConfigError
from fastcnf.data.base import DataError
from fastcnf.method import Hook, StepContext, TrainerView
from fastcnf.reflow.pairs import load_pairs

__all__ = ["GridTime", "PairsSource"]


class GridTime:
    """``t`` uniform on the times a k-step Euler sampler evaluates, ``{1, 1 - 1/k, ..., 1/k}``
    (fastcnf's time: noise at ``t = 1``). With the straight path between a pair (noise, x), the
    target velocity ``noise - x`` at ``t = 1`` makes one Euler step land on ``x``: Liu et al. 2023,
    §2.3, one-step distillation (their ``t = 0``).

    Example:
        >>> sorted(set(GridTime(4)(1000).tolist()))
        [0.25, 0.5, 0.75, 1.0]
    """

    name = "grid"

    def __init__(self, steps: int) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"grid steps must be an integer >= 1, got {steps!r}")
        self.steps = steps

    def __call__(self, batch_size, *, dtype=torch.float32, device=None, generator=None):
        gen_device = generator.device if generator is not None else device
        j = torch.randint(0, self.steps, (batch_size,), generator=generator, device=gen_device)
        return (1.0 - j.to(dtype) / self.steps).to(device)

    def __repr__(self) -> str:
        return f"GridTime({self.steps})"


class PairsSource(Hook):
    """Supplies the pairs of ``reflow.pairs`` as each step's batch (see the module docstring)."""

    name = "reflow"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.path = Path(cfg.reflow.pairs)
        self.gen = torch.Generator().manual_seed(cfg.seed + 2038074743)
        self.perm: Tensor | None = None
        self.pos = 0
        self.time_sampler = GridTime(cfg.reflow.grid_steps) if cfg.reflow.grid_steps else None

    def setup(self, trainer: TrainerView) -> None:
        if not getattr(trainer.task.objective, "trains_on_pairs", False):
            raise ConfigError(f"reflow.pairs trains on the pairs by flow matching, but train.objective="
                              f"{self.cfg.train.objective!r} draws its own noise: set the flow-matching objective")
        arrays = load_pairs(self.path)
        model, bundle = trainer.model, trainer.bundle
        self.data = torch.from_numpy(arrays["data"])
        self.noise = torch.from_numpy(arrays["noise"])
        self.labels = torch.from_numpy(arrays["labels"]) if arrays["labels"].size else None
        if tuple(self.data.shape[1:]) != tuple(bundle.shape):
            raise DataError(f"{self.path}: samples of shape {tuple(self.data.shape[1:])}, but {bundle.name!r} "
                            f"has examples of shape {tuple(bundle.shape)}")
        conditional = getattr(model.prior, "conditional", False)
        if conditional != (self.labels is not None):
            raise DataError(f"{self.path}: {'no ' if conditional else ''}labels, but the model is "
                            f"{'' if conditional else 'not '}class-conditional")
        world = getattr(getattr(trainer, "dist", None), "world_size", 1)
        if self.cfg.train.accumulation_steps > 1 or world > 1:
            # the paired noise is one per example of the whole batch: micro-batches and shards would split x only
            raise ConfigError("reflow.pairs trains in one process without train.accumulation_steps "
                              f"(got {self.cfg.train.accumulation_steps} steps, {world} processes)")
        if self.cfg.train.batch_size > len(self.data):
            raise ConfigError(f"train.batch_size={self.cfg.train.batch_size} exceeds the {len(self.data)} pairs")
        if self.cfg.reflow.teacher:
            self._load_teacher(trainer, Path(self.cfg.reflow.teacher))

    def _load_teacher(self, trainer: TrainerView, path: Path) -> None:
        try:  # safe loading: tensors and plain containers only
            # the weights the teacher's pairs came from: its best validation or averaged weights if it kept them
            teacher = trainer.reported_weights(torch.load(path, map_location=trainer.device, weights_only=True))
        except (OSError, RuntimeError, KeyError, EOFError) as err:
            raise ConfigError(f"reflow.teacher: cannot read the teacher's checkpoint {path} "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'empty'})") from err
        model = trainer.model
        if self.cfg.reflow.init:
            try:
                model.load_state_dict(teacher)
            except RuntimeError as err:
                raise ConfigError(f"reflow.init: the teacher {path} has another architecture than the student "
                                  f"({str(err).splitlines()[0]}); set reflow.init=false to train a fresh "
                                  "network") from err
            return
        # a fresh network, the teacher's source distribution (e.g. its class-conditional means)
        prior = {k[len("prior."):]: v for k, v in teacher.items() if k.startswith("prior.")}
        try:
            model.prior.load_state_dict(prior)
        except RuntimeError as err:
            raise ConfigError(f"the teacher {path} has another prior than the student: "
                              f"{str(err).splitlines()[0]}") from err

    def _indices(self, b: int) -> Tensor:
        n = len(self.data)
        if self.perm is None or self.pos + b > n:
            self.perm = torch.randperm(n, generator=self.gen)
            self.pos = 0
        idx = self.perm[self.pos:self.pos + b]
        self.pos += b
        return idx

    def before_step(self, trainer: TrainerView, ctx: StepContext) -> None:
        idx = self._indices(ctx["x"].shape[0])
        ctx["x"] = self.data[idx].to(trainer.device, trainer.dtype)
        ctx["y"] = None if self.labels is None else self.labels[idx].to(trainer.device)
        ctx["noise"] = self.noise[idx].to(trainer.device, trainer.dtype)
        if self.time_sampler is not None:
            ctx["time_sampler"] = self.time_sampler

    def eval_metrics(self, trainer: TrainerView) -> dict[str, Any]:
        return {"reflow": {"pairs_file": str(self.path), "pairs": len(self.data), "teacher": self.cfg.reflow.teacher,
                           "grid_steps": self.cfg.reflow.grid_steps}}

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "perm": self.perm, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.gen.set_state(state["gen"])
            self.perm, self.pos = state["perm"], int(state["pos"])

