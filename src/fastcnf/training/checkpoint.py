"""Checkpoints: written atomically, loaded safely.

A checkpoint is one file written with ``torch.save`` to a temporary file in the same folder,
flushed to disk and renamed over the previous one (``os.replace`` is atomic), so an interrupted
write leaves the previous checkpoint intact. It is loaded with ``torch.load(weights_only=True)``:
tensors, numbers, strings, lists and dicts only — no arbitrary pickle is executed. Final weights
are also exported as ``model.safetensors`` for other tools.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "export_safetensors", "write_atomic"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or not a fastcnf checkpoint."""


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``: a reader (``fastcnf
    eval``, ``sample``, ``score`` while a run trains) sees the old file or the new one, never half of one."""
    raw = data.encode() if isinstance(data, str) else data
    _atomic_write(Path(path), lambda fh: fh.write(raw))


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) atomically to ``path``."""
    state = dict(state, format="fastcnf-checkpoint-v1")
    _atomic_write(Path(path), lambda fh: torch.save(state, fh))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only``: no pickle code runs)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad magic, forbidden global ...
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("format") != "fastcnf-checkpoint-v1":
        raise CheckpointError(f"{path} is not a fastcnf checkpoint")
    return state


def export_safetensors(model: torch.nn.Module, path: str | Path) -> None:
    """Model weights as safetensors (contiguous copies; shared tensors saved once each)."""
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    _atomic_write(Path(path), lambda fh: fh.write(safetensors_bytes(tensors)))

