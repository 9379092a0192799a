"""Converters from other frameworks' checkpoints to protoseg model files.

``mindspore_ckpt`` reads and writes MindSpore ``.ckpt`` files without MindSpore;
``release`` turns the PCR authors' released checkpoints into protoseg model files.
"""

from __future__ import annotations

from protoseg.convert.mindspore_ckpt import (
    MINDSPORE_DTYPES,
    MindSporeCheckpointError,
    read_checkpoint,
    write_checkpoint,
)
from protoseg.convert.release import (
    RELEASES,
    ReleaseConversionError,
    ReleaseModel,
    convert_release,
    main_convert,
    write_model_file,
)

__all__ = [
    "MINDSPORE_DTYPES",
    "RELEASES",
    "MindSporeCheckpointError",
    "ReleaseConversionError",
    "ReleaseModel",
    "convert_release",
    "main_convert",
    "read_checkpoint",
    "write_checkpoint",
    "write_model_file",
]
