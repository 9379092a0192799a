"""Photometric strong augmentation of normalised image batches, on the batch's device.

UniMatch's strong view (its ``dataset/semi.py``, lines 51-54, and ``blur`` in
``dataset/transform.py``): colour jitter (brightness, contrast and saturation 0.5, hue
0.25) with probability 0.8, greyscale with probability 0.2, then a Gaussian blur with sigma
uniform in [0.1, 2.0] with probability 0.5. UniMatch applies it to PIL images in its data
loader; here it runs on the normalised training batch, so any method can build a strong
view from the weak one it already has, without a second image per sample from the loader.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.transforms import v2


class PhotometricAugment:
    """Colour jitter, random greyscale and Gaussian blur, drawn anew for every image.

    Called on a normalised (B, 3, H, W) batch: each image is un-normalised with ``mean``
    and ``std``, augmented in [0, 1] and normalised again. Pixels where ``valid`` is false
    (crop padding) are set back to 0, the normalised mean, so that padding looks the same
    in every view. Parameters are drawn from torch's global generator, which checkpoints
    save and restore. Geometry is never changed, so labels need no transform.

    Args:
        mean: the per-channel mean the batch was normalised with (``data.mean``).
        std: the per-channel std the batch was normalised with (``data.std``).
        jitter: ColorJitter's (brightness, contrast, saturation, hue).
        jitter_prob: probability of applying the colour jitter.
        grayscale_prob: probability of converting to greyscale (three equal channels).
        blur_prob: probability of the Gaussian blur.
        blur_sigma: range of the blur's standard deviation, in pixels.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        jitter: tuple[float, float, float, float] = (0.5, 0.5, 0.5, 0.25),
        jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_prob: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
    ) -> None:
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError("mean and std need three values each, with every std > 0")
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.jitter, self.jitter_prob, self.grayscale_prob = jitter, jitter_prob, grayscale_prob
        self.blur_prob, self.blur_sigma = blur_prob, blur_sigma
        # UniMatch blurs with PIL's GaussianBlur(radius=sigma), whose support is unbounded;
        # a kernel of +-3 sigma at the largest sigma holds all but 0.3% of its weight.
        self.kernel = 2 * math.ceil(3 * blur_sigma[1]) + 1
        self._transforms: dict[int, v2.Transform] = {}

    def transform(self, height: int, width: int) -> v2.Transform:
        """The per-image transform for images of this size (built once per kernel size)."""
        # Reflection padding needs a kernel radius below the image side.
        kernel = min(self.kernel, 2 * min(height, width) - 1)
        if kernel not in self._transforms:
            self._transforms[kernel] = v2.Compose(
                [
                    v2.RandomApply([v2.ColorJitter(*self.jitter)], p=self.jitter_prob),
                    v2.RandomGrayscale(p=self.grayscale_prob),
                    v2.RandomApply(
                        [v2.GaussianBlur(kernel, sigma=self.blur_sigma)], p=self.blur_prob
                    ),
                ]
            )
        return self._transforms[kernel]

    def __call__(self, images: Tensor, valid: Tensor | None = None) -> Tensor:
        """The photometrically augmented copy of a normalised batch (same shape and dtype)."""
        shape = (1, 3, 1, 1)
        mean = torch.tensor(self.mean, device=images.device).reshape(shape)
        std = torch.tensor(self.std, device=images.device).reshape(shape)
        # Resizing and padding keep the crop in [0, 1] up to rounding; the colour
        # transforms assume that range.
        rgb = (images.float() * std + mean).clamp(0.0, 1.0)
        # A v2 transform draws one set of parameters per call: calling it per image gives
        # every image its own draw, as UniMatch's per-sample data loader does.
        transform = self.transform(*images.shape[-2:])
        augmented = torch.stack([transform(image) for image in rgb])
        out = ((augmented - mean) / std).to(images.dtype)
        if valid is not None:
            out = out.masked_fill(~valid[:, None].to(out.device), 0.0)
        return out
