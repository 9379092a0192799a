"""The training state and the events the loop sends to its callbacks (typed records).

``TrainingState`` is what the loop itself accumulates (step, best result, history); a
checkpoint saves and restores it together with the method, optimiser, schedule and scaler.
Callbacks receive a ``RunContext`` once (what they may read and the few actions they may
take) and then one event record per step, evaluation and end; they never see the Trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from protoseg.config import Config
from protoseg.inference import EvalResult


@dataclass
class TrainingState:
    """What the loop accumulates and a resume restores, besides the trained modules."""

    step: int = 0
    best: EvalResult | None = None
    best_step: int = -1
    # One entry per logging step (running means) and per periodic evaluation.
    history: list[dict[str, float]] = field(default_factory=list)

    def is_new_best(self, results: dict[str, EvalResult]) -> bool:
        """Record the primary head's result if it beats the best so far; True if it does."""
        current = next(iter(results.values()))
        if self.best is None or current.miou > self.best.miou:
            self.best, self.best_step = current, self.step
            return True
        return False


@dataclass(frozen=True)
class RunContext:
    """What a callback may use, handed over once when training starts.

    ``evaluate(desc)`` evaluates (every rank takes part); ``model_file()`` gives the deployed
    model file's contents; ``save_checkpoint()`` writes one (rank 0); ``lr()`` reads the
    current learning rate; ``set_train_mode()`` puts the method back in training mode.
    """

    cfg: Config
    out_dir: Path
    is_main: bool
    device: torch.device
    total_steps: int
    state: TrainingState
    # TensorBoard's SummaryWriter on rank 0, None elsewhere.
    writer: Any
    evaluate: Callable[[str], dict[str, EvalResult]]
    model_file: Callable[[], dict[str, Any]]
    save_checkpoint: Callable[[], None]
    lr: Callable[[], float]
    set_train_mode: Callable[[], None]


@dataclass(frozen=True)
class StepEnd:
    """After an optimiser step; ``step`` already counts it. ``logs``: its mean loss terms."""

    step: int
    logs: dict[str, float]


@dataclass(frozen=True)
class TrainEnd:
    """After the last step of this call, finished or stopped early."""

    step: int
    finished: bool


@dataclass(frozen=True)
class FinalEvaluation:
    """The final evaluation of every evaluated head, after the best model was updated."""

    step: int
    results: dict[str, EvalResult]
