"""Reading image files: one reader for training, evaluation and prediction.

Every image protoseg decodes goes through :func:`open_image`, so a 16-bit PNG, a palette
image with transparency or a decompression bomb is treated the same by ``train`` and by
``predict``.

The pixel limit
---------------
A small file can declare a huge canvas (a PNG of a few hundred bytes saying 15000 x 15000)
and make the decoder allocate gigabytes. protoseg refuses images with more pixels than
:data:`DEFAULT_MAX_IMAGE_PIXELS` (178,956,970, Pillow's own hard limit, about 13,400 x
13,400): that is 85 Cityscapes frames (2048 x 1024) or a 180-megapixel photo, and decodes to
about 0.5 GB of RGB, so genuine segmentation inputs pass and bombs do not. Raise or drop it
with the ``PROTOSEG_MAX_IMAGE_PIXELS`` environment variable (0 = no limit), which DataLoader
workers inherit however they are started, or pass ``max_pixels`` to the functions here.
Pillow's process-wide ``Image.MAX_IMAGE_PIXELS`` is left alone except while protoseg opens
a file that its own, higher limit allows.

EXIF orientation
----------------
A camera stores a portrait photo as landscape pixels plus an EXIF "Orientation" tag that
viewers (and annotation tools) apply. Images (``what="image"``) are turned upright by
that tag, as ``PIL.ImageOps.exif_transpose`` does, in training, evaluation and ``predict``
alike, so a photo meets the mask drawn on what the annotator saw. Masks (``what="mask"``)
are never turned: they are label maps, their pixel grid is the truth. :func:`image_size`
reports the upright size, so a mask drawn on the upright photo passes the size check.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from protoseg.data.splits import DataError

DEFAULT_MAX_IMAGE_PIXELS = 178_956_970
MAX_PIXELS_ENV = "PROTOSEG_MAX_IMAGE_PIXELS"

# EXIF Orientation values that swap width and height (the 90- and 270-degree ones).
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112
_WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# Pillow reads its limit from a module global; this lock keeps two threads that lift it
# from restoring each other's value.
_PIL_LIMIT_LOCK = threading.Lock()
_noted_orientation = threading.Event()
log = logging.getLogger(__name__)


def max_image_pixels(max_pixels: int | None = None) -> int | None:
    """The pixel limit in force: ``max_pixels`` if given, else the environment, else the default.

    0 (or a negative value) means no limit and is returned as None.
    """
    if max_pixels is None:
        raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
        if not raw:
            return DEFAULT_MAX_IMAGE_PIXELS
        try:
            max_pixels = int(raw.replace("_", "").replace(",", ""))
        except ValueError:
            raise DataError(
                f"{MAX_PIXELS_ENV}={raw!r} is not a whole number; set it to the largest pixel "
                f"count (width x height) to accept, or 0 for no limit"
            ) from None
    return max_pixels if max_pixels > 0 else None


def _limit_message(path: Path, what: str, size: tuple[int, int] | None, limit: int) -> str:
    declared = f"declares {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels" if size else ""
    return (
        f"{path}: {what} {declared or 'is too large'}, more than the limit of {limit:,} that "
        f"guards against decompression bombs; if the file is genuine, raise the limit with "
        f"{MAX_PIXELS_ENV}=<pixels> (0 = no limit), otherwise remove the file or its split entry"
    )


@contextmanager
def _pil_allows(limit: int | None) -> Iterator[None]:
    """Lift Pillow's own limit while protoseg's higher one is the one that decides."""
    pil_limit = Image.MAX_IMAGE_PIXELS
    # Pillow raises above 2x its setting and only warns (ignored below) in between.
    if pil_limit is None or (limit is not None and limit <= 2 * pil_limit):
        yield
        return
    with _PIL_LIMIT_LOCK:
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = pil_limit


def _declared_size(path: Path) -> tuple[int, int] | None:
    """The size a file's header declares, read with Pillow's limit lifted; None if unreadable."""
    try:
        with _pil_allows(None), Image.open(path) as image:
            return image.size
    except Exception:  # only improves an error message that is raised anyway
        return None


def _open(path: Path, what: str, limit: int | None, decode: bool) -> Image.Image:
    try:
        with warnings.catch_warnings(), _pil_allows(limit):
            # Between Pillow's warning and error thresholds protoseg's limit decides alone.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
            if limit is not None and image.width * image.height > limit:
                size = image.size
                image.close()
                raise DataError(_limit_message(path, what, size, limit))
            if decode:
                # Decoding is lazy; load now so a truncated file fails here, with its name.
                image.load()
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(
            f"{path}: {what} not found; check data.root or remove the entry from the split file"
        ) from None
    except Image.DecompressionBombError:
        # Pillow's hard limit (2x Image.MAX_IMAGE_PIXELS) struck first: say by how much.
        limit = limit or 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise DataError(_limit_message(path, what, _declared_size(path), limit)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(
            f"{path}: cannot read {what} ({exc}); the file is corrupt or not an image: "
            f"re-download / re-extract it or remove the entry from the split file"
        ) from None
    return image


def open_image(path: str | Path, what: str = "image", max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode an image file in its own mode; DataError names the file if not.

    ``what`` ("image", "mask") words the error; ``max_pixels`` is the pixel limit (None: the
    one in force, see :func:`max_image_pixels`; 0: none).
    """
    image = _open(Path(path), what, max_image_pixels(max_pixels), decode=True)
    if what == "image" and _orientation(image) not in (None, 1):
        upright = ImageOps.exif_transpose(image)
        image.close()
        if not _noted_orientation.is_set():
            _noted_orientation.set()
            log.info(
                "%s: turned upright by its EXIF orientation tag, as image viewers show it "
                "(done for every such photo, never for masks; noted once)",
                path,
            )
        return upright
    return image


def _orientation(image: Image.Image) -> int | None:
    """The EXIF Orientation tag of an image (1 = upright), None without one or unreadable."""
    try:
        value = image.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # a malformed EXIF block is no reason to refuse the pixels
        return None
    return int(value) if isinstance(value, int) else None


def image_size(
    path: str | Path, what: str = "image", max_pixels: int | None = None
) -> tuple[int, int]:
    """(width, height) from the file's header alone, with the pixel limit applied; for an
    image, the size once its EXIF orientation is applied (as :func:`open_image` returns it)."""
    with _open(Path(path), what, max_image_pixels(max_pixels), decode=False) as image:
        width, height = image.size
        if what == "image" and _orientation(image) in _TRANSPOSING_ORIENTATIONS:
            return height, width  # the upright size open_image returns
        return width, height


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: 16-bit/float greyscale rescaled, alpha dropped."""
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_GREY_MODES:
        # Pillow's own conversion clips 16-bit values at 255, turning most pixels white.
        grey = np.asarray(image, dtype=np.float64)
        # Values that all fit in a byte are 8-bit data stored wide; anything else spans 16 bits.
        peak = 255.0 if grey.max(initial=0.0) <= 255.0 else 65535.0
        grey = np.clip(grey / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        # Going through RGBA avoids Pillow's warning about byte-coded palette transparency.
        image = image.convert("RGBA")
    return image.convert("RGB")


def read_rgb(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """An image file decoded to 8-bit RGB (see :func:`to_rgb`); DataError names the file."""
    return to_rgb(open_image(path, "image", max_pixels))
