"""Converters from other frameworks' checkpoints to protoseg model files.

``mindspore_ckpt`` reads and writes MindSpore ``.ckpt`` files without MindSpore.
"""

from __future__ import annotations

from protoseg.convert.mindspore_ckpt import (
    MINDSPORE_DTYPES,
    MindSporeCheckpointError,
    read_checkpoint,
    write_checkpoint,
)

__all__ = [
    "MINDSPORE_DTYPES",
    "MindSporeCheckpointError",
    "read_checkpoint",
    "write_checkpoint",
]
