"""Which appearance modes each labelled split of a replication shows, beside its gap.

Every synthetic class comes in three modes drawn with probabilities 0.6 / 0.3 / 0.1, so 16
labelled images may miss a mode that the unlabelled (and validation) images have. For each
(data draw, labelled split) of a ``benchmarks/replicate.py`` folder this re-renders the
labelled images' objects (``protoseg.data.synthetic.scene_objects``) and prints the
(class, mode) pairs no labelled image shows, next to the supervised mIoU, the ceiling's and
their gap (means over the training seeds run):

    python benchmarks/label_coverage.py --out runs/replicate
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from protoseg.data.synthetic import MODES, SYNTHETIC_CLASSES, scene_objects

ALL_PAIRS = {(c, m) for c in MODES for m in range(len(MODES[c]))}


def missing_pairs(draw: Path, split: str) -> list[tuple[int, int]]:
    """(class, mode) pairs that no image of ``draw/splits/<split>/labeled.txt`` shows."""
    stamp_file, labeled = draw / "synthetic.json", draw / "splits" / split / "labeled.txt"
    for path in (stamp_file, labeled):
        if not path.is_file():
            raise SystemExit(f"{path}: missing; is {draw.parent.parent} a replicate.py folder?")
    stamp = json.loads(stamp_file.read_text())
    seen: set[tuple[int, int]] = set()
    for name in labeled.read_text().split():
        stem = Path(name).stem
        part, index = stem.rsplit("_", 1)
        for obj in scene_objects(stamp["seed"], part, int(index), stamp["image_size"]):
            seen.add((obj.class_id, obj.mode))
    return sorted(ALL_PAIRS - seen)


def mean_miou(rows: list[dict]) -> float | None:
    """Mean mIoU of some outcome rows, or None without any."""
    return statistics.mean(r["miou"] for r in rows) if rows else None


def main(argv: list[str] | None = None) -> int:
    """Print a Markdown table: one row per (draw, split) with supervised runs."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/replicate", help="a replicate.py output folder")
    p.add_argument("--labels", type=int, default=16)
    args = p.parse_args(argv)
    out = Path(args.out)
    if not (out / "runs" / "supervised").is_dir():
        raise SystemExit(
            f"{out}: no supervised runs; run benchmarks/replicate.py --out {out} first"
        )
    runs: dict[tuple[int, int | None], list[dict]] = defaultdict(list)
    for method in ("supervised", "supervised_full"):
        for f in sorted((out / "runs" / method).glob("*/outcome.json")):
            row = json.loads(f.read_text())
            runs[(row["data_seed"], row["split_seed"])].append(row)
    print("| draw | split | missing (class, mode) | supervised | ceiling | gap |")
    print("|---|---|---|---|---|---|")
    for draw, split in sorted(key for key in runs if key[1] is not None):
        rows = runs[(draw, split)]
        folder = out / "data" / f"draw{draw}"
        missing = missing_pairs(folder, f"{args.labels}-split{split}")
        names = ", ".join(f"{SYNTHETIC_CLASSES[c]} {m}" for c, m in missing)
        sup, ceiling = mean_miou(rows), mean_miou(runs.get((draw, None), []))
        gap = f"{ceiling - sup:.1f}" if sup is not None and ceiling is not None else "-"
        ceil_text = f"{ceiling:.2f}" if ceiling is not None else "-"
        print(f"| {draw} | {split} | {len(missing)}: {names} | {sup:.2f} | {ceil_text} | {gap} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
