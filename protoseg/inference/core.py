"""The one inference core: whole image or sliding window, plus flip / multi-scale TTA.

Used by the training loop's evaluation, by ``protoseg eval``/``predict``/``export`` and by
the analyses. Protocols (see the reference notes): VOC runs the whole image at its original
size; Cityscapes runs 769 x 769 windows with stride 513, sums the window logits and divides
by the number of windows covering each pixel. Test-time augmentation (horizontal flip,
several scales) averages raw logits: that is what the sliding-window protocol already does,
for the argmax that follows the difference to averaging probabilities is negligible, and it
keeps one code path.

Two settings give UniMatch V2's protocol for patch-14 ViTs: ``resize_to_multiple: 14``
resizes each view to the nearest multiple of 14 and the logits back (its VOC "original"
mode), and ``merge: probabilities`` combines windows and views by their softmax
probabilities (its Cityscapes 798/532 window sums them). The result is then the log of the
mean probability: the same argmax as the sum, and a softmax of it gives the mean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protoseg.config import EvalConfig

__all__ = ["infer_logits"]


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
    """Sum window scores (``cfg.merge``) over a canvas and divide by the window count."""
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
        out = _merge_scores(_model_logits(model, crops, num_classes), cfg)
        for j, (y, x0) in enumerate(chunk):
            canvas[:, :, y : y + win, x0 : x0 + win] += out[j * b : (j + 1) * b]
            count[:, :, y : y + win, x0 : x0 + win] += 1.0
    return (canvas / count)[:, :, :h, :w]


def _merge_scores(logits: Tensor, cfg: EvalConfig) -> Tensor:
    """What is summed over windows and views: the logits, or their softmax."""
    if cfg.merge == "logits":
        return logits
    if cfg.merge == "probabilities":
        return logits.softmax(dim=1)
    raise ValueError(f"eval.merge={cfg.merge!r}: choose 'logits' or 'probabilities'")


def nearest_multiple_size(size: tuple[int, int], multiple: int) -> tuple[int, int]:
    """Each side rounded to the nearest multiple of ``multiple`` (halves up), at least one."""
    return tuple(max(multiple, int(side / multiple + 0.5) * multiple) for side in size)  # type: ignore[return-value]


def _single_pass(model: nn.Module, x: Tensor, cfg: EvalConfig, num_classes: int) -> Tensor:
    """Scores (logits or probabilities, per ``cfg.merge``) for one view at its own size."""
    size = (int(x.shape[-2]), int(x.shape[-1]))
    if cfg.resize_to_multiple > 0:
        target = nearest_multiple_size(size, cfg.resize_to_multiple)
        if target != size:
            x = F.interpolate(x, size=target, mode="bilinear", align_corners=True)
    if cfg.mode == "whole":
        scores = _merge_scores(_model_logits(model, x, num_classes), cfg)
    elif cfg.mode == "sliding":
        scores = _sliding_logits(model, x, cfg, num_classes)
    else:
        raise ValueError(f"eval.mode={cfg.mode!r}: choose 'whole' or 'sliding'")
    if scores.shape[-2:] != size:
        # UniMatch V2 resizes the logits back; with merge=probabilities the resize runs on
        # probabilities, which a bilinear resize keeps summing to one.
        scores = F.interpolate(scores, size=size, mode="bilinear", align_corners=True)
    return scores


@torch.no_grad()
def infer_logits(model: nn.Module, image: Tensor, cfg: EvalConfig, num_classes: int) -> Tensor:
    """(B, C, H, W) float32 logits for a normalised (B, 3, H, W) batch, averaged over TTA views.

    With ``cfg.merge == "probabilities"`` they are the log of the mean probabilities.
    """
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
    mean = total / views if views > 1 else total
    if cfg.merge == "probabilities":
        # The floor keeps log finite where a class has probability 0 in float32.
        return mean.clamp_min(torch.finfo(mean.dtype).tiny).log()
    return mean
