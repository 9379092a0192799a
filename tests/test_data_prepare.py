"""Dataset preparation on small fixtures written in the real download formats.

VOC: palette PNGs under VOCdevkit/VOC2012/SegmentationClass and the ImageSets lists; SBD:
MATLAB files whose struct GTcls holds Segmentation, Boundaries and CategoriesPresent, as in
benchmark_RELEASE/dataset/cls; Cityscapes: 8-bit gtFine *_labelIds.png files.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse
from PIL import Image

from protoseg.config import DataConfig
from protoseg.data import (
    CITYSCAPES_LABEL_ID_TO_TRAIN_ID,
    DataError,
    build_dataset,
    eval_transform,
    prepare_cityscapes,
    prepare_voc,
    read_sbd_mat,
    read_split,
    save_mask_png,
    write_split,
)

H, W = 12, 16
VOC_TRAIN = ["2007_000032", "2007_000039"]
VOC_VAL = ["2007_000033", "2007_000042"]
# 2007_000039 has both an SBD and a VOC mask; 2007_000033 is in SBD but is a VOC val image.
SBD_TRAIN = ["2007_000039", "2008_000002", "2008_000003"]
SBD_VAL = ["2007_000033", "2008_000008"]
TRAIN_AUG = ["2007_000032", "2007_000039", "2008_000002", "2008_000003", "2008_000008"]


def _class_id(name: str) -> int:
    return int(name[-2:]) % 20 + 1


def _voc_mask(name: str) -> np.ndarray:
    """A VOC class mask: one object with the 255 band VOC draws along outlines."""
    mask = np.zeros((H, W), np.uint8)
    mask[3:9, 4:12] = 255
    mask[4:8, 5:11] = _class_id(name)
    return mask


def _sbd_mask(name: str) -> np.ndarray:
    """An SBD class mask: ids only, no 255 band; another shape than VOC's."""
    mask = np.zeros((H, W), np.uint8)
    mask[:, W // 2 :] = _class_id(name)
    return mask


def _write_sbd_mat(path: Path, segmentation: np.ndarray) -> None:
    """One cls/*.mat file in SBD's layout: struct GTcls with a cell of sparse boundaries."""
    boundaries = np.empty((20, 1), dtype=object)
    for c in range(20):
        boundaries[c, 0] = scipy.sparse.csc_matrix((H, W), dtype=bool)
    present = np.unique(segmentation[segmentation > 0]).astype(np.uint8)
    scipy.io.savemat(
        path,
        {
            "GTcls": {
                "Boundaries": boundaries,
                "Segmentation": segmentation,
                "CategoriesPresent": present,
            }
        },
    )


def _make_voc(root: Path) -> tuple[Path, Path]:
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    for name in sorted(set(VOC_TRAIN + VOC_VAL + SBD_TRAIN + SBD_VAL)):
        colour = np.full((H, W, 3), _class_id(name) * 10, np.uint8)
        Image.fromarray(colour).save(voc / "JPEGImages" / f"{name}.jpg", quality=90)
    for name in VOC_TRAIN + VOC_VAL:
        save_mask_png(_voc_mask(name), voc / "SegmentationClass" / f"{name}.png")
    write_split(voc / "ImageSets" / "Segmentation" / "train.txt", VOC_TRAIN)
    write_split(voc / "ImageSets" / "Segmentation" / "val.txt", VOC_VAL)
    sbd = root / "benchmark_RELEASE"
    (sbd / "dataset" / "cls").mkdir(parents=True)
    for name in SBD_TRAIN + SBD_VAL:
        _write_sbd_mat(sbd / "dataset" / "cls" / f"{name}.mat", _sbd_mask(name))
    write_split(sbd / "dataset" / "train.txt", SBD_TRAIN)
    write_split(sbd / "dataset" / "val.txt", SBD_VAL)
    return voc, sbd


def _u2pl_splits(root: Path, labeled: list[str]) -> Path:
    """A U2PL-style data/splits folder: pascal/<n>/{labeled,unlabeled}.txt and pascal/val.txt."""
    splits = root / "u2pl" / "data" / "splits"
    unlabeled = [n for n in TRAIN_AUG if n not in labeled]
    write_split(splits / "pascal" / str(len(labeled)) / "labeled.txt", labeled)
    write_split(splits / "pascal" / str(len(labeled)) / "unlabeled.txt", unlabeled)
    (splits / "pascal" / "val.txt").write_text("\n".join(VOC_VAL))  # no trailing newline
    write_split(splits / "cityscapes" / "val.txt", [CITY_LINE])
    return splits


def test_sbd_mat_reader(tmp_path: Path) -> None:
    path = tmp_path / "2008_000002.mat"
    _write_sbd_mat(path, _sbd_mask("2008_000002"))
    np.testing.assert_array_equal(read_sbd_mat(path), _sbd_mask("2008_000002"))
    scipy.io.savemat(tmp_path / "inst.mat", {"GTinst": {"Segmentation": _sbd_mask("2008_000002")}})
    with pytest.raises(DataError, match=r"inst.mat: holds no GTcls.Segmentation .*dataset/cls"):
        read_sbd_mat(tmp_path / "inst.mat")
    (tmp_path / "bad.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    with pytest.raises(DataError, match=r"bad.mat: cannot read this .mat file .*benchmark.tgz"):
        read_sbd_mat(tmp_path / "bad.mat")


def test_prepare_voc_merges_sbd_and_voc(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    voc, sbd = _make_voc(tmp_path)
    out = tmp_path / "data" / "VOC2012"
    with caplog.at_level(logging.WARNING):
        summary = prepare_voc(voc, sbd, out)
    # The fixture is not the full release: the counts are reported, not refused.
    assert "train_aug has 5 images (expected 10582) and val 2 (expected 1449)" in caplog.text
    assert not summary.complete
    assert (summary.train_aug, summary.val, summary.from_voc, summary.from_sbd) == (5, 2, 4, 3)
    assert summary.images == "symlink" and summary.split_files == []
    assert (out / "JPEGImages").is_symlink()
    assert (out / "JPEGImages").resolve() == (voc / "JPEGImages").resolve()
    masks = out / "SegmentationClassAug"
    assert sorted(p.stem for p in masks.glob("*.png")) == sorted(TRAIN_AUG + VOC_VAL)
    for name in TRAIN_AUG + VOC_VAL:
        image = Image.open(masks / f"{name}.png")
        assert image.mode == "L"
        # VOC's own masks win over SBD's (2007_000039, 2007_000033 are in both).
        from_voc = name in VOC_TRAIN + VOC_VAL
        expected = _voc_mask(name) if from_voc else _sbd_mask(name)
        np.testing.assert_array_equal(np.asarray(image), expected, err_msg=name)
    lists = out / "ImageSets" / "SegmentationAug"
    assert read_split(lists / "train_aug.txt") == TRAIN_AUG
    assert read_split(lists / "val.txt") == VOC_VAL
    # The result is what data.layout=voc reads.
    cfg = DataConfig(root=str(out), labeled_split=str(lists / "train_aug.txt"))
    dataset = build_dataset(cfg, "labeled", eval_transform(cfg))
    assert dataset[TRAIN_AUG.index("2008_000003")]["mask"].unique().tolist() == [0, 4]


def test_prepare_voc_installs_u2pl_splits_and_keeps_outputs(tmp_path: Path) -> None:
    voc, sbd = _make_voc(tmp_path)
    splits = _u2pl_splits(tmp_path, ["2007_000032", "2008_000003"])
    out = tmp_path / "out"
    summary = prepare_voc(voc, sbd, out, splits_dir=splits, workers=2)
    installed = out / "splits" / "pascal"
    assert sorted(p.relative_to(installed).as_posix() for p in summary.split_files) == [
        "2/labeled.txt",
        "2/unlabeled.txt",
        "val.txt",
    ]
    assert (installed / "val.txt").read_text() == "".join(f"{n}\n" for n in VOC_VAL)
    cfg = DataConfig(
        root=str(out),
        labeled_split="splits/pascal/2/labeled.txt",
        unlabeled_split="splits/pascal/2/unlabeled.txt",
        val_split="splits/pascal/val.txt",
    )
    for split in ("labeled", "unlabeled", "val"):
        assert len(build_dataset(cfg, split, eval_transform(cfg))) in (2, 3)
    # A second run refuses to rebuild what exists; --force does, and keeps the images.
    with pytest.raises(DataError) as info:
        prepare_voc(voc, sbd, out, splits_dir=splits)
    message = str(info.value)
    assert message.startswith(f"{out / 'SegmentationClassAug'}: already holds 7 masks")
    assert "pass --force" in message
    other = tmp_path / "other"
    write_split(other / "splits" / "pascal" / "val.txt", ["edited_by_hand"])
    with pytest.raises(DataError) as info:
        prepare_voc(voc, sbd, other, splits_dir=splits)
    assert str(info.value).startswith(f"{other / 'splits' / 'pascal' / 'val.txt'}: already exists")
    assert "pass --force" in str(info.value)
    assert not (other / "SegmentationClassAug").exists() and not (other / "JPEGImages").exists()
    (installed / "val.txt").write_text("edited_by_hand\n")
    prepare_voc(voc, sbd, out, splits_dir=splits, force=True)
    assert read_split(installed / "val.txt") == VOC_VAL
    assert len(list((voc / "JPEGImages").glob("*.jpg"))) == 7


def test_prepare_voc_copies_images_or_works_in_place(tmp_path: Path) -> None:
    voc, sbd = _make_voc(tmp_path)
    copied = prepare_voc(voc, sbd, tmp_path / "copy", copy_images=True)
    images = tmp_path / "copy" / "JPEGImages"
    assert copied.images == "copy" and not images.is_symlink()
    assert sorted(p.stem for p in images.glob("*.jpg")) == sorted(TRAIN_AUG + VOC_VAL)
    # Pointing --voc at VOCdevkit and --out at the VOC folder itself prepares it in place.
    in_place = prepare_voc(voc.parent, sbd / "dataset", voc)
    assert in_place.images == "in place"
    assert len(list((voc / "SegmentationClassAug").glob("*.png"))) == 7
    # A real folder in the way is never replaced by a link.
    mine = tmp_path / "mine"
    (mine / "JPEGImages").mkdir(parents=True)
    with pytest.raises(DataError) as info:
        prepare_voc(voc, sbd, mine, force=True)
    message = str(info.value)
    assert message.startswith(f"{mine / 'JPEGImages'}: already exists as a folder of its own")
    assert "protoseg deletes no images" in message
    assert not (mine / "SegmentationClassAug").exists()


def test_prepare_voc_bad_downloads_name_the_folder_and_the_fix(tmp_path: Path) -> None:
    voc, sbd = _make_voc(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        prepare_voc(tmp_path / "nowhere", sbd, out)
    assert str(info.value).startswith(f"{tmp_path / 'nowhere'}: folder not found")
    assert "VOCtrainval_11-May-2012.tar" in str(info.value)
    with pytest.raises(DataError) as info:
        prepare_voc(voc, tmp_path, out)
    assert str(info.value).startswith(f"{tmp_path / 'dataset' / 'cls'}: folder not found")
    assert "benchmark.tgz" in str(info.value)
    (sbd / "dataset" / "val.txt").rename(sbd / "val.txt.bak")
    with pytest.raises(DataError, match=r"val.txt: SBD image list not found.*benchmark.tgz"):
        prepare_voc(voc, sbd, out)
    (sbd / "val.txt.bak").rename(sbd / "dataset" / "val.txt")
    (sbd / "dataset" / "cls" / "2008_000008.mat").unlink()
    (sbd / "dataset" / "cls" / "2008_000003.mat").unlink()
    with pytest.raises(DataError) as info:
        prepare_voc(voc, sbd, out)
    message = str(info.value)
    assert message.startswith(f"{sbd / 'dataset' / 'cls' / '2008_000003.mat'}: SBD class mask")
    assert "(2 missing in all)" in message and "re-extract" in message
    assert not out.exists()  # nothing is written before the checks pass
    _write_sbd_mat(sbd / "dataset" / "cls" / "2008_000003.mat", _sbd_mask("2008_000003"))
    _write_sbd_mat(sbd / "dataset" / "cls" / "2008_000008.mat", _sbd_mask("2008_000008"))
    (voc / "SegmentationClass").rename(voc / "SegmentationClass.bak")
    with pytest.raises(DataError, match=r"SegmentationClass: folder not found; --voc must be"):
        prepare_voc(voc, sbd, out)
    (voc / "SegmentationClass.bak").rename(voc / "SegmentationClass")


def test_prepare_voc_bad_masks_and_splits(tmp_path: Path) -> None:
    voc, sbd = _make_voc(tmp_path)
    # SegmentationObject PNGs look alike but hold instance numbers.
    instances = np.arange(H * W, dtype=np.uint8).reshape(H, W) % 40
    save_mask_png(instances, voc / "SegmentationClass" / "2007_000042.png")
    with pytest.raises(DataError) as info:
        prepare_voc(voc, sbd, tmp_path / "a")
    message = str(info.value)
    assert message.startswith(f"{voc / 'SegmentationClass' / '2007_000042.png'}: values 21, 22")
    assert "SegmentationObject instead of SegmentationClass" in message
    save_mask_png(_voc_mask("2007_000042"), voc / "SegmentationClass" / "2007_000042.png")
    # Split lists from another dataset version are refused before anything is written.
    splits = _u2pl_splits(tmp_path, ["2007_000032", "2011_999999"])
    with pytest.raises(DataError) as info:
        prepare_voc(voc, sbd, tmp_path / "b", splits_dir=splits)
    message = str(info.value)
    assert message.startswith(f"{splits / 'pascal' / '2' / 'labeled.txt'}, line 2: '2011_999999'")
    assert "is not in train_aug" in message and not (tmp_path / "b").exists()
    with pytest.raises(DataError) as info:
        prepare_voc(voc, sbd, tmp_path / "c", splits_dir=splits / "cityscapes")
    assert str(info.value).startswith(f"{splits / 'cityscapes'}: no pascal/ folder")
    assert "U2PL code release" in str(info.value)


def test_real_u2pl_pascal_lists_are_checked_against_the_prepared_set(
    tmp_path: Path, shared_splits: Path
) -> None:
    voc, sbd = _make_voc(tmp_path)
    with pytest.raises(DataError) as info:
        prepare_voc(voc, sbd, tmp_path / "out", splits_dir=shared_splits)
    # The real lists name images the small fixture lacks: the first file and line say so.
    assert ", line 1: '" in str(info.value)
    assert str(info.value).startswith(str(shared_splits / "pascal"))


CITY_LINE = "leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png"
CITY_FILES = {
    "train": "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png",
    "val": "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png",
}


def _make_cityscapes(root: Path) -> np.ndarray:
    label_ids = np.arange(H * W, dtype=np.uint8).reshape(H, W) % 35
    label_ids[0, :3] = 255  # how the -1 'license plate' id is stored
    for rel in CITY_FILES.values():
        (root / rel).parent.mkdir(parents=True)
        Image.fromarray(label_ids).save(root / rel)
        image = root / rel.replace("gtFine", "leftImg8bit", 1).replace(
            "_gtFine_labelIds", "_leftImg8bit"
        )
        image.parent.mkdir(parents=True)
        Image.new("RGB", (W, H), (90, 90, 90)).save(image)
    return label_ids


def test_prepare_cityscapes_writes_train_ids(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    label_ids = _make_cityscapes(tmp_path)
    with caplog.at_level(logging.WARNING):
        summary = prepare_cityscapes(tmp_path, splits_dir=_u2pl_splits(tmp_path, TRAIN_AUG[:2]))
    assert "gtFine holds 1 train and 1 val label files (expected 2975 and 500)" in caplog.text
    assert summary.written == {"train": 1, "val": 1} and summary.kept == {}
    assert not summary.complete
    train_ids = CITYSCAPES_LABEL_ID_TO_TRAIN_ID[label_ids]
    for rel in CITY_FILES.values():
        made = tmp_path / rel.replace("_labelIds", "_labelTrainIds")
        assert Image.open(made).mode == "L"
        np.testing.assert_array_equal(np.asarray(Image.open(made)), train_ids)
    assert set(np.unique(train_ids)) == set(range(19)) | {255}
    assert summary.split_files == [tmp_path / "splits" / "cityscapes" / "val.txt"]
    # The dataset now reads the prepared file, and sees what mapping on load gave.
    cfg = DataConfig(
        root=str(tmp_path),
        layout="cityscapes",
        num_classes=19,
        val_split=str(summary.split_files[0]),
    )
    prepared = build_dataset(cfg, "val", eval_transform(cfg))
    assert not prepared.samples[0].map_ids
    (tmp_path / CITY_FILES["val"].replace("_labelIds", "_labelTrainIds")).rename(tmp_path / "x.png")
    mapped = build_dataset(cfg, "val", eval_transform(cfg))
    assert mapped.samples[0].map_ids
    (tmp_path / "x.png").rename(tmp_path / CITY_FILES["val"].replace("_labelIds", "_labelTrainIds"))
    assert np.array_equal(prepared.load_mask(0), mapped.load_mask(0))
    # Existing train-id files are kept (a resumed run), or rewritten with force.
    again = prepare_cityscapes(tmp_path)
    assert again.written == {} and again.kept == {"train": 1, "val": 1}
    assert prepare_cityscapes(tmp_path, force=True, workers=2).written == {"train": 1, "val": 1}


def test_prepare_cityscapes_bad_input(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        prepare_cityscapes(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'gtFine'}: folder not found")
    assert "gtFine_trainvaltest.zip" in message
    _make_cityscapes(tmp_path)
    with pytest.raises(DataError, match=r"pass its parent"):
        prepare_cityscapes(tmp_path / "gtFine")
    rgb = tmp_path / CITY_FILES["train"]
    Image.new("RGB", (W, H)).save(rgb)
    with pytest.raises(DataError) as info:
        prepare_cityscapes(tmp_path)
    assert str(info.value).startswith(f"{rgb}: mode 'RGB', but a labelIds file is an 8-bit")
    splits = tmp_path / "splits_src" / "cityscapes"
    write_split(splits / "val.txt", ["leftImg8bit/val/frankfurt/nope_leftImg8bit.png"])
    Image.new("L", (W, H)).save(rgb)
    with pytest.raises(DataError) as info:
        prepare_cityscapes(tmp_path, splits_dir=splits.parent)
    message = str(info.value)
    assert message.startswith(f"{splits / 'val.txt'}, line 1: ")
    assert "has no nope_gtFine_labelIds.png" in message
