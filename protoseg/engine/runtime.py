"""Process-level settings of a run: numeric precision and the seeding of every generator."""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from protoseg.signals import deferred_interrupts, sigterm_as_interrupt

log = logging.getLogger(__name__)


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a GradScaler is needed) for a device."""
    if precision == "fp32":
        return None, False
    if precision == "bf16":
        return torch.bfloat16, False
    if device.type == "cuda":
        return torch.float16, True
    log.warning("precision=fp16 needs CUDA (a loss scaler); using bf16 autocast on %s", device.type)
    return torch.bfloat16, False


def configure_determinism(seed: int, deterministic: bool) -> None:
    """Seed every generator and choose between reproducible and fast kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


@contextlib.contextmanager
def run_log(path: Path, enabled: bool = True) -> Iterator[None]:
    """Copy protoseg's log records (INFO and above) into ``path`` while the block runs."""
    if not enabled:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    )
    logger = logging.getLogger("protoseg")
    old_level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        # The file gets the INFO lines even when the application logs warnings only.
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        handler.close()


# The trainer's signal handling lives with the low-level writers that also need it.
__all__ = [
    "configure_determinism",
    "deferred_interrupts",
    "resolve_precision",
    "run_log",
    "sigterm_as_interrupt",
]
