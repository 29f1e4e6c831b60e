"""(noise, sample) pairs of a trained flow, written in chunks: progress shown, resumable, and
reproducible from the seed.

Chunk ``i`` draws its labels (class-conditional priors: from the prior's ``p(y)``) and its noise
``z ~ p(z | y)`` from a generator seeded by ``(seed, i)`` alone and decodes ``x = flow^{-1}(z)`` with
the model's evaluation solver (or a fixed-step one), so a rerun that finds chunks on disk continues
with the missing ones and ends with the same pairs as an uninterrupted run. The pairs file
``pairs.npz`` holds ``noise`` (K, latent dim), ``data`` (K, *data shape), ``labels`` (K,) or
(0,) and ``meta`` (a JSON string: teacher, seed, sampler, NFE).

References: Liu et al. 2023, "Flow Straight and Fast: Learning to Generate and Transfer Data with
Rectified Flow", §2.2 (reflow draws (X0, X1) = (Z0, ODE solution from Z0)).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fastcnf.config import ConfigError
from fastcnf.data.base import DataError
from fastcnf.ode.fixed_step import fixed_steps

__all__ = ["generate_pairs", "load_pairs", "PAIRS_FILE"]

PAIRS_FILE = "pairs.npz"
_CHUNK_DIR = "pairs_chunks"


def _chunk_generator(seed: int, index: int) -> torch.Generator:
    # one stream per (seed, chunk): chunks do not depend on which others were drawn before
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))


def _save_npz(path: Path, **arrays) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # a chunk on disk is always complete


@torch.no_grad()
def _draw_chunk(model: nn.Module, n: int, generator: torch.Generator) -> dict[str, np.ndarray]:
    prior = model.prior
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    labels = None
    if getattr(prior, "conditional", False):
        labels = torch.multinomial(prior.label_log_prior.exp().cpu(), n, replacement=True, generator=generator)
    noise = prior.sample(n, labels, generator=generator, device=device, dtype=dtype)
    data = model.decode(noise)
    return {"noise": noise.float().cpu().numpy(), "data": data.float().cpu().numpy(),
            "labels": np.zeros(0, np.int64) if labels is None else labels.numpy().astype(np.int64)}


def generate_pairs(model: nn.Module, n_pairs: int, out_dir: str | Path, seed: int = 0, chunk_size: int = 1000,
                   method: str | None = None, steps: int | None = None, progress: bool = True,
                   meta: dict[str, Any] | None = None) -> Path:
    """Draw ``n_pairs`` (noise, sample) pairs from ``model`` into ``out_dir/pairs.npz``.

    Args:
        model: a :class:`~fastcnf.models.FlowModel` (flow-matching or likelihood-trained), put in
            evaluation mode (its evaluation solver decodes).
        n_pairs: K, the number of pairs.
        out_dir: the new run's directory; chunks go to ``out_dir/pairs_chunks/`` until complete.
        seed: the pairs are a function of ``(model, seed, chunk_size, sampler)``.
        chunk_size: pairs per chunk (the unit of progress and of resumption).
        method, steps: decode with ``steps`` fixed steps of ``method`` (e.g. a teacher's k-step
            Euler endpoint) instead of the evaluation solver.
        progress: show a progress bar over the chunks (tqdm).
        meta: extra entries recorded in the file's ``meta`` (e.g. the teacher run).

    Returns:
        the path of ``pairs.npz``. An existing complete file with the same ``n_pairs`` and seed is
        kept as it is.

    Example:
        >>> import tempfile
        >>> from fastcnf.cnf import CNFBlock, ConcatSquashMLP
        >>> from fastcnf.flows import SequentialFlow
        >>> from fastcnf.models import FlowModel
        >>> model = FlowModel(SequentialFlow([CNFBlock(ConcatSquashMLP(2, (8,)), end_time=1.0)], input_shape=(2,)))
        >>> path = generate_pairs(model, 10, tempfile.mkdtemp(), chunk_size=4, method="euler", steps=2, progress=False)
        >>> load_pairs(path)["data"].shape
        (10, 2)
    """
    if isinstance(n_pairs, bool) or not isinstance(n_pairs, int) or n_pairs < 1:
        raise ConfigError(f"the number of pairs must be a positive integer, got {n_pairs!r}")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size!r}")
    if (method is None) != (steps is None):
        raise ConfigError("give both the fixed-step method and the number of steps, or neither")
    out_dir = Path(out_dir)
    path = out_dir / PAIRS_FILE
    sampler = "evaluation solver" if steps is None else f"{method}, {steps} steps"
    info = {"pairs": n_pairs, "seed": seed, "chunk_size": chunk_size, "sampler": sampler, **(meta or {})}
    if path.exists():
        old = json.loads(str(load_pairs(path)["meta"]))
        if all(old.get(k) == info[k] for k in ("pairs", "seed", "chunk_size", "sampler")):
            return path
        raise DataError(f"{path} holds other pairs ({old.get('pairs')} pairs, seed {old.get('seed')}, "
                        f"{old.get('sampler')}); use another --out")
    chunk_dir = out_dir / _CHUNK_DIR
    chunk_dir.mkdir(parents=True, exist_ok=True)
    (chunk_dir / "info.json").write_text(json.dumps(info))
    n_chunks = -(-n_pairs // chunk_size)
    was_training = model.training
    model.eval()
    bar = tqdm(total=n_pairs, desc="pairs", unit="pair", disable=not progress)
    nfe_sum, drawn, seconds = 0, 0, 0.0
    try:
        for i in range(n_chunks):
            size = min(chunk_size, n_pairs - i * chunk_size)
            file = chunk_dir / f"chunk_{i:05d}.npz"
            if not file.exists():
                start = time.perf_counter()
                pin = fixed_steps(model, method, steps) if steps is not None else contextlib.nullcontext()
                with pin:
                    arrays = _draw_chunk(model, size, _chunk_generator(seed, i))
                seconds += time.perf_counter() - start
                nfe_sum += model.nfe_last()[0]
                drawn += 1
                _save_npz(file, **arrays)
            bar.update(size)
    finally:
        bar.close()
        model.train(was_training)
    parts = [np.load(chunk_dir / f"chunk_{i:05d}.npz") for i in range(n_chunks)]
    info.update(nfe_per_chunk=nfe_sum / drawn if drawn else None, seconds_this_run=round(seconds, 3))
    _save_npz(path, **{k: np.concatenate([p[k] for p in parts]) for k in ("noise", "data", "labels")},
              meta=np.array(json.dumps(info)))
    for i in range(n_chunks):
        (chunk_dir / f"chunk_{i:05d}.npz").unlink()
    (chunk_dir / "info.json").unlink()
    chunk_dir.rmdir()
    return path


def load_pairs(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a pairs file (``noise``, ``data``, ``labels``, ``meta``), checked.

    Raises:
        DataError: a missing or malformed file, one line naming it and the problem.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such pairs file (write one with `fastcnf reflow`)")
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from err
    missing = [k for k in ("noise", "data", "labels", "meta") if k not in arrays]
    if missing:
        raise DataError(f"{path}: missing arrays {', '.join(missing)}")
    k = len(arrays["data"])
    if len(arrays["noise"]) != k or (arrays["labels"].size and len(arrays["labels"]) != k):
        raise DataError(f"{path}: noise ({len(arrays['noise'])}), data ({k}) and labels "
                        f"({len(arrays['labels'])}) differ in length")
    for name in ("noise", "data"):
        if not np.isfinite(arrays[name]).all():
            raise DataError(f"{path}: {name} contains NaN or inf")
    return arrays
