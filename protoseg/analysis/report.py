"""The demo's run report: a Markdown page with the comparison table and PNG plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from protoseg.analysis.qualitative import load_val_examples, prediction_grid
from protoseg.config import Config
from protoseg.inference import load


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def miou_bar_chart(rows: Sequence[Any], path: Path) -> Path:
    """Bar chart of final mIoU per run."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) + 1.5), 3.2))
    names = [r.name for r in rows]
    values = [r.miou for r in rows]
    bars = ax.bar(range(len(rows)), values, color="#4C72B0")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("mIoU (%)")
    ax.set_ylim(0, max(values + [1.0]) * 1.15)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def training_curves(rows: Sequence[Any], path: Path) -> Path:
    """Training loss against step for every run (from each run's history.json)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for row in rows:
        history_file = Path(row.out_dir) / "history.json"
        if not history_file.is_file():
            continue
        points = [h for h in json.loads(history_file.read_text()) if "loss" in h]
        ax.plot([p["step"] for p in points], [p["loss"] for p in points], label=row.name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_demo_report(
    out: Path, rows: Sequence[Any], class_names: list[str], cfg: Config, examples: int = 4
) -> Path:
    """Write ``report.md``: the table, a bar chart, training curves and a prediction grid.

    ``cfg`` is one run's config; its validation split supplies the example images.
    """
    out = Path(out)
    charts = [miou_bar_chart(rows, out / "miou.png"), training_curves(rows, out / "curves.png")]
    predictors = {r.name: load(Path(r.out_dir) / "model.pt", head=r.head) for r in rows}
    _, images, masks = load_val_examples(cfg, count=examples, seed=0)
    palette = next(iter(predictors.values())).palette if predictors else []
    charts.append(prediction_grid(predictors, images, masks, palette, out / "predictions.png"))
    header = (
        "| run | labelled | mIoU (final) | mIoU (best) | "
        + " | ".join(class_names)
        + " | train s |"
    )
    lines = [
        "# protoseg demo report",
        "",
        "Every run uses the same synthetic data, seed, model and number of iterations; mIoU is "
        "on the synthetic validation split (whole image).",
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
    ]
    for r in rows:
        ious = " | ".join(f"{v:.1f}" if v == v else "-" for v in r.iou)
        lines.append(
            f"| {r.name} | {r.labeled} | {r.miou:.2f} | {r.best_miou:.2f} | {ious} | "
            f"{r.seconds:.0f} |"
        )
    lines += ["", *[f"![{c.stem}]({c.name})" for c in charts], ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
