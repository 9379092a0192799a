"""Split files: the real U2PL lists, the reader's tolerance, write/make round trips."""

from __future__ import annotations

from pathlib import Path

import pytest

from protoseg.config import DataConfig
from protoseg.data import LAYOUTS, DataError, make_split, read_split, write_split


def _manifest(shared_splits: Path) -> list[tuple[Path, int]]:
    rows = []
    for line in (shared_splits / "MANIFEST.tsv").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        rows.append((shared_splits / fields[0], int(fields[1])))
    return rows


def test_real_split_files_have_manifest_counts(shared_splits: Path) -> None:
    rows = _manifest(shared_splits)
    assert len(rows) >= 30
    for path, expected in rows:
        entries = read_split(path)
        assert len(entries) == expected, path
        assert all(entry == entry.strip() and entry for entry in entries), path


def test_real_cityscapes_lines_map_to_gtfine(shared_splits: Path, tmp_path: Path) -> None:
    cfg = DataConfig(root=str(tmp_path), layout="cityscapes", check_files=False)
    lines = read_split(shared_splits / "cityscapes" / "186" / "labeled.txt")
    assert lines[0] == "leftImg8bit/train/hamburg/hamburg_000000_080169_leftImg8bit.png"
    sample = LAYOUTS["cityscapes"](cfg, lines[0], True)
    assert sample.image == tmp_path / lines[0]
    expected = "gtFine/train/hamburg/hamburg_000000_080169_gtFine_labelTrainIds.png"
    assert sample.mask == tmp_path / expected
    assert sample.name == "hamburg_000000_080169"
    for line in read_split(shared_splits / "cityscapes" / "val.txt"):
        sample = LAYOUTS["cityscapes"](cfg, line, True)
        assert sample.mask is not None
        rel = sample.mask.relative_to(tmp_path).as_posix()
        assert rel.startswith("gtFine/val/") and rel.endswith("_gtFine_labelTrainIds.png")
        assert LAYOUTS["cityscapes"](cfg, line, False).mask is None


def test_real_voc_lines_map_to_jpeg_and_aug_masks(shared_splits: Path, tmp_path: Path) -> None:
    cfg = DataConfig(root=str(tmp_path), layout="voc", check_files=False)
    lines = read_split(shared_splits / "pascal" / "92" / "labeled.txt")
    for line in lines:
        sample = LAYOUTS["voc"](cfg, line, True)
        assert sample.image == tmp_path / "JPEGImages" / f"{line}.jpg"
        assert sample.mask == tmp_path / "SegmentationClassAug" / f"{line}.png"
    unlabeled = read_split(shared_splits / "pascal" / "92" / "unlabeled.txt")
    assert LAYOUTS["voc"](cfg, unlabeled[0], False).mask is None
    assert not set(lines) & set(unlabeled)


def test_reader_tolerates_whitespace_blank_lines_and_no_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "s.txt"
    path.write_bytes(b"\xef\xbb\xbf a \r\n\n\t\nb\r\n  c")
    assert read_split(path) == ["a", "b", "c"]


def test_reader_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match="nope.txt: split file not found; check data.root"):
        read_split(missing, "data.labeled_split")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="empty.txt: split file is empty"):
        read_split(empty)


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "labeled.txt"
    write_split(path, ["x1", "x2"])
    assert path.read_text() == "x1\nx2\n"
    assert read_split(path) == ["x1", "x2"]
    with pytest.raises(DataError, match="labeled.txt"):
        write_split(path, ["ok", "two\nlines"])


def test_make_split_is_a_seeded_partition() -> None:
    names = [f"n{i}" for i in range(50)]
    labeled, unlabeled = make_split(names, 12, seed=3)
    assert len(labeled) == 12 and len(unlabeled) == 38
    assert sorted(labeled + unlabeled) == sorted(names)
    assert make_split(names, 12, seed=3) == (labeled, unlabeled)
    assert make_split(names, 12, seed=4)[0] != labeled
    for bad in (0, 51, -1):
        with pytest.raises(DataError, match="num_labeled"):
            make_split(names, bad, seed=0)
