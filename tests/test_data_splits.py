"""Split files: the real U2PL lists, the reader's tolerance, write/make round trips."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from protoseg.config import DataConfig
from protoseg.data import LAYOUTS, DataError, make_split, read_split, split_list, write_split


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
        write_split(path, ["ok", "two\nlines"], overwrite=True)


def test_write_split_keeps_an_existing_file_unless_told(tmp_path: Path) -> None:
    path = tmp_path / "labeled.txt"
    write_split(path, ["mine"])
    with pytest.raises(DataError) as info:
        write_split(path, ["other"])
    assert str(info.value).startswith(f"{path}: already exists; pass --force")
    assert path.read_text() == "mine\n"
    write_split(path, ["other"], overwrite=True)
    assert read_split(path) == ["other"]


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


def test_make_split_uses_a_repeated_name_once(caplog: pytest.LogCaptureFixture) -> None:
    names = ["a", "b", "a", "c", "b", "d"]
    with caplog.at_level(logging.WARNING):
        for seed in range(20):
            labeled, unlabeled = make_split(names, 2, seed)
            assert not set(labeled) & set(unlabeled)
            assert sorted(labeled + unlabeled) == ["a", "b", "c", "d"]
    assert "'a' on lines 1, 3; 'b' on lines 2, 5" in caplog.text
    with pytest.raises(DataError, match=r"num_labeled=5 must lie in \[1, 4\]"):
        make_split(names, 5, 0)


def test_split_list_warns_with_line_numbers_and_refuses_to_overwrite(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    names = tmp_path / "all.txt"
    names.write_text("img_0\nimg_1\n\nimg_2\nimg_1\nimg_3\n")
    out = tmp_path / "splits"
    with caplog.at_level(logging.WARNING):
        labeled_file, unlabeled_file = split_list(names, out, 2, seed=0)
    assert f"{names}: 1 names are listed more than once" in caplog.text
    assert "'img_1' on lines 2, 5" in caplog.text
    labeled, unlabeled = read_split(labeled_file), read_split(unlabeled_file)
    assert len(labeled) == 2 and sorted(labeled + unlabeled) == [f"img_{i}" for i in range(4)]
    # A second run refuses before writing either file; force replaces both.
    (out / "labeled.txt").unlink()
    with pytest.raises(DataError) as info:
        split_list(names, out, 3, seed=1)
    assert str(info.value).startswith(f"{out / 'unlabeled.txt'}: already exists; pass --force")
    assert not (out / "labeled.txt").exists() and read_split(unlabeled_file) == unlabeled
    split_list(names, out, 3, seed=1, force=True)
    assert len(read_split(labeled_file)) == 3 and len(read_split(unlabeled_file)) == 1
    with pytest.raises(DataError, match=r"--num-labeled 5 must lie in \[1, 4\].*all.txt"):
        split_list(names, tmp_path / "other", 5)
    # Every name labelled: the unlabelled list repeats them, as splits/full does.
    split_list(names, tmp_path / "full", 4)
    assert read_split(tmp_path / "full" / "unlabeled.txt") == read_split(
        tmp_path / "full" / "labeled.txt"
    )
