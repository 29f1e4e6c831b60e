"""Large-batch and data-parallel training: torchrun / torch.distributed, sharding, LR scaling.

Nguyen et al., "On Mixed Conditional FFJORD with Large-Batch Training" (§3, Figures 5-6) and
"InfoCNF" (Nguyen et al. 2019, §4.5) train with batch 8,000 instead of 900, a learning
rate scaled with the batch (1e-2 instead of 1e-3) and step decay. fastcnf gives that three ways,
which compose and all keep ``train.batch_size`` the *global* batch of one optimiser step:

* **LR scaling** (Goyal et al. 2017): ``lr_eff = lr * g(B / B_ref)`` with ``g`` from
  :data:`LR_SCALING` (``none``, ``linear``: ``g(r) = r``, ``sqrt``: ``g(r) = sqrt(r)``),
  ``B = train.batch_size`` and ``B_ref = train.reference_batch_size``.
* **Gradient accumulation**: each process splits its batch into ``train.accumulation_steps``
  micro-batches and back-propagates ``(n_k / n) * loss_k``; because the loss is a mean,
  ``sum_k (n_k / n) grad loss_k = grad loss`` of the whole batch (exact, up to rounding).
* **Data parallel** under ``torchrun`` (gloo on CPU, nccl on GPU): every process draws the same
  global batch (same seed and data order, like ``DistributedSampler``) and keeps rows
  ``[r*B/W, (r+1)*B/W)``; after the backward pass the gradients of *every* trained tensor (the
  model's and hooks' parameter groups: learned T, tolerance gates ...) are averaged with one
  flattened all-reduce, so the optimiser steps agree; parameters the main optimiser does not
  own (stepped by a hook) and buffers are then broadcast from rank 0. Losses and NFE are
  all-reduced for the log; only rank 0 writes files.

With an adaptive solver each process solves its own shard, so step sizes (and NFE) follow the
shard's error norm, not the global batch's: the standard DDP semantics. With a fixed-step
solver and an exact trace, W processes reproduce one process on the global batch.

References: Nguyen et al., "On Mixed Conditional FFJORD with Large-Batch Training", §3 and
Figures 5-6; Nguyen et al. 2019, "InfoCNF", §4.5; Goyal et al. 2017, "Accurate, Large Minibatch SGD:
Training ImageNet in 1 Hour" (linear scaling, warm-up).
"""
from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from fastcnf.config import Config, ConfigError
from fastcnf.data.batcher import shard_rows

__all__ = [
    "DistContext",
    "LR_SCALING",
    "BACKENDS",
    "init_distributed",
    "teardown",
    "scaled_lr",
    "check_large_batch",
    "shard_rows",
    "sync_after_step",
    "large_batch_summary",
    "split_micro",
    "merge_contexts",
    "sync_gradients",
    "broadcast_tensors",
    "broadcast_object",
    "all_reduce_mean",
    "any_rank",
    "gather_objects",
    "barrier",
    "parameters_agree",
]


# ---------------------------------------------------------------------------------------------
# learning-rate scaling
# ---------------------------------------------------------------------------------------------

#: ``train.lr_scaling`` -> ``g(B / B_ref)``, the factor applied to ``train.lr``
LR_SCALING: dict[str, Callable[[float], float]] = {
    "none": lambda ratio: 1.0,
    "linear": lambda ratio: ratio,
    "sqrt": math.sqrt,
}


def scaled_lr(lr: float, global_batch: int, reference_batch: int, rule: str) -> float:
    """``lr * g(global_batch / reference_batch)`` (Goyal et al. 2017; InfoCNF §4.5: 8000 vs 900).

    ``reference_batch <= 0`` means ``global_batch`` (no scaling).

    Example:
        >>> scaled_lr(1e-3, 8000, 800, "linear")
        0.01
    """
    ref = reference_batch if reference_batch > 0 else global_batch
    return lr * LR_SCALING[rule](global_batch / ref)


# ---------------------------------------------------------------------------------------------
# process group
# ---------------------------------------------------------------------------------------------

#: ``distributed.backend`` -> backend name given the device type
BACKENDS: dict[str, Callable[[str], str]] = {
    "auto": lambda device_type: "nccl" if device_type == "cuda" else "gloo",
    "gloo": lambda device_type: "gloo",
    "nccl": lambda device_type: "nccl",
}


@dataclass
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` (1 and 0 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return default if v in (None, "") else int(v)


def init_distributed(cfg=None) -> DistContext:
    """Join the process group described by torchrun's variables (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); a no-op without them or when the group
    already exists. ``cfg.distributed.backend`` picks the backend (:data:`BACKENDS`)."""
    import torch.distributed as dist

    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", 0)
    if world <= 1 or not dist.is_available():
        return DistContext()
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local, dist.get_backend())
    choice = cfg.distributed.backend if cfg is not None else "auto"
    device_type = torch.device(cfg.device).type if cfg is not None else "cpu"
    backend = BACKENDS[choice](device_type)
    if backend == "nccl" and device_type == "cuda":
        torch.cuda.set_device(local)
    minutes = cfg.distributed.timeout_minutes if cfg is not None else 60
    dist.init_process_group(backend=backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=minutes))
    return DistContext(rank, world, local, backend)


def teardown() -> None:
    """Leave the process group (if any)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device(t: Tensor) -> Tensor:
    """nccl needs CUDA tensors; gloo takes CPU tensors."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        return t.cuda()
    return t


def barrier() -> None:
    import torch.distributed as dist

    if _active():
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# configuration checks, sharding, micro-batches
# ---------------------------------------------------------------------------------------------

def check_large_batch(cfg, world_size: int) -> None:
    """The global batch must split evenly into ``world_size`` shards of ``accumulation_steps``
    micro-batches (otherwise the averaged gradient is not the full-batch gradient)."""
    t = cfg.train
    parts = world_size * t.accumulation_steps
    if t.batch_size % parts:
        raise ConfigError(
            f"train.batch_size={t.batch_size} must be divisible by world_size x train.accumulation_steps "
            f"= {world_size} x {t.accumulation_steps} = {parts} (equal shards give the exact full-batch gradient)")


def split_micro(ctx: dict, steps: int) -> list[tuple[float, dict]]:
    """``steps`` contiguous micro-batch contexts of ``ctx`` with their share ``n_k / n``; every
    other key of ``ctx`` (what ``before_step`` hooks put there) is shared."""
    x, y = ctx["x"], ctx["y"]
    n = x.shape[0]
    out = []
    for xs, idx in zip(torch.tensor_split(x, steps), torch.tensor_split(torch.arange(n), steps)):
        micro = type(ctx)(ctx)
        micro["x"] = xs
        micro["y"] = None if y is None else y[idx[0]:idx[-1] + 1]
        out.append((xs.shape[0] / n, micro))
    return out


def merge_contexts(ctx: dict, micros: list[tuple[float, dict]]) -> None:
    """Fold micro-batch results back into ``ctx``: 0-d float tensors become their share-weighted
    sum (the full-batch mean: loss, nll, bits/dim), per-example tensors are concatenated
    (detached), ``terms`` are merged the same way, anything else takes the last micro-batch's."""
    n = ctx["x"].shape[0]
    keys = [k for k in micros[-1][1] if k not in ("x", "y")]
    for k in keys:
        vals = [m.get(k) for _, m in micros]
        v0 = vals[-1]
        if k == "terms" and isinstance(v0, dict):
            ctx[k] = {tk: sum(w * m["terms"][tk].detach() for w, m in micros) for tk in v0}
        elif isinstance(v0, Tensor) and all(isinstance(v, Tensor) for v in vals):
            if v0.dim() == 0 and v0.is_floating_point():
                ctx[k] = sum(w * v.detach() for (w, _), v in zip(micros, vals))
            elif v0.dim() >= 1 and sum(v.shape[0] for v in vals) == n:
                ctx[k] = torch.cat([v.detach() for v in vals])
            else:
                ctx[k] = v0
        else:
            ctx[k] = v0


# ---------------------------------------------------------------------------------------------
# collectives
# ---------------------------------------------------------------------------------------------

def sync_gradients(params: Iterable[Tensor]) -> None:
    """Average the gradients of ``params`` over all ranks with one flattened all-reduce.

    A tensor without a gradient on some rank counts as zero there (DDP's unused parameters); a
    tensor without a gradient on every rank keeps ``grad = None``, as in one process."""
    if not _active():
        return
    import torch.distributed as dist

    params = [p for p in params if p.requires_grad]
    if not params:
        return
    world = dist.get_world_size()
    ref = params[0]
    flat_parts, flags = [], []
    for p in params:
        g = p.grad
        flags.append(0.0 if g is None else 1.0)
        flat_parts.append(torch.zeros(p.numel(), dtype=torch.float64, device=ref.device) if g is None
                          else g.detach().reshape(-1).to(device=ref.device, dtype=torch.float64))
    flat_parts.append(torch.tensor(flags, dtype=torch.float64, device=ref.device))
    buf = _comm_device(torch.cat(flat_parts))
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    buf = buf.to(ref.device)
    flags_sum = buf[-len(params):]
    offset = 0
    for i, p in enumerate(params):
        n = p.numel()
        if flags_sum[i] > 0:
            g = (buf[offset:offset + n] / world).reshape(p.shape).to(p.dtype)
            if p.grad is None:
                p.grad = g.to(p.device)
            else:
                p.grad.copy_(g)
        offset += n


def broadcast_tensors(tensors: Iterable[Tensor], src: int = 0) -> None:
    """Copy ``tensors`` (parameters, buffers) from rank ``src`` to every rank, in place."""
    if not _active():
        return
    import torch.distributed as dist

    with torch.no_grad():
        for t in tensors:
            c = _comm_device(t.detach().clone())
            dist.broadcast(c, src=src)
            t.copy_(c.to(t.device))


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable objects, e.g. the run directory name)."""
    if not _active():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (e.g. per-rank RNG states for the checkpoint)."""
    if not _active():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Mean over ranks of each number (losses, NFE) with one all-reduce."""
    if not _active():
        return [float(v) for v in values]
    import torch.distributed as dist

    t = _comm_device(torch.tensor([float(v) for v in values], dtype=torch.float64, device=device))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / dist.get_world_size()).tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on some rank (e.g. a non-finite loss), so all
    ranks stop together instead of hanging in the next collective."""
    if not _active():
        return bool(flag)
    import torch.distributed as dist

    t = _comm_device(torch.tensor([1.0 if flag else 0.0], dtype=torch.float64))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def parameters_agree(tensors: Iterable[Tensor], atol: float = 0.0) -> bool:
    """Whether ``tensors`` hold the same values on every rank (max |x - x_rank0| <= atol)."""
    tensors = list(tensors)
    if not _active() or not tensors:
        return True
    import torch.distributed as dist

    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    ref = _comm_device(flat.clone())
    dist.broadcast(ref, src=0)
    diff = _comm_device(torch.tensor([float((flat.to(ref.device) - ref).abs().max())], dtype=torch.float64))
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return bool(diff.item() <= atol)


# ---------------------------------------------------------------------------------------------
# the trainer's per-step synchronisation and summary
# ---------------------------------------------------------------------------------------------

def sync_after_step(cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ctx: dict,
                    nfe: tuple[float, float], synced: list[Tensor], iteration: int, device) -> None:
    """After an optimiser step: rank 0's buffers and hook-stepped parameters everywhere; losses
    and NFE averaged over ranks for the log (``ctx["reduced"]``, ``ctx["nfe"]``); optionally a
    check that all ranks hold the same parameters."""
    if cfg.distributed.broadcast_buffers:
        owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
        broadcast_tensors([p for p in model.parameters() if id(p) not in owned] + list(model.buffers()))
    bpd = ctx.get("bits_per_dim")
    vals = [float(ctx["loss"].detach()), float(ctx["nll"].detach()), float(bpd.detach()) if bpd is not None else 0.0,
            *nfe]
    loss, nll, bpd_m, f, b = all_reduce_mean(vals, device)
    ctx["reduced"] = {"loss": loss, "nll": nll, "bits_per_dim": bpd_m if bpd is not None else ""}
    ctx["nfe"] = (f, b)
    every = cfg.distributed.check_every
    if every and iteration % every == 0 and not parameters_agree(synced + list(model.buffers())):
        raise RuntimeError(f"ranks hold different parameters after iteration {iteration}; "
                           "a hook updates parameters from rank-local values")


def large_batch_summary(cfg: Config, world_size: int, effective_lr: float, iterations: int,
                        train_seconds: float) -> dict[str, Any]:
    """The effective batch / learning-rate values of a run (metrics.json)."""
    t = cfg.train
    return {"world_size": world_size, "global_batch_size": t.batch_size,
            "micro_batch_size": t.batch_size // (world_size * t.accumulation_steps),
            "accumulation_steps": t.accumulation_steps, "lr_scaling": t.lr_scaling,
            "reference_batch_size": t.reference_batch_size or t.batch_size,
            "base_lr": t.lr, "effective_lr": effective_lr,
            "examples_per_second": (t.batch_size * iterations / train_seconds) if train_seconds > 0 else None}
