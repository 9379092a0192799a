"""The VOC colour map, palette PNGs and mask rendering."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from protoseg.data import colorize, save_mask_png, voc_palette


def test_voc_palette_matches_the_known_colours() -> None:
    palette = voc_palette()
    assert len(palette) == 256
    assert palette[:4] == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0)]
    assert palette[15] == (192, 128, 128)  # person
    assert palette[20] == (0, 64, 128)  # tvmonitor
    assert palette[255] == (224, 224, 192)
    assert len(set(palette)) == 256
    assert voc_palette(21) == palette[:21]


def test_save_mask_png_round_trips_indices(tmp_path: Path) -> None:
    mask = np.arange(6 * 7, dtype=np.uint8).reshape(6, 7)
    mask[0, 0] = 255
    path = tmp_path / "sub" / "m.png"
    save_mask_png(mask, path)
    image = Image.open(path)
    assert image.mode == "P"
    assert np.array_equal(np.array(image), mask)
    assert image.getpalette()[255 * 3 : 256 * 3] == [224, 224, 192]
    with pytest.raises(ValueError, match="2-D"):
        save_mask_png(np.zeros((2, 2, 3), np.uint8), path)


def test_colorize() -> None:
    mask = np.array([[0, 1], [15, 255]], dtype=np.int64)
    rgb = colorize(mask)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[0, 1].tolist() == [128, 0, 0] and rgb[1, 1].tolist() == [224, 224, 192]
    custom = colorize(mask, palette=[(1, 2, 3), (4, 5, 6)])
    assert custom[0, 1].tolist() == [4, 5, 6] and custom[1, 0].tolist() == [0, 0, 0]
