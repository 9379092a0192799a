"""Evaluation: a confusion matrix, mIoU, and the loop that runs the inference core over a set.

Units: ``ConfusionMatrix.iou()`` returns fractions in [0, 1]; every other reported number
(``miou()``, ``pixel_accuracy()``, ``EvalResult`` fields) is a percentage.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from protoseg.config import EvalConfig
from protoseg.distributed import all_reduce_sum, get_dist_info
from protoseg.files import atomic_write
from protoseg.inference.core import infer_logits

MIOU_DEFINITIONS = ("nanmean", "release")

__all__ = [
    "MIOU_DEFINITIONS",
    "ConfusionMatrix",
    "EvalResult",
    "evaluate",
    "format_table",
    "save_result",
]


class ConfusionMatrix:
    """A (C, C) int64 pixel-count matrix: rows are ground truth, columns are predictions."""

    def __init__(
        self, num_classes: int, ignore_index: int = 255, device: str | torch.device = "cpu"
    ) -> None:
        """Start an empty matrix on ``device``."""
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.device = torch.device(device)
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=self.device)

    def reset(self) -> None:
        """Set every count back to zero."""
        self.matrix.zero_()

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add the pixels of a prediction/label pair (any shapes with equal numel)."""
        if pred.numel() != target.numel():
            raise ValueError(
                f"prediction has {pred.numel()} pixels but the label has {target.numel()} "
                f"(shapes {tuple(pred.shape)} and {tuple(target.shape)})"
            )
        pred = pred.reshape(-1).to(device=self.device, dtype=torch.int64)
        target = target.reshape(-1).to(device=self.device, dtype=torch.int64)
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        if target.numel() == 0:
            return
        c = self.num_classes
        # One host sync for all four bounds; an out-of-range value would silently land in
        # the wrong cell of the flattened bincount, so it must be an error instead.
        t_lo, t_hi, p_lo, p_hi = torch.stack(
            [target.min(), target.max(), pred.min(), pred.max()]
        ).tolist()
        if t_lo < 0 or t_hi >= c:
            bad = t_lo if t_lo < 0 else t_hi
            raise ValueError(
                f"label {bad} is outside [0, {c}) and is not ignore_index={self.ignore_index}: "
                "check num_classes and the dataset's label mapping"
            )
        if p_lo < 0 or p_hi >= c:
            bad = p_lo if p_lo < 0 else p_hi
            raise ValueError(f"predicted class {bad} is outside [0, {c})")
        counts = torch.bincount(c * target + pred, minlength=c * c)
        self.matrix += counts.reshape(c, c)

    def reduce(self) -> ConfusionMatrix:
        """Sum the matrix over all processes in place (call once, after the last update)."""
        all_reduce_sum(self.matrix)
        return self

    def iou(self) -> Tensor:
        """Per-class IoU as fractions (float64); NaN for a class absent from gt and prediction."""
        m = self.matrix.double()
        inter = m.diagonal()
        union = m.sum(0) + m.sum(1) - inter
        nan = torch.full_like(inter, float("nan"))
        return torch.where(union > 0, inter / union.clamp(min=1), nan)

    def miou(self, definition: str = "nanmean") -> float:
        """Mean IoU as a percentage (``eval.miou``; NaN when nothing was counted).

        ``"nanmean"`` averages over the classes present in the ground truth or the prediction.
        ``"release"`` is U2PL's (and the PCR release's) intersection / (union + 1e-10)
        averaged over all classes, so a class absent from both counts as 0; the two agree
        whenever every class occurs, as on the full VOC and Cityscapes val sets.
        """
        if definition not in MIOU_DEFINITIONS:
            raise ValueError(f"unknown mIoU definition {definition!r}: {MIOU_DEFINITIONS}")
        if definition == "nanmean" or int(self.matrix.sum()) == 0:
            return float(torch.nanmean(self.iou()) * 100.0)
        m = self.matrix.double()
        inter = m.diagonal()
        union = m.sum(0) + m.sum(1) - inter
        return float((inter / (union + 1e-10)).mean() * 100.0)

    def pixel_accuracy(self) -> float:
        """Share of counted pixels predicted correctly, as a percentage (NaN when none)."""
        total = int(self.matrix.sum())
        if total == 0:
            return float("nan")
        return float(self.matrix.diagonal().sum()) / total * 100.0


@dataclass
class EvalResult:
    """The outcome of one evaluation; miou, iou and pixel_acc are percentages (iou NaN = absent)."""

    miou: float
    iou: list[float]
    pixel_acc: float
    num_images: int
    confusion: list[list[int]]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe containers; NaN becomes None."""
        return {
            "miou": _json_float(self.miou),
            "iou": [_json_float(v) for v in self.iou],
            "pixel_acc": _json_float(self.pixel_acc),
            "num_images": self.num_images,
            "confusion": [list(row) for row in self.confusion],
        }


def _json_float(value: float) -> float | None:
    """NaN has no JSON spelling; null says "not defined" without breaking strict parsers."""
    return None if math.isnan(value) else float(value)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Mapping[str, Tensor]],
    num_classes: int,
    cfg: EvalConfig,
    device: str | torch.device,
    ignore_index: int = 255,
    progress: bool = True,
    desc: str = "eval",
) -> EvalResult:
    """Run the model over {"image", "mask"} batches; the result is summed over all ranks."""
    device = torch.device(device)
    info = get_dist_info()
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)
    num_images = 0
    was_training = model.training
    model.eval()
    try:
        batches: Iterable[Mapping[str, Tensor]] = loader
        if progress and info.is_main:
            # disable=None: a bar on a terminal only, never in a batch job's log.
            batches = tqdm(loader, desc=desc, dynamic_ncols=True, leave=False, disable=None)
        for batch in batches:
            image = batch["image"].to(device, non_blocking=True)
            mask = batch["mask"].to(device, non_blocking=True)
            logits = infer_logits(model, image, cfg, num_classes)
            cm.update(logits.argmax(dim=1), mask)
            num_images += int(image.shape[0])
    finally:
        model.train(was_training)
    cm.reduce()
    images = torch.tensor([num_images], dtype=torch.int64, device=device)
    all_reduce_sum(images)
    iou = cm.iou()
    return EvalResult(
        miou=cm.miou(cfg.miou),
        iou=[float(v) * 100.0 for v in iou.tolist()],
        pixel_acc=cm.pixel_accuracy(),
        num_images=int(images.item()),
        confusion=cm.matrix.cpu().tolist(),
    )


def _class_names(class_names: Sequence[str], num_classes: int) -> list[str]:
    """The given names, or class_<i> when none are given."""
    if not class_names:
        return [f"class_{i}" for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names given for {num_classes} classes")
    return [str(n) for n in class_names]


def format_table(result: EvalResult, class_names: Sequence[str]) -> str:
    """An aligned text table: IoU (%) per class, then mIoU and pixel accuracy."""
    names = _class_names(class_names, len(result.iou))
    label_width = max([len(n) for n in names] + [len("pixel accuracy"), len("class")])
    value_width = 7

    def fmt(v: float) -> str:
        return "-" if math.isnan(v) else f"{v:.2f}"

    lines = [f"{'class':<{label_width}}  {'IoU (%)':>{value_width}}"]
    lines.append("-" * (label_width + 2 + value_width))
    lines += [f"{n:<{label_width}}  {fmt(v):>{value_width}}" for n, v in zip(names, result.iou)]
    lines.append("-" * (label_width + 2 + value_width))
    lines.append(f"{'mIoU':<{label_width}}  {fmt(result.miou):>{value_width}}")
    lines.append(f"{'pixel accuracy':<{label_width}}  {fmt(result.pixel_acc):>{value_width}}")
    lines.append(f"{'images':<{label_width}}  {result.num_images:>{value_width}}")
    return "\n".join(lines)


def save_result(
    result: EvalResult,
    path: str | Path,
    class_names: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the result as JSON (IoU keyed by class name, plus ``extra``) atomically."""
    names = _class_names(class_names, len(result.iou))
    data = result.to_dict()
    payload: dict[str, Any] = {
        "miou": data["miou"],
        "iou": dict(zip(names, data["iou"])),
        "pixel_acc": data["pixel_acc"],
        "num_images": data["num_images"],
        "class_names": names,
        "confusion": data["confusion"],
    }
    for key, value in (extra or {}).items():
        if key in payload:
            raise ValueError(f"extra key {key!r} would overwrite a result field")
        payload[key] = value
    text = json.dumps(payload, indent=2, allow_nan=False, default=str) + "\n"
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))
