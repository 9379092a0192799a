"""Weak-to-strong self-training (FixMatch, UniMatch): CutMix boxes, the strong view, settings.

The strong view of an unlabelled image is its weak view with photometric augmentation
(``PhotometricAugment``) and, inside a CutMix box, the strong pixels of its partner image
together with the partner's pseudo-labels, confidences and validity. UniMatch mixes with
a second unlabelled batch; here the partner of image i is another image of the same
batch (``mix_partner``: (i + 1) mod B, or B - 1 - i as UniMatch V2 does), as in
``augment.paste_from_partner``, which saves loading and predicting a second batch.
Randomness comes from torch's global generator, which checkpoints restore.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from protoseg.components.augment import (
    PARTNERS,
    MixOutput,
    half_area_boxes,
    partner_of,
    paste_from_partner,
)
from protoseg.components.pseudo_label import hard_labels
from protoseg.config import WarmupSettings

# Give up on a box after this many placements that do not fit (then the image keeps no
# box); on a square crop UniMatch's box fits within a few dozen tries.
MAX_BOX_TRIES = 1000


def _uniform(low: float, high: float) -> float:
    """One draw from U(low, high) of torch's global generator."""
    return low + (high - low) * float(torch.rand(()))


def random_area_boxes(
    batch: int,
    height: int,
    width: int,
    device: torch.device,
    area: tuple[float, float] = (0.02, 0.4),
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> Tensor:
    """UniMatch's CutMix box for every image: boolean (B, H, W).

    The area is a fraction U(``area``) of the image, the ratio height/width U(``aspect``)
    and the top-left corner uniform over the image; the ratio and the corner are redrawn
    until the box lies inside the image (UniMatch's ``obtain_cutmix_box``, which also
    truncates the sides to whole pixels). An image where no placement fits in
    ``MAX_BOX_TRIES`` (only very elongated ones) gets no box, where UniMatch would loop on.
    """
    masks = torch.zeros(batch, height, width, dtype=torch.bool, device=device)
    for i in range(batch):
        size = _uniform(*area) * height * width
        for _ in range(MAX_BOX_TRIES):
            ratio = _uniform(*aspect)
            box_w, box_h = int(math.sqrt(size / ratio)), int(math.sqrt(size * ratio))
            x0 = int(torch.randint(0, width, ()).item())
            y0 = int(torch.randint(0, height, ()).item())
            if x0 + box_w <= width and y0 + box_h <= height:
                masks[i, y0 : y0 + box_h, x0 : x0 + box_w] = True
                break
    return masks


# Box shapes: "random_area" is UniMatch's (FixMatch and UniMatch as released by UniMatch);
# "half_area" is the PCR release's CutMix box.
BOX_SHAPES: dict[str, Callable[[int, int, int, torch.device], Tensor]] = {
    "random_area": random_area_boxes,
    "half_area": half_area_boxes,
}


def cutmix_boxes(
    shape: str, prob: float, batch: int, height: int, width: int, device: torch.device
) -> Tensor:
    """Per image, with probability ``prob``, one box of ``shape``; else none: (B, H, W) bool."""
    if shape not in BOX_SHAPES:
        raise ValueError(f"unknown CutMix box shape {shape!r}: {sorted(BOX_SHAPES)}")
    # Each image draws for itself, as UniMatch's loader does per sample (the PCR release
    # mixes all images of a batch or none).
    chosen = torch.rand(batch) < prob
    boxes = torch.zeros(batch, height, width, dtype=torch.bool, device=device)
    if bool(chosen.any()):
        boxes[chosen.to(device)] = BOX_SHAPES[shape](int(chosen.sum()), height, width, device)
    return boxes


def strong_view(
    photometric: Callable[[Tensor, Tensor], Tensor],
    boxes: Tensor,
    images: Tensor,
    labels: Tensor,
    conf: Tensor,
    valid: Tensor,
    partner_labels: tuple[Tensor, Tensor] | None = None,
    partner: str = "next",
) -> MixOutput:
    """Photometric augmentation of the weak view, then CutMix with the partner image.

    Inside image i's box, its pixels, pseudo-labels, confidences and validity become those
    of its ``partner`` (``augment.PARTNERS``: image (i + 1) mod B, or B - 1 - i as in
    UniMatch V2, its ``unimatch_v2.py`` lines 175-176); the pasted pixels are the
    partner's own strong view of this draw, as UniMatch pastes the strong view of its
    mixing batch. ``partner_labels`` gives other (labels, confidences) of the batch to
    paste from (UniMatch's eval-mode prediction of its mixing batch, ``partner_labels:
    eval_pass``); by default the pasted ones are ``labels``/``conf``.
    """
    strong = photometric(images, valid)
    if partner_labels is None:
        mixed = paste_from_partner(boxes, strong, labels, conf, valid, partner=partner)
        return mixed  # type: ignore[return-value]
    x_s, valid_s = paste_from_partner(boxes, strong, valid, partner=partner)
    pasted_labels, pasted_conf = (partner_of(t, partner) for t in partner_labels)
    y_s = torch.where(boxes, pasted_labels, labels)
    conf_s = torch.where(boxes, pasted_conf, conf)
    return x_s, y_s, conf_s, valid_s


# Where the pseudo-labels pasted inside a CutMix box come from: "shared_pass", the
# student's train-mode pass that also labels the image itself; "eval_pass", an eval-mode
# pass of the student over the batch, as UniMatch predicts its mixing batch
# (fixmatch.py lines 132-137, unimatch.py 135-140).
PARTNER_LABELS = ("shared_pass", "eval_pass")


@torch.no_grad()
def eval_pass_labels(
    student: torch.nn.Module, forward: Callable[[Tensor], dict[str, Tensor]], images: Tensor
) -> tuple[Tensor, Tensor]:
    """Hard labels and confidences of ``forward(images)`` with ``student`` in eval mode
    (``forward`` runs it, possibly through a wrapper); the student's mode is restored."""
    was_training = student.training
    student.eval()
    try:
        logits = forward(images)["logits"]
    finally:
        student.train(was_training)
    return hard_labels(logits)


@dataclass
class WeakToStrongSettings(WarmupSettings):
    """Settings of weak-to-strong self-training; the defaults are UniMatch's VOC recipe."""

    # Supervised-only steps first, in epochs (UniMatch trains on unlabelled images at once).
    warmup_epochs: float = 0.0
    # tau: weak-view confidence a pseudo-label needs (UniMatch: 0.95 VOC, 0 Cityscapes).
    confidence_threshold: float = 0.95
    # Probability that an image of the strong view gets a CutMix box (UniMatch: 0.5).
    mix_prob: float = 0.5
    # random_area (UniMatch's box) | half_area (the PCR release's box).
    mix_box: str = "random_area"
    # shared_pass | eval_pass: see PARTNER_LABELS. eval_pass costs one no-grad eval-mode
    # forward more per step and gives UniMatch's step exactly (docs/parity.md); FixMatch
    # with an EMA teacher already pastes the teacher's eval-mode labels and adds no pass.
    partner_labels: str = "shared_pass"
    # Whose pixels fill image i's box: "next" = image (i + 1) mod B | "reversed" = image
    # B - 1 - i (UniMatch V2). Either is drawn within one (micro-)batch.
    mix_partner: str = "next"

    def check(self) -> None:
        """Raise ValueError naming the key of an invalid value."""
        if self.warmup_epochs < 0:
            raise ValueError(f"method.warmup_epochs={self.warmup_epochs} must be >= 0")
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise ValueError("method.confidence_threshold must lie in [0, 1]")
        if not 0.0 <= self.mix_prob <= 1.0:
            raise ValueError("method.mix_prob must lie in [0, 1]")
        if self.partner_labels not in PARTNER_LABELS:
            raise ValueError(
                f"method.partner_labels={self.partner_labels!r}: choose one of "
                f"{', '.join(PARTNER_LABELS)}"
            )
        if self.mix_box not in BOX_SHAPES:
            raise ValueError(
                f"method.mix_box={self.mix_box!r}: choose one of {', '.join(BOX_SHAPES)}"
            )
        if self.mix_partner not in PARTNERS:
            raise ValueError(
                f"method.mix_partner={self.mix_partner!r}: choose one of {', '.join(PARTNERS)}"
            )
