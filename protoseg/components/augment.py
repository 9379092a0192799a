"""Strong augmentations of the unlabelled student view that move image and targets together.

Each takes images (B, 3, H, W), pseudo-labels (B, H, W), confidences (B, H, W) and a validity
mask (B, H, W) and returns the four transformed alike. The partner of image i is image
(i + 1) mod B, as in the PCR release (``partner="next"``); UniMatch V2 pairs image i with
image B - 1 - i, the batch reversed (``partner="reversed"``). Randomness comes from torch's
global generator, which checkpoints save and restore.
"""

from __future__ import annotations

import torch
from torch import Tensor

MixOutput = tuple[Tensor, Tensor, Tensor, Tensor]


def half_area_boxes(batch: int, height: int, width: int, device: torch.device) -> Tensor:
    """One box per image of area H*W/2, width uniform in (W/2, W]: boolean (B, H, W)."""
    masks = torch.zeros(batch, height, width, dtype=torch.bool, device=device)
    for i in range(batch):
        box_w = int(torch.randint(width // 2 + 1, width + 1, ()).item())
        box_h = min(height, max(1, round(height * width / 2 / box_w)))
        x0 = int(torch.randint(0, width - box_w + 1, ()).item())
        y0 = int(torch.randint(0, height - box_h + 1, ()).item())
        masks[i, y0 : y0 + box_h, x0 : x0 + box_w] = True
    return masks


def box_masks(
    batch: int,
    height: int,
    width: int,
    area_range: tuple[float, float],
    boxes: int,
    device: torch.device,
) -> Tensor:
    """CPS's CutMix masks: ``boxes`` boxes per image that flip the mask where they fall.

    Each box covers ``p / boxes`` of the image, ``p`` uniform in ``area_range``, with a
    random aspect ratio (its height share ``sqrt(p**u / boxes)``, ``u`` uniform in [0, 1]),
    at a uniform position inside the image; overlapping boxes cancel out. Boolean (B, H, W).
    """
    masks = torch.zeros(batch, height, width, dtype=torch.bool, device=device)
    low, high = area_range
    for i in range(batch):
        for _ in range(boxes):
            area = low + (high - low) * float(torch.rand(()))
            tall = area ** float(torch.rand(()))
            box_h = round(tall / boxes**0.5 * height)
            box_w = round(area / tall / boxes**0.5 * width)
            y0 = round((height - box_h) * float(torch.rand(())))
            x0 = round((width - box_w) * float(torch.rand(())))
            masks[i, y0 : y0 + box_h, x0 : x0 + box_w] ^= True
    return masks


# How the image that lends its pixels to image i of a batch of B is chosen:
# "next": image (i + 1) mod B (the PCR release, UniMatch V1 here);
# "reversed": image B - 1 - i, the batch flipped (UniMatch V2's ``.flip(0)``).
PARTNERS = ("next", "reversed")


def partner_of(tensor: Tensor, partner: str = "next") -> Tensor:
    """``tensor`` (B, ...) reordered so that row i holds the partner of image i."""
    if partner == "next":
        return torch.roll(tensor, shifts=-1, dims=0)
    if partner == "reversed":
        return torch.flip(tensor, dims=(0,))
    raise ValueError(f"unknown mixing partner {partner!r}: choose one of {', '.join(PARTNERS)}")


def paste_from_partner(mask: Tensor, *tensors: Tensor, partner: str = "next") -> tuple[Tensor, ...]:
    """Where ``mask`` (B, H, W) is set, take the values of image i's ``partner`` (PARTNERS)."""
    out = []
    for t in tensors:
        m = mask[:, None] if t.dim() == 4 else mask
        out.append(torch.where(m, partner_of(t, partner), t))
    return tuple(out)


def cutmix(images: Tensor, labels: Tensor, conf: Tensor, valid: Tensor) -> MixOutput:
    """Paste a half-area box of the partner image (and its targets) into each image."""
    b, _, h, w = images.shape
    boxes = half_area_boxes(b, h, w, images.device)
    return paste_from_partner(boxes, images, labels, conf, valid)  # type: ignore[return-value]


def cutout(images: Tensor, labels: Tensor, conf: Tensor, valid: Tensor) -> MixOutput:
    """Erase a half-area box (to the normalised mean, 0) and drop its targets from the loss."""
    b, _, h, w = images.shape
    boxes = half_area_boxes(b, h, w, images.device)
    images = images.masked_fill(boxes[:, None], 0.0)
    return images, labels, conf.masked_fill(boxes, 0.0), valid


def classmix(images: Tensor, labels: Tensor, conf: Tensor, valid: Tensor) -> MixOutput:
    """Paste half of the partner's pseudo-classes (with their pixels) onto each image."""
    partner_labels = torch.roll(labels, shifts=-1, dims=0)
    masks = torch.zeros_like(labels, dtype=torch.bool)
    for i in range(labels.shape[0]):
        classes = torch.unique(partner_labels[i])
        chosen = classes[torch.randperm(classes.numel(), device=classes.device)]
        chosen = chosen[: (classes.numel() + 1) // 2]
        masks[i] = torch.isin(partner_labels[i], chosen)
    return paste_from_partner(masks, images, labels, conf, valid)  # type: ignore[return-value]


STRONG_AUGMENTATIONS = {"cutmix": cutmix, "cutout": cutout, "classmix": classmix}


def strong_augment(
    name: str, prob: float, images: Tensor, labels: Tensor, conf: Tensor, valid: Tensor
) -> MixOutput:
    """Apply the named augmentation to the whole batch with probability ``prob``."""
    if name not in STRONG_AUGMENTATIONS:
        raise ValueError(f"unknown strong augmentation {name!r}: {sorted(STRONG_AUGMENTATIONS)}")
    if images.shape[0] < 2 and name != "cutout":
        return images, labels, conf, valid
    if float(torch.rand(())) >= prob:
        return images, labels, conf, valid
    return STRONG_AUGMENTATIONS[name](images, labels, conf, valid)
