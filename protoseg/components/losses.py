"""Pixel-wise losses: cross-entropy with ignore, OHEM, and confidence-masked CE."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def ohem_cross_entropy(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = 255,
    threshold: float = 0.7,
    min_kept_per_image: int = 50000,
) -> Tensor:
    """CE over the hard pixels: target probability <= max(threshold, the k-th lowest).

    ``k = min_kept_per_image x B`` for (B, H, W) targets (B = 1 otherwise). The release keeps
    at least 100,000 pixels per GPU batch of 2 crops; a floor per image keeps that share of
    pixels however a batch is split over processes and accumulation steps, where a fixed
    floor would keep 8 times fewer per image in one call on all 16 crops. With fewer valid
    pixels than ``k`` every valid pixel is kept, as in the release.
    """
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none").flatten()
    valid = target.flatten() != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    with torch.no_grad():
        # exp(-CE) is the softmax probability of the target class.
        prob = torch.exp(-loss.detach())
        cut = torch.tensor(threshold, device=prob.device, dtype=prob.dtype)
        images = int(target.shape[0]) if target.dim() == 3 else 1
        min_kept = min_kept_per_image * images
        if min_kept > 0:
            valid_prob = prob[valid]
            k = min(int(valid_prob.numel()), min_kept)
            cut = torch.maximum(cut, valid_prob.kthvalue(k).values)
        keep = valid & (prob <= cut)
    return loss[keep].mean()


class SegmentationLoss:
    """The supervised criterion of a config: plain CE or OHEM, both ignoring ``ignore_index``.

    ``ohem_min_kept`` is the OHEM floor per image (``train.ohem_min_kept``).
    """

    def __init__(
        self,
        kind: str = "ce",
        ignore_index: int = 255,
        ohem_threshold: float = 0.7,
        ohem_min_kept: int = 50000,
    ) -> None:
        if kind not in ("ce", "ohem"):
            raise ValueError(f"unknown loss {kind!r}: use ce or ohem")
        self.kind, self.ignore_index = kind, ignore_index
        self.ohem_threshold, self.ohem_min_kept = ohem_threshold, ohem_min_kept

    def __call__(self, logits: Tensor, target: Tensor) -> Tensor:
        """The loss of (B, C, H, W) logits against (B, H, W) targets."""
        logits = logits.float()
        if self.kind == "ohem":
            return ohem_cross_entropy(
                logits, target, self.ignore_index, self.ohem_threshold, self.ohem_min_kept
            )
        if not bool((target != self.ignore_index).any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits, target, ignore_index=self.ignore_index)


def masked_cross_entropy(logits: Tensor, target: Tensor, keep: Tensor, valid: Tensor) -> Tensor:
    """CE summed over ``keep`` pixels, divided by the number of ``valid`` pixels.

    ``keep`` marks confident pseudo-labels; ``valid`` marks real (non-padding) pixels, so a
    batch with few confident pixels gives a small loss rather than a noisy average.
    """
    target = target.clone()
    target[~keep] = 0
    loss = F.cross_entropy(logits.float(), target.long(), reduction="none")
    return (loss * keep).sum() / valid.sum().clamp(min=1)


class SupervisedObjective:
    """The linear head's loss on labelled pixels plus the weighted auxiliary head's, if any."""

    def __init__(self, criterion: SegmentationLoss, aux_weight: float = 0.0) -> None:
        self.criterion, self.aux_weight = criterion, aux_weight

    @classmethod
    def from_train_config(cls, train: Any, ignore_index: int = 255) -> SupervisedObjective:
        """The objective the ``train`` section asks for (``loss``, OHEM settings, aux weight)."""
        criterion = SegmentationLoss(
            train.loss, ignore_index, train.ohem_threshold, train.ohem_min_kept
        )
        return cls(criterion, train.aux_weight)

    def __call__(self, out: dict[str, Tensor], mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss, logged terms) of a network output against (B, H, W) labels."""
        loss = self.criterion(out["logits"], mask)
        logs = {"loss_sup": loss.detach()}
        if "aux" in out and self.aux_weight > 0:
            aux = self.criterion(out["aux"], mask)
            logs["loss_aux"] = aux.detach()
            loss = loss + self.aux_weight * aux
        return loss, logs
