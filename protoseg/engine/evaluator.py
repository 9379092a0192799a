"""The one evaluator: whole-image or sliding-window inference, a confusion matrix, mIoU.

It is used both by the training loop (periodic validation) and by ``protoseg eval``.
Protocols (see the reference notes): VOC runs the whole image at its original size;
Cityscapes runs 769 x 769 windows with stride 513, sums the window logits and divides
by the number of windows covering each pixel. Optional test-time augmentation
(horizontal flip, several scales) averages raw logits. Averaging logits rather than
softmax probabilities is what the sliding-window protocol already does, and for the
argmax that follows the difference is negligible; it also keeps one code path.

Units: ``ConfusionMatrix.iou()`` returns fractions in [0, 1]; every other reported
number (``miou()``, ``pixel_accuracy()``, ``EvalResult`` fields) is a percentage.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from protoseg.config import EvalConfig
from protoseg.engine.checkpoint import atomic_write
from protoseg.engine.distributed import all_reduce_sum, get_dist_info

__all__ = [
    "ConfusionMatrix",
    "EvalResult",
    "evaluate",
    "format_table",
    "infer_logits",
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

    def miou(self) -> float:
        """Mean IoU over the classes that occur, as a percentage (NaN when nothing was counted)."""
        return float(torch.nanmean(self.iou()) * 100.0)

    def pixel_accuracy(self) -> float:
        """Share of counted pixels predicted correctly, as a percentage (NaN when none)."""
        total = int(self.matrix.sum())
        if total == 0:
            return float("nan")
        return float(self.matrix.diagonal().sum()) / total * 100.0


def _model_logits(model: nn.Module, x: Tensor, num_classes: int) -> Tensor:
    """Run the model and return float32 logits at the size of ``x``."""
    out = model(x)
    logits = out["logits"] if isinstance(out, Mapping) else out
    if logits.dim() != 4 or logits.shape[1] != num_classes or logits.shape[0] != x.shape[0]:
        raise ValueError(
            f"model returned logits of shape {tuple(logits.shape)} for input "
            f"{tuple(x.shape)}; expected ({x.shape[0]}, {num_classes}, h, w)"
        )
    if logits.shape[-2:] != x.shape[-2:]:
        # Models are meant to return input-size logits; tolerate one that does not, using
        # the release's interpolation convention.
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)
    return logits.float()


def _window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window offsets along one axis; the last window is flush with the far border."""
    if size <= window:
        return [0]
    n = math.ceil((size - window) / stride) + 1
    return sorted({min(i * stride, size - window) for i in range(n)})


def _sliding_logits(model: nn.Module, x: Tensor, cfg: EvalConfig, num_classes: int) -> Tensor:
    """Sum window logits over a canvas and divide by the per-pixel window count."""
    b, _, h, w = x.shape
    win, stride = cfg.window, cfg.stride
    pad_h, pad_w = max(win - h, 0), max(win - w, 0)
    if pad_h or pad_w:
        # Zero is the dataset mean after normalisation, i.e. the most neutral content.
        x = F.pad(x, (0, pad_w, 0, pad_h), value=0.0)
    hp, wp = x.shape[-2:]
    canvas = torch.zeros(b, num_classes, hp, wp, dtype=torch.float32, device=x.device)
    count = torch.zeros(1, 1, hp, wp, dtype=torch.float32, device=x.device)
    boxes = [
        (y, x0) for y in _window_starts(hp, win, stride) for x0 in _window_starts(wp, win, stride)
    ]
    per_batch = max(1, cfg.windows_per_batch)
    for i in range(0, len(boxes), per_batch):
        chunk = boxes[i : i + per_batch]
        crops = torch.cat([x[:, :, y : y + win, x0 : x0 + win] for y, x0 in chunk], dim=0)
        out = _model_logits(model, crops, num_classes)
        for j, (y, x0) in enumerate(chunk):
            canvas[:, :, y : y + win, x0 : x0 + win] += out[j * b : (j + 1) * b]
            count[:, :, y : y + win, x0 : x0 + win] += 1.0
    return (canvas / count)[:, :, :h, :w]


def _single_pass(model: nn.Module, x: Tensor, cfg: EvalConfig, num_classes: int) -> Tensor:
    """Logits for one view of the image under the configured mode."""
    if cfg.mode == "whole":
        return _model_logits(model, x, num_classes)
    if cfg.mode == "sliding":
        return _sliding_logits(model, x, cfg, num_classes)
    raise ValueError(f"eval.mode={cfg.mode!r}: choose 'whole' or 'sliding'")


@torch.no_grad()
def infer_logits(model: nn.Module, image: Tensor, cfg: EvalConfig, num_classes: int) -> Tensor:
    """(B, C, H, W) float32 logits for a normalised (B, 3, H, W) batch, averaged over TTA views."""
    if image.dim() != 4:
        raise ValueError(f"expected a (B, 3, H, W) batch, got shape {tuple(image.shape)}")
    h, w = image.shape[-2:]
    scales = list(cfg.scales) or [1.0]
    flips = (False, True) if cfg.flip else (False,)
    total: Tensor | None = None
    views = 0
    for scale in scales:
        if scale <= 0:
            raise ValueError(f"eval.scales must be positive, got {scale}")
        if scale == 1.0:
            scaled = image
        else:
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            scaled = F.interpolate(image, size=size, mode="bilinear", align_corners=True)
        for flip in flips:
            view = scaled.flip(-1) if flip else scaled
            logits = _single_pass(model, view, cfg, num_classes)
            if flip:
                logits = logits.flip(-1)
            if logits.shape[-2:] != (h, w):
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=True)
            total = logits if total is None else total + logits
            views += 1
    assert total is not None
    return total / views if views > 1 else total


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
            batches = tqdm(loader, desc=desc, dynamic_ncols=True, leave=False)
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
        miou=cm.miou(),
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
    path: str | os.PathLike[str],
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
