"""Process-level settings of a run: numeric precision and the seeding of every generator."""

from __future__ import annotations

import logging
import random

import numpy as np
import torch

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
