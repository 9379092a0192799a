"""The demo's comparison over several seeds and label fractions: mean and spread per method.

Trains supervised, cutmix_seg and pcr (the demo's recipe, configs/synthetic/) on the built-in
synthetic set at 1/16 (16) and 1/4 (64) of its 256 training images, for every seed, plus the
fully-labelled supervised ceiling; writes ``results.json`` (one row per run, appended as runs
finish, so an interrupted benchmark resumes) and ``results.md`` (mean ± std over seeds, and
PCR's per-seed margins over cutmix_seg and supervised).

    python benchmarks/replicate.py --seeds 0 1 2 --labels 16 64 --out runs/replicate
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from protoseg.cli.demo import (  # noqa: E402
    RunSpec,
    build_run_config,
    ensure_dataset,
    train_run,
)
from protoseg.data import DEFAULT_LABEL_COUNTS, DEFAULT_NUM_TRAIN  # noqa: E402


def mean_std(values: list[float]) -> str:
    """'mean ± std' (sample std; 0 for one value)."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {spread:.2f}"


def summarise(rows: list[dict], methods: list[str], labels: list[str]) -> str:
    """The Markdown summary of all finished runs."""

    def mious(method: str, label: str) -> dict[int, float]:
        return {
            r["seed"]: r["miou"]
            for r in rows
            if r["method"] == method and str(r["labeled"]) == label
        }

    lines = [
        "| method | " + " | ".join(f"{lab} labels" for lab in labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for method in methods:
        cells = [
            mean_std(list(mious(method, lab).values())) if mious(method, lab) else "-"
            for lab in labels
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    ceiling = mious("supervised", "full")
    if ceiling:
        lines.append(
            f"| supervised, all {DEFAULT_NUM_TRAIN} labelled (ceiling) | "
            f"{mean_std(list(ceiling.values()))}" + " |" * len(labels)
        )
    lines += [
        "",
        "PCR's margin, per seed (mean ± std of the differences):",
        "",
        "| margin | " + " | ".join(f"{lab} labels" for lab in labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for other in ("cutmix_seg", "supervised"):
        cells = []
        for lab in labels:
            pcr, base = mious("pcr", lab), mious(other, lab)
            diffs = [pcr[s] - base[s] for s in pcr if s in base]
            cells.append(
                mean_std(diffs) + f" (PCR ahead in {sum(d > 0 for d in diffs)}/{len(diffs)})"
                if diffs
                else "-"
            )
        lines.append(f"| pcr - {other} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    """Run (or resume) every seed x label fraction x method and write the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--labels", nargs="+", default=[str(n) for n in DEFAULT_LABEL_COUNTS])
    parser.add_argument("--methods", nargs="+", default=["supervised", "cutmix_seg", "pcr"])
    parser.add_argument(
        "--no-ceiling", action="store_true", help="skip the fully-labelled supervised runs"
    )
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="runs/replicate")
    args = parser.parse_args()
    out = Path(args.out)
    data_root = ensure_dataset(out / "data")
    results_file = out / "results.json"
    rows = json.loads(results_file.read_text()) if results_file.is_file() else []
    done = {(r["method"], str(r["labeled"]), r["seed"]) for r in rows}
    plan = [(m, lab, s) for s in args.seeds for lab in args.labels for m in args.methods]
    if not args.no_ceiling:
        plan += [("supervised", "full", s) for s in args.seeds]
    started = time.perf_counter()
    for method, label, seed in plan:
        if (method, label, seed) in done:
            continue
        spec = RunSpec(f"{method}_{label}_seed{seed}", f"synthetic/{method}.yaml", labeled=label)
        cfg = build_run_config(
            spec,
            data_root,
            out / spec.name,
            seed,
            args.iterations,
            args.device,
            ["train.progress=false"],
        )
        outcome = train_run(cfg, spec)
        rows.append(outcome.to_dict())
        results_file.write_text(json.dumps(rows, indent=2))
        print(f"{spec.name}: mIoU {outcome.miou:.2f} ({outcome.seconds:.0f} s)", flush=True)
    labels = list(args.labels)
    table = summarise(rows, args.methods, labels)
    header = (
        f"Synthetic benchmark, seeds {args.seeds}, recipe configs/synthetic/base.yaml"
        f"{f', {args.iterations} iterations' if args.iterations else ''}; wall time "
        f"{(time.perf_counter() - started) / 60:.1f} min for the runs not already done.\n"
    )
    (out / "results.md").write_text(header + "\n" + table + "\n")
    print("\n" + header + "\n" + table)


if __name__ == "__main__":
    main()
