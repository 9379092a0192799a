"""The demo's run report: a Markdown page with the comparison table and PNG plots."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from protoseg.analysis.qualitative import load_val_examples, prediction_grid, pyplot
from protoseg.config import Config
from protoseg.files import atomic_write, atomic_write_text
from protoseg.inference import load

if TYPE_CHECKING:
    from matplotlib.figure import Figure


LOSS_PREFIX = "loss"
VAL_PREFIX = "val_miou_"
WARMUP_LABEL = "end of warm-up"


@dataclass
class RunCurves:
    """What the curves figure draws for one run, read from its ``history.json``.

    ``losses`` maps each logged loss term (the total ``loss`` first, then the others in the
    order they first appear) and ``val_miou`` each evaluated head to (steps, values).
    ``warmup_end`` is the first logged step with a loss term the first log line lacked: the
    end of a warm-up, when the unlabelled terms switch on; None when the terms never change.
    """

    name: str
    losses: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    val_miou: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    warmup_end: int | None = None


def curve_data(name: str, history: Sequence[dict[str, float]]) -> RunCurves:
    """Split a run's history into loss-term and validation series and find the warm-up's end.

    Training log lines are those holding the total ``loss``; other keys of those lines that
    do not start with ``loss`` (``lr``, ``grad_norm``, fractions) are not loss terms.
    """
    curves = RunCurves(name)
    first_terms: set[str] | None = None
    for entry in history:
        step = int(entry["step"])
        if LOSS_PREFIX in entry:
            terms = [k for k in entry if k.startswith(LOSS_PREFIX)]
            if first_terms is None:
                first_terms = set(terms)
            elif curves.warmup_end is None and not set(terms) <= first_terms:
                curves.warmup_end = step
            for term in sorted(terms, key=lambda k: k != LOSS_PREFIX):
                steps, values = curves.losses.setdefault(term, ([], []))
                steps.append(step)
                values.append(float(entry[term]))
        for key, value in entry.items():
            if key.startswith(VAL_PREFIX):
                steps, values = curves.val_miou.setdefault(key[len(VAL_PREFIX) :], ([], []))
                steps.append(step)
                values.append(float(value))
    return curves


def read_curves(rows: Sequence[Any]) -> list[RunCurves]:
    """``curve_data`` of every run whose folder holds a ``history.json`` (others are left out)."""
    found = []
    for row in rows:
        history_file = Path(row.out_dir) / "history.json"
        if history_file.is_file():
            found.append(curve_data(row.name, json.loads(history_file.read_text())))
    return found


def curves_figure(runs: Sequence[RunCurves]) -> Figure:
    """One panel per run with a line per loss term, then one panel of validation mIoU.

    The total jumps where a warm-up ends, because the unlabelled terms are added to it; the
    per-term lines and the dashed warm-up marker show that this is not a divergence. A term
    has the same colour in every panel, and one legend below the panels names them.
    """
    plt = pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    panels = len(runs) + 1
    cols = 2 if panels <= 4 else 3
    nrows = -(-panels // cols)
    fig, axes = plt.subplots(
        nrows,
        cols,
        figsize=(4.2 * cols, 2.7 * nrows + 0.5),
        squeeze=False,
        sharex=True,
        layout="constrained",
    )
    flat = list(axes.ravel())
    terms = list(dict.fromkeys(t for run in runs for t in run.losses if t != LOSS_PREFIX))
    colors = {t: f"C{i % 10}" for i, t in enumerate(terms)}
    styles: dict[str, dict[str, Any]] = {
        t: {"color": colors[t], "lw": 1.0, "zorder": 3} for t in terms
    }
    # The total is a wide translucent band under the terms: where it equals one term (a
    # supervised run, a warm-up) both stay visible.
    styles[LOSS_PREFIX] = {"color": "black", "lw": 2.4, "alpha": 0.45, "zorder": 2}
    for ax, run in zip(flat, runs):
        for term, (steps, values) in run.losses.items():
            # Markers only on short runs, where a lone logged step would draw no line.
            marker = "." if len(steps) < 20 else None
            ax.plot(steps, values, label=term, marker=marker, **styles[term])
        if run.warmup_end is not None:
            ax.axvline(run.warmup_end, color="0.4", ls="--", lw=1.0, label=WARMUP_LABEL)
        ax.set_title(run.name, fontsize=9)
        ax.set_ylabel("loss", fontsize=8)
        ax.tick_params(labelsize=7)
        # Losses span orders of magnitude (a consistency term is ~100x smaller than CE).
        if any(v > 0 for _, values in run.losses.values() for v in values):
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
    val_ax = flat[len(runs)]
    for i, run in enumerate(runs):
        dashes = ["-", ":", "-.", "--"]
        for j, (head, (steps, values)) in enumerate(run.val_miou.items()):
            label = run.name if len(run.val_miou) == 1 else f"{run.name} ({head})"
            val_ax.plot(
                steps, values, color=f"C{i % 10}", ls=dashes[j % 4], marker=".", label=label
            )
    for step in sorted({r.warmup_end for r in runs if r.warmup_end is not None}):
        val_ax.axvline(step, color="0.4", ls="--", lw=1.0)
    val_ax.set_title("validation mIoU", fontsize=9)
    val_ax.set_ylabel("mIoU (%)", fontsize=8)
    val_ax.tick_params(labelsize=7)
    if val_ax.lines:
        val_ax.legend(fontsize=7)
    else:
        val_ax.text(
            0.5,
            0.5,
            "no periodic validation\nin history.json (train.eval_every)",
            ha="center",
            va="center",
            transform=val_ax.transAxes,
            fontsize=8,
            color="0.4",
        )
    for ax in flat[panels:]:
        ax.set_visible(False)
    for ax in flat[:panels]:
        ax.set_xlabel("step", fontsize=8)
        ax.xaxis.set_tick_params(labelbottom=True)
    handles = [Line2D([], [], **styles[LOSS_PREFIX]), *(Line2D([], [], **styles[t]) for t in terms)]
    labels = [f"{LOSS_PREFIX} (total)", *terms]
    if any(r.warmup_end is not None for r in runs):
        handles.append(Line2D([], [], color="0.4", ls="--", lw=1.0))
        labels.append(WARMUP_LABEL + " (first step with new loss terms)")
    if runs:
        fig.legend(
            handles, labels, loc="outside lower center", ncols=min(len(labels), 4), fontsize=8
        )
    return fig


def training_curves(rows: Sequence[Any], path: Path) -> Path:
    """Save ``curves_figure`` of every run with a ``history.json``."""
    fig = curves_figure(read_curves(rows))
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=100))
    pyplot().close(fig)
    return path


def _run_iterations(row: Any) -> int | None:
    """The run's configured iterations, else its last logged step, else None."""
    folder = Path(row.out_dir)
    config_file = folder / "config.yaml"
    if config_file.is_file():
        train = (yaml.safe_load(config_file.read_text()) or {}).get("train") or {}
        if int(train.get("iterations") or 0) > 0:
            return int(train["iterations"])
    history_file = folder / "history.json"
    if history_file.is_file():
        steps = [int(h["step"]) for h in json.loads(history_file.read_text()) if "loss" in h]
        if steps:
            return max(steps)
    return None


def _distinct(values: Iterable[Any]) -> str:
    """Values joined by " / " once each in first-seen order ("16" or "16 / 64")."""
    return " / ".join(str(v) for v in dict.fromkeys(values))


def miou_title(rows: Sequence[Any]) -> str:
    """The bar chart's title: the runs' labelled-image counts, iterations and seeds."""
    iterations = [n for n in map(_run_iterations, rows) if n is not None]
    parts = [f"{_distinct(r.labeled for r in rows)} labelled images"]
    if iterations:
        parts.append(f"{_distinct(iterations)} iterations")
    parts.append(f"seed {_distinct(r.seed for r in rows)}")
    return "Final validation mIoU: " + ", ".join(parts)


def miou_figure(rows: Sequence[Any]) -> Figure:
    """Bar chart of final mIoU per run, titled by ``miou_title``."""
    plt = pyplot()
    title = miou_title(rows)
    # Wide enough for the title (~0.07 in per 9 pt character) as well as for the bars.
    width = max(4.5, 0.9 * len(rows) + 1.5, 0.07 * len(title) + 0.6)
    fig, ax = plt.subplots(figsize=(width, 3.4))
    names = [r.name for r in rows]
    values = [r.miou for r in rows]
    bars = ax.bar(range(len(rows)), values, color="#4C72B0")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("mIoU (%)")
    ax.set_ylim(0, max(values + [1.0]) * 1.15)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def miou_bar_chart(rows: Sequence[Any], path: Path) -> Path:
    """Save ``miou_figure``."""
    fig = miou_figure(rows)
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=100))
    pyplot().close(fig)
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
    # The split's first images, so the report's grid differs from `analyze qualitative`'s
    # seeded draw of the same split (the README shows both).
    _, images, masks = load_val_examples(cfg, count=examples, seed=None)
    palette = next(iter(predictors.values())).palette if predictors else []
    grid = prediction_grid(
        predictors,
        images,
        masks,
        palette,
        out / "predictions.png",
        cfg.data.ignore_index,
        class_names=class_names,
        title=f"The first {len(images)} validation images",
    )
    charts.append(grid)
    header = (
        "| run | labelled | mIoU (final) | mIoU (best) | "
        + " | ".join(class_names)
        + " | train s |"
    )
    lines = [
        "# protoseg demo report",
        "",
        "Every run uses the same synthetic data, seed, model and number of iterations; mIoU is "
        "on the synthetic validation split (whole image). In the training curves, the dashed "
        "line marks the end of a run's warm-up: from there the unlabelled loss terms are added "
        "to the total, which therefore jumps.",
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
    atomic_write_text(report, "\n".join(lines))
    return report
