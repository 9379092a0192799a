"""One image reader for training and prediction: wide greyscale, the pixel limit, worker errors."""

from __future__ import annotations

import io
import struct
import traceback
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from protoseg.config import DataConfig
from protoseg.data import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DataError,
    build_dataset,
    build_eval_loader,
    eval_transform,
    image_size,
    max_image_pixels,
    open_image,
    read_rgb,
    save_mask_png,
    to_rgb,
    write_split,
)

GREY16 = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
# v / 65535 * 255, rounded: the 16-bit range spread over 8 bits, not clipped at 255.
GREY16_AS_8 = np.array([[0, 4, 128, 255]], dtype=np.uint8)


def _folder_dataset(root: Path, names: list[str]) -> DataConfig:
    """A folder-layout root listing ``names`` as labelled images (files written by the test)."""
    write_split(root / "lab.txt", names)
    return DataConfig(root=str(root), layout="folder", labeled_split="lab.txt", num_classes=3)


def _bomb_png(path: Path, width: int, height: int) -> None:
    """A PNG of a few dozen bytes whose header declares width x height pixels."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    # The IHDR chunk follows the 8-byte signature: length, b"IHDR", 13 data bytes, CRC.
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))


def test_16_bit_png_reads_the_same_for_training_and_prediction(tmp_path: Path) -> None:
    path = tmp_path / "images" / "deep.png"
    path.parent.mkdir()
    Image.fromarray(GREY16).save(path)
    assert Image.open(path).mode.startswith("I")
    save_mask_png(np.zeros((1, 4), np.uint8), tmp_path / "masks" / "deep.png")
    cfg = _folder_dataset(tmp_path, ["deep"])
    dataset = build_dataset(cfg, "labeled", eval_transform(cfg))
    trained_on = np.asarray(dataset.load_image(0))
    expected = np.repeat(GREY16_AS_8[..., None], 3, axis=2)
    np.testing.assert_array_equal(trained_on, expected)
    np.testing.assert_array_equal(np.asarray(read_rgb(path)), expected)
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.open(path))), expected)
    # `protoseg predict` reads files through the same reader.
    from protoseg.analysis.infer import read_image

    np.testing.assert_array_equal(np.asarray(read_image(path)), expected)


def test_to_rgb_modes() -> None:
    # 8-bit data stored in a 16-bit image keeps its values.
    small = Image.fromarray(np.array([[0, 100, 255]], dtype=np.uint16))
    assert np.asarray(to_rgb(small))[0, :, 0].tolist() == [0, 100, 255]
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert to_rgb(rgba).mode == "RGB" and to_rgb(rgba).getpixel((0, 0)) == (10, 20, 30)
    palette = Image.new("P", (2, 1), 1)
    palette.putpalette([0, 0, 0, 250, 100, 50] + [0] * 762)
    palette.info["transparency"] = 0
    assert to_rgb(palette).getpixel((1, 0)) == (250, 100, 50)


def test_decompression_bomb_is_refused_with_the_file_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PROTOSEG_MAX_IMAGE_PIXELS", raising=False)
    bomb = tmp_path / "images" / "bomb.png"
    _bomb_png(bomb, 15000, 15000)
    assert bomb.stat().st_size < 100
    pil_limit = Image.MAX_IMAGE_PIXELS
    for read in (open_image, read_rgb, image_size):
        with pytest.raises(DataError) as info:
            read(bomb)
        message = str(info.value)
        assert message.startswith(f"{bomb}: ")
        assert "15000x15000 = 225,000,000 pixels" in message
        assert f"limit of {DEFAULT_MAX_IMAGE_PIXELS:,}" in message
        assert "PROTOSEG_MAX_IMAGE_PIXELS=<pixels>" in message
    # The up-front check of a split finds it from the header, with the split line.
    save_mask_png(np.zeros((2, 2), np.uint8), tmp_path / "masks" / "bomb.png")
    cfg = _folder_dataset(tmp_path, ["bomb"])
    with pytest.raises(DataError, match=r"bomb.png: image declares 15000x15000.*lab.txt, line 1"):
        build_dataset(cfg, "labeled", eval_transform(cfg))
    # The limit is a setting: 0 lifts it (the header then reads), a small one bites early.
    assert image_size(bomb, max_pixels=0) == (15000, 15000)
    monkeypatch.setenv("PROTOSEG_MAX_IMAGE_PIXELS", "0")
    assert max_image_pixels() is None and image_size(bomb) == (15000, 15000)
    monkeypatch.setenv("PROTOSEG_MAX_IMAGE_PIXELS", "3")
    with pytest.raises(DataError, match=r"mask declares 2x2 = 4 pixels, more than the limit of 3"):
        open_image(tmp_path / "masks" / "bomb.png", "mask")
    monkeypatch.setenv("PROTOSEG_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(DataError, match="PROTOSEG_MAX_IMAGE_PIXELS='lots' is not a whole number"):
        open_image(bomb)
    # Pillow's own process-wide limit is as it was.
    assert pil_limit == Image.MAX_IMAGE_PIXELS


def test_no_pillow_warning_below_the_limit(
    tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    # 100 M pixels: over Pillow's warning threshold, under protoseg's limit.
    big = tmp_path / "big.png"
    _bomb_png(big, 10000, 10000)
    assert Image.MAX_IMAGE_PIXELS < 10000 * 10000
    assert image_size(big) == (10000, 10000)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_worker_errors_reach_the_main_process_as_the_one_line_message(tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    for name in ("good", "bad"):
        Image.new("RGB", (6, 4), (20, 40, 60)).save(images / f"{name}.png")
        save_mask_png(np.ones((4, 6), np.uint8), masks / f"{name}.png")
    (images / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cfg = _folder_dataset(tmp_path, ["good", "bad"])
    cfg.check_files = False
    dataset = build_dataset(cfg, "labeled", eval_transform(cfg))
    with pytest.raises(DataError) as direct:
        dataset[1]
    loader = build_eval_loader(dataset, workers=1)
    with pytest.raises(DataError) as from_worker:
        list(loader)
    assert str(from_worker.value) == str(direct.value)
    assert str(from_worker.value).startswith(f"{images / 'bad.png'}: cannot read image")
    assert "\n" not in str(from_worker.value)
    assert "worker process 0" in from_worker.value.where
    assert "Traceback" in from_worker.value.worker_traceback
    # torch's re-raise keeps the loader's iterator in a reference cycle through the frames;
    # clearing them shuts the worker down now, not at some later garbage collection, where
    # torch's finalizers may run in an order that leaves the worker waiting out a 5 s timeout.
    traceback.clear_frames(from_worker.value.__traceback__)
    assert isinstance(next(iter(build_eval_loader(dataset)))["image"], torch.Tensor)


def test_wrapped_message_parsing() -> None:
    chained = (
        "Caught DataError in DataLoader worker process 3.\nOriginal Traceback (most recent "
        'call last):\n  File "x.py", line 1, in f\nOSError: inner\n\nDuring handling of the '
        "above exception, another exception occurred:\n\nTraceback (most recent call last):\n"
        '  File "y.py", line 2, in g\nprotoseg.data.splits.DataError: a.png: first line\n'
        "second line\n"
    )
    error = DataError(chained)
    assert str(error) == "a.png: first line\nsecond line"
    assert error.where == "in DataLoader worker process 3"
    plain = DataError("Caught nothing: a message that only looks similar")
    assert str(plain).startswith("Caught nothing") and plain.where == ""
