"""Confidence-thresholded pseudo-labels, and the validity mask of unlabelled crops."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def hard_labels(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Argmax labels and their softmax confidences of (B, C, H, W) logits: (B, H, W) each."""
    conf, labels = torch.softmax(logits.float(), dim=1).max(dim=1)
    return labels, conf


def confident(conf: Tensor, threshold: float, valid: Tensor) -> Tensor:
    """Pixels whose confidence reaches ``threshold`` and that are real image, not padding."""
    return (conf >= threshold) & valid


def valid_pixels(batch: dict[str, Any], like: Tensor) -> Tensor:
    """Which pixels of an unlabelled crop are real image (not padding): (B, H, W) bool."""
    if "valid" in batch:
        return batch["valid"].to(like.device).bool()
    return torch.ones(like.shape[0], *like.shape[2:], dtype=torch.bool, device=like.device)


def confident_fraction(keep: Tensor, valid: Tensor) -> Tensor:
    """Share of real pixels that pass the threshold (a logged diagnostic)."""
    return (keep.sum() / valid.sum().clamp(min=1)).detach()


@dataclass
class SelfTrainingSettings:
    """Settings of methods that train on thresholded pseudo-labels of a strong view."""

    confidence_threshold: float = 0.8
    unsup_weight: float = 1.0
    # Strong augmentation of the student's unlabelled view: cutmix | cutout | classmix.
    strong_aug: str = "cutmix"
    mix_prob: float = 0.5

    def check(self) -> None:
        """Raise ValueError naming the key of an invalid value."""
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise ValueError("method.confidence_threshold must lie in [0, 1]")
        check_strong_augmentation(self.strong_aug, self.mix_prob)


def check_strong_augmentation(name: str, mix_prob: float) -> None:
    """ValueError naming ``method.strong_aug`` / ``method.mix_prob`` when either is invalid."""
    from protoseg.components.augment import STRONG_AUGMENTATIONS

    if name not in STRONG_AUGMENTATIONS:
        raise ValueError(
            f"method.strong_aug={name!r}: choose one of {', '.join(STRONG_AUGMENTATIONS)}"
        )
    if not 0.0 <= mix_prob <= 1.0:
        raise ValueError("method.mix_prob must lie in [0, 1]")
