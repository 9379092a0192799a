"""Training methods: one small class each, chosen by name from a plain registry."""

from __future__ import annotations

from torch import nn

from protoseg.config import Config
from protoseg.methods.base import Method, TeacherStudentMethod, WarmupContext
from protoseg.methods.cutmix_seg import CutMixSeg
from protoseg.methods.mean_teacher import MeanTeacher
from protoseg.methods.pcr import PCR
from protoseg.methods.supervised import Supervised

METHODS: dict[str, type[Method]] = {
    "supervised": Supervised,
    "mean_teacher": MeanTeacher,
    "cutmix_seg": CutMixSeg,
    "pcr": PCR,
}


def create_method(name: str, model: nn.Module, cfg: Config) -> Method:
    """Build the registered method ``name`` around a student model."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[name](model, cfg)


__all__ = [
    "METHODS",
    "Method",
    "TeacherStudentMethod",
    "WarmupContext",
    "CutMixSeg",
    "MeanTeacher",
    "PCR",
    "Supervised",
    "create_method",
]
