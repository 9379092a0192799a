"""Colour maps for label masks: the PASCAL VOC map, palette PNG output and RGB rendering."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

Palette = Sequence[tuple[int, int, int]]


def voc_palette(num_colors: int = 256) -> list[tuple[int, int, int]]:
    """The PASCAL VOC colour map: the bits of each index spread over R, G and B, MSB first."""
    if not 0 < num_colors <= 256:
        raise ValueError(f"num_colors={num_colors} must lie in [1, 256]")
    colors = []
    for index in range(num_colors):
        rgb = [0, 0, 0]
        code = index
        for bit in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((code >> channel) & 1) << bit
            code >>= 3
        colors.append((rgb[0], rgb[1], rgb[2]))
    return colors


def _palette_array(palette: Palette | None) -> np.ndarray:
    """A (256, 3) uint8 table; short palettes are padded with black."""
    colors = np.zeros((256, 3), dtype=np.uint8)
    given = np.asarray(voc_palette() if palette is None else list(palette), dtype=np.int64)
    if given.ndim != 2 or given.shape[1] != 3 or len(given) > 256:
        raise ValueError("a palette is a list of at most 256 (r, g, b) tuples")
    if given.size and (given.min() < 0 or given.max() > 255):
        raise ValueError("palette colour components must lie in [0, 255]")
    colors[: len(given)] = given
    return colors


def _check_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a label mask must be 2-D (H, W), got shape {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError("palette masks hold ids in [0, 255]; remap larger ids first")
    return mask.astype(np.uint8, copy=False)


def save_mask_png(
    mask: np.ndarray, path: str | Path | BinaryIO, palette: Palette | None = None
) -> None:
    """Write a label mask as a palette ('P') PNG whose pixel values are the class ids
    (to a file name, or to an open binary file such as ``atomic_write`` gives)."""
    image = Image.fromarray(_check_mask(mask))
    # putpalette turns the 'L' image into 'P' without touching the indices.
    image.putpalette(_palette_array(palette).ravel().tolist())
    if isinstance(path, str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")


def colorize(mask: np.ndarray, palette: Palette | None = None) -> np.ndarray:
    """Render a label mask as an (H, W, 3) uint8 RGB image."""
    return _palette_array(palette)[_check_mask(mask)]
