"""Joint image/mask transforms built from torchvision.transforms.v2.

Every transform here is called as ``t(image, mask)`` with a PIL image and an (H, W) numpy
mask or None, and returns ``(image, mask)``: a float32 (3, H, W) normalised tensor and an
int64 (H, W) tensor (or None when no mask was given).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from protoseg.config import DataConfig
from protoseg.data.splits import DataError

try:
    from torchvision.transforms.v2 import query_size
except ImportError:  # torchvision < 0.21 keeps it private
    from torchvision.transforms.v2._utils import query_size


SCALE_SAMPLINGS = ("uniform", "split")


class RandomRescale(v2.Transform):
    """Resize by a random factor from [low, high]; images bilinear, masks nearest.

    ``sampling="uniform"`` draws the factor uniformly from [low, high]; ``"split"`` draws it
    from U[low, 1] or U[1, high] with probability 1/2 each, as U2PL's RandResize (and so the
    PCR release) does: on [0.5, 2.0] the mean factor is 1.125 instead of 1.25, and half of
    the crops, not a third, come from a shrunken image.
    """

    def __init__(self, low: float, high: float, sampling: str = "uniform") -> None:
        super().__init__()
        if not 0 < low <= high:
            raise DataError(
                f"scale range [{low}, {high}] needs 0 < min <= max; fix data.scale_range"
            )
        if sampling not in SCALE_SAMPLINGS:
            raise DataError(
                f"data.scale_sampling={sampling!r}: choose one of {', '.join(SCALE_SAMPLINGS)}"
            )
        if sampling == "split" and not low <= 1.0 <= high:
            raise DataError(
                f"data.scale_sampling=split needs a scale range that contains 1, "
                f"not [{low}, {high}]"
            )
        self.low, self.high, self.sampling = float(low), float(high), sampling

    def draw_factor(self) -> float:
        """One scale factor from torch's global generator (seeded per worker)."""
        low, high = self.low, self.high
        if self.sampling == "split":
            low, high = (low, 1.0) if float(torch.rand(())) < 0.5 else (1.0, high)
        return low + (high - low) * float(torch.rand(()))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Draw one scale factor for the image and its mask together."""
        height, width = query_size(flat_inputs)
        factor = self.draw_factor()
        return {"size": [max(1, round(height * factor)), max(1, round(width * factor))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Resize one input to the drawn size."""
        # NEAREST_EXACT samples pixel centres like bilinear does, so labels stay on their pixels.
        if isinstance(inpt, tv_tensors.Mask):
            mode = v2.InterpolationMode.NEAREST_EXACT
        else:
            mode = v2.InterpolationMode.BILINEAR
        return self._call_kernel(F.resize, inpt, params["size"], interpolation=mode, antialias=True)

    # torchvision < 0.21 calls these under their old private names.
    _get_params = make_params
    _transform = transform


class PairTransform:
    """Apply a v2 pipeline to an image and its optional mask; return plain tensors."""

    def __init__(self, pipeline: v2.Transform) -> None:
        self.pipeline = pipeline

    def __call__(
        self, image: Image.Image, mask: np.ndarray | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Transform (image, mask) together; the mask may be None (unlabelled images)."""
        if mask is None:
            out = self.pipeline(image)
            return out.as_subclass(torch.Tensor), None
        mask_t = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(mask)))
        out_image, out_mask = self.pipeline(image, mask_t)
        return out_image.as_subclass(torch.Tensor), out_mask.as_subclass(torch.Tensor).long()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pipeline})"


def _mean_std(cfg: DataConfig) -> tuple[list[float], list[float]]:
    mean, std = [float(v) for v in cfg.mean], [float(v) for v in cfg.std]
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise DataError("data.mean and data.std need three values each, with every std > 0")
    return mean, std


def train_transform(cfg: DataConfig) -> PairTransform:
    """Random rescale (``data.scale_sampling``), normalise, random crop (padded: image 0, mask
    ignore), optional flip."""
    mean, std = _mean_std(cfg)
    if cfg.crop_size <= 0:
        raise DataError(f"data.crop_size={cfg.crop_size} must be > 0")
    if len(cfg.scale_range) != 2:
        raise DataError("data.scale_range must be [min, max]")
    low, high = cfg.scale_range
    steps: list[v2.Transform] = [
        v2.ToImage(),
        # Resizing uint8 is the fast CPU path; the float conversion follows.
        RandomRescale(low, high, cfg.scale_sampling),
        v2.ToDtype(torch.float32, scale=True),
        # Cropping before normalising saves work on upscaled images; padding with the mean
        # makes padded pixels exactly 0 after normalisation, as if padded afterwards.
        v2.RandomCrop(
            cfg.crop_size,
            pad_if_needed=True,
            fill={tv_tensors.Image: mean, tv_tensors.Mask: cfg.ignore_index},
        ),
        v2.Normalize(mean, std),
    ]
    if cfg.hflip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    return PairTransform(v2.Compose(steps))


def eval_transform(cfg: DataConfig) -> PairTransform:
    """To tensor and normalise only; the original size is kept."""
    mean, std = _mean_std(cfg)
    steps = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return PairTransform(v2.Compose(steps))


def denormalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo Normalize on a (..., 3, H, W) tensor and clamp to [0, 1] for display."""
    shape = (3, 1, 1)
    mean_t = torch.as_tensor(mean, dtype=image.dtype, device=image.device).reshape(shape)
    std_t = torch.as_tensor(std, dtype=image.dtype, device=image.device).reshape(shape)
    return (image * std_t + mean_t).clamp(0.0, 1.0)
