"""Training checkpoints: the newest-first listing used by auto-resume, pruning, RNG states.

Checkpoints are plain-data files (see ``protoseg.files``): every state is stored as
tensors, numbers, strings, lists and dicts, so a resume never unpickles code.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from protoseg import __version__
from protoseg.config import Config, recipe_changes, to_dict
from protoseg.engine.state import TrainingState
from protoseg.files import (
    TRAINING_FORMAT,
    CheckpointError,
    load_file,
    load_state_strict,
    refuse_non_finite,
    state_is_finite,
    temp_files,
)
from protoseg.inference import EvalResult
from protoseg.inference.model_file import deployment_index
from protoseg.methods.protocol import SegmentationMethod, as_module

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)\.pt$")


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


def latest_finite_checkpoint(folder: str | Path) -> Path | None:
    """The newest checkpoint whose weights are all finite (read newest first), or None.

    After a divergence the newest checkpoint may already hold NaN weights (the step that
    overflowed had a finite loss); this is the one to name as the last good checkpoint.
    Unreadable files are passed over as not good.
    """
    for path in reversed(list_checkpoints(folder)):
        try:
            data = load_file(path, formats=(TRAINING_FORMAT,))
        except CheckpointError:
            continue
        if state_is_finite(data.get("method") or {}):
            return path
    return None


def prune_checkpoints(folder: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` training checkpoints."""
    for old in list_checkpoints(folder)[:-keep_last]:
        old.unlink(missing_ok=True)


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete temporary files that a killed write left behind; returns what was removed."""
    removed = temp_files(folder)
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states, as plain data."""
    version, mt_state, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": [version, list(mt_state), gauss],
        "numpy": {
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved."""
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    numpy = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]},
            "has_gauss": numpy["has_gauss"],
            "gauss": numpy["gauss"],
        }
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def resume_path(choice: str, out_dir: str | Path) -> Path | None:
    """The checkpoint ``train.resume`` asks for: none, the newest in the run, or a file."""
    if choice in ("", "none", "never"):
        return None
    if choice == "auto":
        return latest_checkpoint(checkpoint_dir(out_dir))
    return Path(choice)


@dataclass
class TrainedParts:
    """The modules and optimiser states a checkpoint holds beside the ``TrainingState``."""

    method: SegmentationMethod
    optimizer: Optimizer
    scheduler: LRScheduler
    scaler: torch.amp.GradScaler


def training_state(
    cfg: Config, state: TrainingState, parts: TrainedParts, world_size: int
) -> dict[str, Any]:
    """Everything a resume needs to continue exactly, as plain data."""
    deployment = parts.method.deploy()
    module = as_module(parts.method)
    return {
        "format": TRAINING_FORMAT,
        "version": __version__,
        "config": to_dict(cfg),
        "step": state.step,
        "method": module.state_dict(),
        "deployment": deployment_index(module, deployment["network"], deployment["heads"]),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict(),
        "rng": rng_state(),
        "best": state.best.to_dict() if state.best else None,
        "best_step": state.best_step,
        "history": state.history,
        "world_size": world_size,
    }


def restore_training_state(
    path: str | Path,
    cfg: Config,
    state: TrainingState,
    parts: TrainedParts,
    device: torch.device,
    world_size: int,
) -> None:
    """Load a checkpoint of the same recipe into ``state`` and ``parts`` (CheckpointError
    otherwise). Checkpoints of earlier versions load: a missing entry keeps its default."""
    data = load_file(path, map_location=device, formats=(TRAINING_FORMAT,))
    changes = recipe_changes(data.get("config") or {}, to_dict(cfg))
    if changes:
        raise CheckpointError(
            f"{path} was written by a different recipe ({'; '.join(changes)}); train "
            "into a new train.out_dir, or point --resume at a checkpoint of this recipe"
        )
    refuse_non_finite(data["method"], path)
    load_state_strict(as_module(parts.method), data["method"], path, "method")
    parts.optimizer.load_state_dict(data["optimizer"])
    parts.scheduler.load_state_dict(data["scheduler"])
    parts.scaler.load_state_dict(data["scaler"])
    state.step = int(data["step"])
    state.history = list(data.get("history") or [])
    state.best_step = int(data.get("best_step", -1))
    if data.get("best"):
        state.best = EvalResult(**data["best"])
    if data.get("world_size", 1) == world_size:
        set_rng_state(data["rng"])
