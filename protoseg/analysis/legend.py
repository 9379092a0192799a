"""Class-colour legends for label masks in figures and images.

``legend_entries`` decides what a legend lists (the classes present in the masks shown);
``legend_strip`` draws one as an image, for outputs that are plain images rather than
matplotlib figures (``predict``'s overlays).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from protoseg.data import colorize

IGNORED_LABEL = "ignored"
TEXT_COLOR = (30, 30, 30)
# A dark outline keeps white or near-white class colours visible on the white strip.
SWATCH_OUTLINE = (90, 90, 90)


@dataclass(frozen=True)
class LegendEntry:
    """One legend item: the label shown and its mask colour."""

    label: str
    color: tuple[int, int, int]


def class_label(index: int, class_names: Sequence[str]) -> str:
    """The name of class ``index``, or ``class <index>`` for an id the names do not cover."""
    return class_names[index] if 0 <= index < len(class_names) else f"class {index}"


def palette_color(index: int, palette: Sequence[tuple[int, int, int]]) -> tuple[int, int, int]:
    """The colour ``colorize`` paints id ``index`` with (black beyond a short palette)."""
    r, g, b = colorize(np.array([[index]], dtype=np.uint8), palette)[0, 0]
    return int(r), int(g), int(b)


def legend_entries(
    masks: Iterable[np.ndarray],
    class_names: Sequence[str],
    palette: Sequence[tuple[int, int, int]],
    ignore_index: int | None = None,
) -> list[LegendEntry]:
    """One entry per class id present in any of ``masks``, in id order.

    Pixels equal to ``ignore_index`` are listed once, last, as ``ignored`` (in the colour
    ``colorize`` gives that id), since they are not a class but are visible in the figure.
    """
    present: set[int] = set()
    for mask in masks:
        present.update(int(v) for v in np.unique(np.asarray(mask)))
    ignored = None
    if ignore_index is not None and ignore_index in present:
        present.discard(ignore_index)
        ignored = LegendEntry(IGNORED_LABEL, palette_color(ignore_index, palette))
    entries = [
        LegendEntry(class_label(i, class_names), palette_color(i, palette)) for i in sorted(present)
    ]
    return entries + ([ignored] if ignored else [])


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: only the fixed-size bitmap font.
        return ImageFont.load_default()


def legend_strip(entries: Sequence[LegendEntry], width: int, font_size: int = 12) -> Image.Image:
    """A white RGB strip listing ``entries`` as colour swatch + label, wrapped into rows.

    The strip is ``width`` wide, or wider when a single entry does not fit in ``width``,
    so a label is never cut; the caller pads the image above to the strip's width.
    """
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = max(4, font_size // 2)
    pad = max(3, font_size // 3)  # swatch to its label, and between rows
    spacing = font_size  # between one label and the next swatch
    swatch = font_size
    # Every row is as tall as the tallest label, so rows line up whatever the glyphs.
    line = max(swatch, int(probe.textbbox((0, 0), "Ag", font=font)[3]))
    items = [(e, swatch + pad + int(probe.textlength(e.label, font=font))) for e in entries]
    width = max([width, *(w + 2 * margin for _, w in items)])
    placed: list[tuple[LegendEntry, int, int]] = []
    x, y = margin, margin
    for entry, item_width in items:
        if x > margin and x + item_width > width - margin:
            x, y = margin, y + line + pad
        placed.append((entry, x, y))
        x += item_width + spacing
    height = y + line + margin if items else 0
    strip = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for entry, x, y in placed:
        top = y + (line - swatch) // 2
        draw.rectangle(
            (x, top, x + swatch - 1, top + swatch - 1), fill=entry.color, outline=SWATCH_OUTLINE
        )
        draw.text((x + swatch + pad, y), entry.label, fill=TEXT_COLOR, font=font)
    return strip
