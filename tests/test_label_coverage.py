"""benchmarks/label_coverage.py on a hand-made replicate.py folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import imported_benchmark

from protoseg.data.synthetic import MODES, scene_objects


@pytest.fixture(scope="module")
def cov():
    """The benchmark script, imported as a module."""
    yield from imported_benchmark("label_coverage")


def outcome(folder: Path, split: int | None, miou: float) -> None:
    folder.mkdir(parents=True)
    row = {"data_seed": 0, "split_seed": split, "miou": miou}
    (folder / "outcome.json").write_text(json.dumps(row))


def test_missing_pairs_and_gap_of_each_split(cov, synthetic_root, tmp_path, capsys):
    draw = tmp_path / "data" / "draw0"
    (draw / "splits" / "2-split0").mkdir(parents=True)
    shutil.copy(synthetic_root / "synthetic.json", draw)
    (draw / "splits" / "2-split0" / "labeled.txt").write_text("train_00003\ntrain_00007\n")
    outcome(tmp_path / "runs" / "supervised" / "d0-s0-t0", 0, 40.0)
    outcome(tmp_path / "runs" / "supervised" / "d0-s0-t1", 0, 44.0)
    outcome(tmp_path / "runs" / "supervised_full" / "d0-sfull-t0", None, 55.0)
    assert cov.main(["--out", str(tmp_path), "--labels", "2"]) == 0
    seen = {(o.class_id, o.mode) for i in (3, 7) for o in scene_objects(0, "train", i, 64)}
    expected = 3 * len(MODES) - len(seen)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    # Supervised is the mean over its seeds; the gap is to the ceiling's mean.
    assert last.startswith(f"| 0 | 0 | {expected}: ") and last.endswith("| 42.00 | 55.00 | 13.0 |")


def test_a_folder_without_runs_is_named(cov, tmp_path):
    with pytest.raises(SystemExit, match="no supervised runs; run benchmarks/replicate.py"):
        cov.main(["--out", str(tmp_path)])
