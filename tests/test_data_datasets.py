"""Layout readers and SegmentationDataset on small fixtures written in the real formats."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from protoseg.config import DataConfig
from protoseg.data import (
    CITYSCAPES_LABEL_ID_TO_TRAIN_ID,
    DataError,
    build_dataset,
    denormalize,
    eval_transform,
    save_mask_png,
    train_transform,
    write_split,
)
from protoseg.data import datasets as datasets_module

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _rgb(path: Path, array: np.ndarray, **save: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **save)


def _voc_fixture(root: Path) -> np.ndarray:
    """Two VOC images: a palette mask with a 255 border and a plain grey-id mask."""
    image = np.zeros((20, 30, 3), np.uint8)
    image[:, :15] = (200, 40, 40)
    image[:, 15:] = (40, 40, 200)
    _rgb(root / "JPEGImages" / "2007_000001.jpg", image, quality=95)
    _rgb(root / "JPEGImages" / "2007_000002.jpg", image, quality=95)
    mask = np.zeros((20, 30), np.uint8)
    mask[:, 15:] = 15
    mask[[0, -1], :] = 255
    mask[:, [0, -1]] = 255
    save_mask_png(mask, root / "SegmentationClassAug" / "2007_000001.png")
    _rgb(root / "SegmentationClassAug" / "2007_000002.png", mask)  # mode 'L'
    write_split(root / "splits" / "labeled.txt", ["2007_000001", "2007_000002"])
    return mask


def _cfg(root: Path, **kw: object) -> DataConfig:
    return DataConfig(root=str(root), **kw)  # type: ignore[arg-type]


def test_voc_palette_and_grey_masks(tmp_path: Path) -> None:
    mask = _voc_fixture(tmp_path)
    assert Image.open(tmp_path / "SegmentationClassAug" / "2007_000001.png").mode == "P"
    cfg = _cfg(tmp_path)
    ds = build_dataset(cfg, "labeled", eval_transform(cfg))
    assert len(ds) == 2
    for i in range(2):
        item = ds[i]
        assert item["name"] == f"2007_00000{i + 1}"
        assert item["size"] == (20, 30) and item["index"] == i
        assert item["mask"].dtype == torch.int64 and item["image"].dtype == torch.float32
        assert torch.equal(item["mask"], torch.from_numpy(mask).long())
        rgb = denormalize(item["image"], MEAN, STD) * 255
        assert item["image"].shape == (3, 20, 30)
        assert (rgb[:, 2:-2, 2:12] - torch.tensor([200.0, 40, 40])[:, None, None]).abs().max() < 6
        assert (rgb[:, 2:-2, 18:-2] - torch.tensor([40.0, 40, 200])[:, None, None]).abs().max() < 6


def test_voc_two_column_lines(tmp_path: Path) -> None:
    _voc_fixture(tmp_path)
    write_split(
        tmp_path / "pairs.txt", ["JPEGImages/2007_000001.jpg SegmentationClassAug/2007_000002.png"]
    )
    cfg = _cfg(tmp_path, val_split="pairs.txt")
    ds = build_dataset(cfg, "val", eval_transform(cfg))
    assert ds.samples[0].name == "2007_000001"
    assert ds.samples[0].mask == tmp_path / "SegmentationClassAug" / "2007_000002.png"
    assert ds[0]["mask"].shape == (20, 30)


CITY_LINE = "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
CITY_MASKS = Path("gtFine/train/aachen")


def _city_fixture(root: Path) -> np.ndarray:
    _rgb(root / CITY_LINE, np.full((8, 12, 3), 90, np.uint8))
    label_ids = np.zeros((8, 12), np.uint8)
    label_ids[0] = 7
    label_ids[1] = 26
    label_ids[2] = 33
    label_ids[3] = 4  # 'static': not a train class
    _rgb(root / CITY_MASKS / "aachen_000000_000019_gtFine_labelIds.png", label_ids)
    write_split(root / "splits" / "labeled.txt", [CITY_LINE])
    return label_ids


def test_cityscapes_label_ids_are_mapped(tmp_path: Path) -> None:
    _city_fixture(tmp_path)
    cfg = _cfg(tmp_path, layout="cityscapes", num_classes=19)
    ds = build_dataset(cfg, "labeled", eval_transform(cfg))
    assert ds.samples[0].map_ids and ds.samples[0].name == "aachen_000000_000019"
    mask = ds[0]["mask"]
    assert mask[0].unique().tolist() == [0]
    assert mask[1].unique().tolist() == [13]
    assert mask[2].unique().tolist() == [18]
    assert mask[3].unique().tolist() == [255]
    assert mask[4].unique().tolist() == [255]  # label id 0 ('unlabeled')
    table = CITYSCAPES_LABEL_ID_TO_TRAIN_ID
    assert table.shape == (256,) and table.dtype == np.uint8
    label_ids = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
    expected = {label_id: train_id for train_id, label_id in enumerate(label_ids)}
    assert {i: int(t) for i, t in enumerate(table) if t != 255} == expected
    # Without mapping the raw ids (up to 33) are out of range for 19 classes.
    cfg_raw = _cfg(tmp_path, layout="cityscapes", num_classes=19, map_label_ids=False)
    with pytest.raises(DataError, match="labelTrainIds.png: file not found"):
        build_dataset(cfg_raw, "labeled", eval_transform(cfg_raw))


def test_cityscapes_prefers_label_train_ids(tmp_path: Path) -> None:
    _city_fixture(tmp_path)
    train_ids = np.full((8, 12), 5, np.uint8)
    _rgb(tmp_path / CITY_MASKS / "aachen_000000_000019_gtFine_labelTrainIds.png", train_ids)
    cfg = _cfg(tmp_path, layout="cityscapes", num_classes=19)
    ds = build_dataset(cfg, "labeled", eval_transform(cfg))
    assert not ds.samples[0].map_ids
    assert ds[0]["mask"].unique().tolist() == [5]


def test_folder_layout_with_unlabelled_images(tmp_path: Path) -> None:
    colors = {"a": (255, 0, 0), "b": (0, 255, 0), "c": (0, 0, 255)}
    _rgb(tmp_path / "images" / "a.png", np.full((10, 14, 3), colors["a"], np.uint8))
    _rgb(tmp_path / "images" / "b.jpeg", np.full((9, 9, 3), colors["b"], np.uint8))
    # Greyscale and palette inputs must come out as 3-channel RGB.
    Image.new("L", (11, 7), 128).save(tmp_path / "images" / "c.jpg")
    Image.new("RGBA", (5, 6), (10, 20, 30, 0)).save(tmp_path / "images" / "d.png")
    palette_image = Image.new("P", (4, 3), 1)
    palette_image.putpalette([0, 0, 0, 250, 100, 50] + [0] * 762)
    palette_image.save(tmp_path / "images" / "e.png")
    save_mask_png(np.ones((10, 14), np.uint8), tmp_path / "masks" / "a.png")
    write_split(tmp_path / "lab.txt", ["a"])
    write_split(tmp_path / "unlab.txt", ["b", "c", "d.png", "e"])
    cfg = _cfg(tmp_path, layout="folder", labeled_split="lab.txt", unlabeled_split="unlab.txt")
    labeled = build_dataset(cfg, "labeled", eval_transform(cfg))
    assert labeled[0]["mask"].unique().tolist() == [1]
    unlabeled = build_dataset(cfg, "unlabeled", eval_transform(cfg))
    names = [s.name for s in unlabeled.samples]
    assert names == ["b", "c", "d", "e"]
    assert all(s.mask is None for s in unlabeled.samples)
    for i, size in enumerate([(9, 9), (7, 11), (6, 5), (3, 4)]):
        item = unlabeled[i]
        assert "mask" not in item and item["size"] == size
        assert item["valid"].dtype == torch.bool and bool(item["valid"].all())
        assert item["image"].shape == (3, *size)
    grey = denormalize(unlabeled[1]["image"], MEAN, STD) * 255
    assert (grey - 128).abs().max() < 3
    orange = denormalize(unlabeled[3]["image"], MEAN, STD) * 255
    assert (orange - torch.tensor([250.0, 100, 50])[:, None, None]).abs().max() < 0.01


def _synthetic_labeled(root: Path, **kw: object) -> DataConfig:
    """The synthetic set's 8-label split, 48 px crops."""
    return _cfg(
        root,
        num_classes=6,
        crop_size=48,
        mask_dir="SegmentationClass",
        labeled_split="splits/8/labeled.txt",
        **kw,
    )


def test_aug_seed_makes_items_reproducible(synthetic_root: Path) -> None:
    cfg = _synthetic_labeled(synthetic_root)
    ds = build_dataset(cfg, "labeled", train_transform(cfg))
    first, again = ds[(3, 1234)], ds[(3, 1234)]
    assert torch.equal(first["image"], again["image"])
    assert torch.equal(first["mask"], again["mask"])
    other = ds[(3, 1235)]
    assert not torch.equal(first["image"], other["image"])
    # Unlabelled items mark the crop's padding instead of carrying a mask.
    cfg_u = _cfg(
        synthetic_root,
        crop_size=96,
        mask_dir="SegmentationClass",
        unlabeled_split="splits/8/unlabeled.txt",
    )
    unlabeled = build_dataset(cfg_u, "unlabeled", train_transform(cfg_u))
    padded = 0
    for seed in range(6):
        item = unlabeled[(0, seed)]
        assert "mask" not in item and item["valid"].shape == (96, 96)
        assert torch.equal(item["valid"], (item["image"] != 0).any(dim=0))
        padded += int((~item["valid"]).sum())
    assert padded > 0
    # The ambient RNG is left untouched by seeded items.
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    ds[(1, 99)]
    assert torch.equal(torch.rand(3), expected)


def test_seeded_items_leave_other_generators_alone(
    synthetic_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch.manual_seed also (re)seeds every accelerator generator, which fork_rng(devices=[])
    # does not restore; a seeded item may only seed the CPU generator the transforms use.
    cfg = _synthetic_labeled(synthetic_root)
    ds = build_dataset(cfg, "labeled", train_transform(cfg))
    expected = ds[(2, 77)]

    def refuse(seed: int) -> None:
        raise AssertionError(f"torch.manual_seed({seed}) called while reading an item")

    monkeypatch.setattr(torch, "manual_seed", refuse)
    again = ds[(2, 77)]
    assert torch.equal(again["image"], expected["image"])
    assert torch.equal(again["mask"], expected["mask"])


def test_cache_images_reads_each_file_once_and_gives_the_same_items(
    synthetic_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain_cfg = _synthetic_labeled(synthetic_root)
    cached_cfg = _synthetic_labeled(synthetic_root, cache_images=True)
    plain = build_dataset(plain_cfg, "labeled", train_transform(plain_cfg))
    cached = build_dataset(cached_cfg, "labeled", train_transform(cached_cfg))
    opened: list[str] = []
    real_open = datasets_module.open_image

    def counting_open(path: object, *args: object, **kwargs: object) -> Image.Image:
        opened.append(str(path))
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(datasets_module, "open_image", counting_open)
    for seed in range(3):
        for index in range(len(cached)):
            a, b = plain[(index, seed)], cached[(index, seed)]
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    # The plain dataset opened image and mask every time; the cached one once per sample.
    assert len(opened) == 2 * 3 * len(plain) + 2 * len(cached)
    # What the caller does to a returned mask never reaches the cache.
    image, mask = cached._read(0)
    assert mask is not None
    mask[:] = 5
    _, again = cached._read(0)
    assert again is not None and not (again == 5).all()


# ---- errors: each names the offending file and says what to do ----


def test_missing_root(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "no_such_dataset")
    with pytest.raises(DataError, match="no_such_dataset.*does not exist: download the dataset"):
        build_dataset(cfg, "labeled", eval_transform(cfg))


def test_missing_image_names_split_line(tmp_path: Path) -> None:
    _voc_fixture(tmp_path)
    (tmp_path / "splits" / "labeled.txt").write_text("2007_000001\n\n2007_000002\ngone_1\ngone_2\n")
    cfg = _cfg(tmp_path)
    with pytest.raises(DataError) as info:
        build_dataset(cfg, "labeled", eval_transform(cfg))
    message = str(info.value)
    assert "gone_1.jpg: file not found" in message
    assert "labeled.txt, line 4" in message
    assert "4 of 8 files" in message
    # Without the up-front check the dataset builds and the read names the file instead.
    lazy = build_dataset(_cfg(tmp_path, check_files=False), "labeled", eval_transform(cfg))
    with pytest.raises(DataError, match="gone_1.jpg: image not found"):
        lazy[2]


def test_size_mismatch(tmp_path: Path) -> None:
    _voc_fixture(tmp_path)
    save_mask_png(
        np.zeros((20, 29), np.uint8), tmp_path / "SegmentationClassAug" / "2007_000002.png"
    )
    cfg = _cfg(tmp_path)
    # Found up front from the headers, with the split line...
    pattern = r"000002.png: mask is 29x20 but its image .* is 30x20"
    with pytest.raises(DataError, match=pattern + r".*labeled.txt, line 2\)"):
        build_dataset(cfg, "labeled", eval_transform(cfg))
    # ...and when the item is read without that check.
    ds = build_dataset(_cfg(tmp_path, check_files=False), "labeled", eval_transform(cfg))
    with pytest.raises(DataError, match=pattern):
        ds[1]


def test_out_of_range_labels(tmp_path: Path) -> None:
    _voc_fixture(tmp_path)
    mask = np.zeros((20, 30), np.uint8)
    mask[0, :3] = (21, 40, 254)
    save_mask_png(mask, tmp_path / "SegmentationClassAug" / "2007_000001.png")
    cfg = _cfg(tmp_path, check_files=False)
    ds = build_dataset(cfg, "labeled", eval_transform(cfg))
    with pytest.raises(DataError) as info:
        ds[0]
    message = str(info.value)
    assert "2007_000001.png: label values 21, 40, 254 are outside [0, 21)" in message
    assert "data.num_classes" in message and "data.ignore_index" in message
    # The up-front label check decodes the first mask and stops on it as well.
    with pytest.raises(DataError, match="2007_000001.png: label values 21, 40, 254"):
        build_dataset(_cfg(tmp_path), "labeled", eval_transform(cfg))


def test_corrupt_and_truncated_images(tmp_path: Path) -> None:
    _voc_fixture(tmp_path)
    jpeg = tmp_path / "JPEGImages" / "2007_000001.jpg"
    good = jpeg.read_bytes()
    jpeg.write_bytes(np.random.default_rng(0).bytes(500))
    cfg = _cfg(tmp_path)
    with pytest.raises(DataError, match=r"2007_000001.jpg: cannot read image .* corrupt.*line 1\)"):
        build_dataset(cfg, "labeled", eval_transform(cfg))
    lazy = _cfg(tmp_path, check_files=False)
    ds = build_dataset(lazy, "labeled", eval_transform(cfg))
    with pytest.raises(DataError, match="2007_000001.jpg: cannot read image .* corrupt"):
        ds[0]
    # A truncated file has a readable header: only decoding it finds the fault.
    jpeg.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="2007_000001.jpg: cannot read image"):
        build_dataset(cfg, "labeled", eval_transform(cfg))[0]
    (tmp_path / "SegmentationClassAug" / "2007_000002.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="2007_000002.png: cannot read mask"):
        ds[1]


def test_empty_split_and_unknown_layout(tmp_path: Path) -> None:
    _voc_fixture(tmp_path)
    (tmp_path / "splits" / "val.txt").write_text("\n\n")
    cfg = _cfg(tmp_path)
    with pytest.raises(DataError, match=r"val.txt: split file is empty.*data.val_split"):
        build_dataset(cfg, "val", eval_transform(cfg))
    with pytest.raises(DataError, match=r"nothere.txt: split file not found.*data.labeled_split"):
        build_dataset(_cfg(tmp_path, labeled_split="nothere.txt"), "labeled", eval_transform(cfg))
    bad = _cfg(tmp_path, layout="coco")
    with pytest.raises(DataError, match="data.layout='coco' is unknown; choose one of cityscapes"):
        build_dataset(bad, "labeled", eval_transform(cfg))


def test_unlabeled_split_required_for_unlabeled(tmp_path: Path) -> None:
    _voc_fixture(tmp_path)
    cfg = _cfg(tmp_path)
    with pytest.raises(DataError, match="semi-supervised method needs data.unlabeled_split"):
        build_dataset(cfg, "unlabeled", eval_transform(cfg))


def test_malformed_cityscapes_line_names_split_line(tmp_path: Path) -> None:
    _city_fixture(tmp_path)
    (tmp_path / "splits" / "labeled.txt").write_text(f"{CITY_LINE}\n2007_000001\n")
    cfg = _cfg(tmp_path, layout="cityscapes", num_classes=19)
    with pytest.raises(DataError, match=r"labeled.txt, line 2: entry '2007_000001' is not a Cit"):
        build_dataset(cfg, "labeled", eval_transform(cfg))


def test_repeated_lines_warn_in_training_splits_and_are_refused_in_val(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _voc_fixture(tmp_path)
    split = tmp_path / "splits" / "labeled.txt"
    split.write_text("2007_000001\n2007_000002\n\n2007_000001\n2007_000002\n2007_000001\n")
    cfg = _cfg(tmp_path)
    with caplog.at_level(logging.WARNING):
        ds = build_dataset(cfg, "labeled", eval_transform(cfg))
    assert len(ds) == 5  # kept as listed: the file is the user's choice of weights
    assert f"{split}: 2 entries are listed more than once" in caplog.text
    assert "'2007_000001' on lines 1, 4, 6; '2007_000002' on lines 2, 5" in caplog.text
    assert "delete the repeated lines" in caplog.text
    with pytest.raises(DataError) as info:
        build_dataset(_cfg(tmp_path, val_split=str(split)), "val", eval_transform(cfg))
    message = str(info.value)
    assert message.startswith(f"{split}: 2 entries are listed more than once")
    assert "count twice in the validation mIoU: delete the repeated lines" in message


def test_labelled_split_without_a_labelled_pixel_is_refused(tmp_path: Path) -> None:
    _voc_fixture(tmp_path)
    for name in ("2007_000001", "2007_000002"):
        save_mask_png(
            np.full((20, 30), 255, np.uint8), tmp_path / "SegmentationClassAug" / f"{name}.png"
        )
    cfg = _cfg(tmp_path)
    split = tmp_path / "splits" / "labeled.txt"
    with pytest.raises(DataError) as info:
        build_dataset(cfg, "labeled", eval_transform(cfg))
    message = str(info.value)
    assert message.startswith(f"{split}: every mask of its 2 entries holds only the ignore index")
    assert "data.mask_dir" in message and "data.ignore_index" in message
    # One labelled pixel anywhere in the split is enough.
    mask = np.full((20, 30), 255, np.uint8)
    mask[5, 5] = 0
    save_mask_png(mask, tmp_path / "SegmentationClassAug" / "2007_000002.png")
    assert len(build_dataset(cfg, "labeled", eval_transform(cfg))) == 2
    # Cityscapes raw ids are mapped first: ids that map to no train class count as ignore.
    _city_fixture(tmp_path / "city")
    _rgb(
        tmp_path / "city" / CITY_MASKS / "aachen_000000_000019_gtFine_labelIds.png",
        np.full((8, 12), 4, np.uint8),
    )
    city = _cfg(tmp_path / "city", layout="cityscapes", num_classes=19)
    with pytest.raises(DataError, match="labeled.txt: every mask of its 1 entries"):
        build_dataset(city, "labeled", eval_transform(city))
