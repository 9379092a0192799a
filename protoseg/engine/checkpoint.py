"""Checkpoints: atomic writes, the newest-first listing used by auto-resume, clear load errors."""

from __future__ import annotations

import os
import random
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)\.pt$")
MODEL_FORMAT = "protoseg-model/1"
TRAINING_FORMAT = "protoseg-training/1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not fit the model."""


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write`` on a temporary file in the same folder, fsync, then rename over ``path``.

    A crash mid-write leaves the previous file intact, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save ``obj`` to ``path`` atomically (see ``atomic_write``)."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def load_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a protoseg checkpoint or model file; CheckpointError says what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt files
        raise CheckpointError(
            f"{path}: cannot be read as a checkpoint ({type(exc).__name__}: {exc}). The file is "
            "truncated or not a protoseg checkpoint: delete it to resume from the previous one, "
            "or point --checkpoint at another file"
        ) from None
    if not isinstance(data, dict) or data.get("format") not in (MODEL_FORMAT, TRAINING_FORMAT):
        raise CheckpointError(
            f"{path}: not a protoseg checkpoint (no 'format' entry); "
            "was it written by protoseg train?"
        )
    return data


def checkpoint_dir(out_dir: str | Path) -> Path:
    """Where a run keeps its training checkpoints."""
    return Path(out_dir) / "checkpoints"


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Training checkpoints ``step_<n>.pt`` in a folder, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest training checkpoint in a folder, or None."""
    found = list_checkpoints(folder)
    return found[-1] if found else None


def prune_checkpoints(folder: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` training checkpoints."""
    for old in list_checkpoints(folder)[:-keep_last]:
        old.unlink(missing_ok=True)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def load_state_strict(
    module: torch.nn.Module, state: dict[str, Any], path: str | Path, what: str = "model"
) -> None:
    """load_state_dict that turns key/shape mismatches into a CheckpointError naming the file."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[:4]
        raise CheckpointError(
            f"{path}: the {what} weights do not fit this configuration (different backbone, "
            f"number of classes or method?): {' '.join(first)}"
        ) from None
