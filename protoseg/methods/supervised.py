"""Supervised-only training on the labelled set (the "Supervised Only" rows)."""

from __future__ import annotations

from dataclasses import dataclass

from protoseg.config import MethodConfig
from protoseg.methods.common import MethodBase
from protoseg.methods.protocol import Batch, StepOutput
from protoseg.methods.registry import register_method


@dataclass
class SupervisedConfig(MethodConfig):
    """Supervised training has no hyper-parameters beyond the generic sections."""

    name: str = "supervised"


@register_method("supervised", SupervisedConfig)
class Supervised(MethodBase):
    """Labelled images only; the baseline every semi-supervised method must beat."""

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: int) -> StepOutput:
        """Supervised loss of the student on the labelled batch."""
        return self.supervised_step(labeled)
