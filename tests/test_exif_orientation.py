"""EXIF orientation: photos are turned upright (training, evaluation, predict), masks never."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from protoseg.config import DataConfig
from protoseg.data import build_dataset, eval_transform, image_size, open_image, write_split

ORIENTATION = 0x0112
# Upright, the photo is 20 wide and 40 high: red on top, blue below.
UPRIGHT = np.zeros((40, 20, 3), np.uint8)
UPRIGHT[:20] = (220, 20, 20)
UPRIGHT[20:] = (20, 20, 220)


def _rotated_jpeg(path: Path, orientation: int = 6) -> None:
    """A JPEG stored the way a camera held sideways stores it: landscape pixels plus the tag
    that tells viewers to turn them (6: turn 90 degrees clockwise to view)."""
    # exif_transpose turns tag 6 by 270 degrees counter-clockwise; store the inverse.
    stored = Image.fromarray(UPRIGHT).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    stored.save(path, quality=95, exif=exif)


def test_a_rotated_photo_is_read_upright(tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    _rotated_jpeg(photo)
    with Image.open(photo) as raw:
        assert raw.size == (40, 20) and raw.getexif()[ORIENTATION] == 6
        pillow_upright = np.asarray(ImageOps.exif_transpose(raw))
    read = open_image(photo)
    assert read.size == (20, 40) and image_size(photo) == (20, 40)
    np.testing.assert_array_equal(np.asarray(read), pillow_upright)
    pixels = np.asarray(read).astype(int)
    assert pixels[5, 10, 0] > 180 and pixels[35, 10, 2] > 180  # red on top, blue below
    from protoseg.analysis.infer import read_image  # what `protoseg predict` reads with

    np.testing.assert_array_equal(np.asarray(read_image(photo)), pillow_upright)


def test_a_mask_is_never_turned_even_with_an_orientation_tag(tmp_path: Path) -> None:
    mask = tmp_path / "mask.png"
    ids = np.zeros((20, 40), np.uint8)
    ids[:, 20:] = 1
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    Image.fromarray(ids).save(mask, exif=exif)
    with Image.open(mask) as raw:
        assert raw.getexif().get(ORIENTATION) == 6  # the tag really is in the file
    read = open_image(mask, "mask")
    assert read.size == (40, 20) and image_size(mask, "mask") == (40, 20)
    np.testing.assert_array_equal(np.asarray(read), ids)


def test_training_pairs_a_rotated_photo_with_its_upright_mask(tmp_path: Path) -> None:
    _rotated_jpeg(tmp_path / "images" / "p.jpg")
    ids = np.zeros((40, 20), np.uint8)
    ids[20:] = 1  # class 1 where the upright photo is blue
    (tmp_path / "masks").mkdir()
    Image.fromarray(ids).save(tmp_path / "masks" / "p.png")
    write_split(tmp_path / "lab.txt", ["p"])
    cfg = DataConfig(root=str(tmp_path), layout="folder", labeled_split="lab.txt", num_classes=2)
    dataset = build_dataset(cfg, "labeled", eval_transform(cfg))  # the size check passes
    image = np.asarray(dataset.load_image(0)).astype(int)
    mask = dataset.load_mask(0, dataset.load_image(0).size)
    assert mask is not None and mask.shape == image.shape[:2]
    assert (image[mask == 1][:, 2] > 150).all()  # every class-1 pixel is blue
    assert (image[mask == 0][:, 0] > 150).all()  # every class-0 pixel is red
