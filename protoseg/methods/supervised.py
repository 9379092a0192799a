"""Supervised-only training on the labelled set (the "Supervised Only" rows)."""

from __future__ import annotations

from typing import Any

from protoseg.methods.base import Batch, Method


class Supervised(Method):
    """Labelled images only; the baseline every semi-supervised method must beat."""

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: int) -> dict[str, Any]:
        """Supervised loss of the student on the labelled batch."""
        out = self.student(labeled["image"])
        loss, logs = self.supervised_loss(out, labeled["mask"])
        return {"loss": loss, **logs}
