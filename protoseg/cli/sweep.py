"""Hyper-parameter sweeps (e.g. the paper's Table 7 and Figure 3): one training per value.

``protoseg sweep CONFIG method.confidence_threshold=0.7,0.8,0.9`` trains one run per value
into ``<out>/<key>=<value>`` and collects each run's final mIoU into a CSV, a Markdown
table and a plot. Exactly one override may list several values (commas outside brackets,
so ``data.scale_range=[0.5,2.0]`` is one value). A run whose folder already holds its
final results is not trained again: delete the folder to retrain it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Registers every method's config dataclass, which load_config resolves method.name by;
# benchmarks/replicate.py's runs import this module without the CLI's entry point.
import protoseg.methods  # noqa: F401, E402
from protoseg.config import ConfigError, load_config
from protoseg.files import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

RESULT_PREFIX = "eval_final_"


def split_values(text: str) -> list[str]:
    """Split on commas that are not inside brackets or quotes: 'a,[1,2]' -> ['a', '[1,2]']."""
    parts: list[str] = []
    current: list[str] = []
    depth, quote = 0, ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts]


@dataclass
class SweepPlan:
    """One config, one swept key with its values, and the overrides every run shares."""

    config: str
    key: str
    values: list[str]
    overrides: list[str] = field(default_factory=list)
    out_dir: Path = Path("runs/sweep")

    def run_dir(self, value: str) -> Path:
        """The training folder of one value: ``<out>/<key>=<value>``."""
        # Slashes and spaces in a value would make nested or awkward folder names.
        return self.out_dir / re.sub(r"[/\\\s]+", "_", f"{self.key}={value}")

    def run_overrides(self, value: str) -> list[str]:
        """The overrides of the run for ``value``."""
        return [*self.overrides, f"{self.key}={value}", f"train.out_dir={self.run_dir(value)}"]

    def command(self, value: str, nproc: int = 1) -> list[str]:
        """The torchrun command line that trains the run for ``value``."""
        return [
            "torchrun",
            f"--nproc_per_node={nproc}",
            "-m",
            "protoseg.cli",
            "train",
            self.config,
            *self.run_overrides(value),
        ]


def plan_sweep(
    config: str, overrides: Sequence[str], out_dir: str | Path = "runs/sweep"
) -> SweepPlan:
    """Find the one swept ``key=v1,v2,...`` among the overrides and check every run's config."""
    swept: list[tuple[str, list[str], str]] = []
    shared: list[tuple[str, list[str], str]] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        if key.strip() == "train.out_dir":
            raise ConfigError("train.out_dir is set per run by the sweep; use --out DIR instead")
        values = split_values(value)
        (swept if len(values) > 1 else shared).append((key.strip(), values, item))
    if len(swept) != 1:
        found = ", ".join(k for k, _, _ in swept) or "none"
        raise ConfigError(
            f"a sweep needs exactly one override with several values, like "
            f"method.confidence_threshold=0.7,0.9 (found: {found})"
        )
    key, values, _ = swept[0]
    if any(not v for v in values) or len(set(values)) != len(values):
        raise ConfigError(f"{key}={','.join(values)}: values must be non-empty and distinct")
    plan = SweepPlan(config, key, values, [item for _, _, item in shared], Path(out_dir))
    for value in values:
        # Fail on a bad value before hours of training on the good ones.
        try:
            load_config(config, plan.run_overrides(value))
        except ConfigError as exc:
            raise ConfigError(f"sweep value {key}={value}: {exc}") from None
    return plan


def sweep_commands(plan: SweepPlan, nproc: int = 1) -> list[str]:
    """One shell-quoted torchrun line per value."""
    return [shlex.join(plan.command(value, nproc)) for value in plan.values]


@dataclass
class SweepRow:
    """One run's outcome; mIoU values are percentages, NaN where absent."""

    value: str
    run_dir: Path
    miou: dict[str, float]
    best_miou: float
    status: str


def _miou(path: Path) -> float:
    if not path.is_file():
        return math.nan
    value = json.loads(path.read_text()).get("miou")
    return math.nan if value is None else float(value)


def collect_one(plan: SweepPlan, value: str) -> SweepRow:
    """Read one run's eval_final_<head>.json files and eval_best.json."""
    run = plan.run_dir(value)
    files = sorted(run.glob(f"{RESULT_PREFIX}*.json")) if run.is_dir() else []
    miou = {p.stem[len(RESULT_PREFIX) :]: _miou(p) for p in files}
    done = any(not math.isnan(v) for v in miou.values())
    return SweepRow(value, run, miou, _miou(run / "eval_best.json"), "done" if done else "missing")


def collect(plan: SweepPlan) -> list[SweepRow]:
    """The collected row of every value, in the order given."""
    return [collect_one(plan, value) for value in plan.values]


def _train_in_process(plan: SweepPlan, value: str) -> None:
    from protoseg.distributed import cleanup
    from protoseg.engine.trainer import Trainer

    try:
        Trainer(load_config(plan.config, plan.run_overrides(value))).fit()
    finally:
        cleanup()


def _train_subprocess(plan: SweepPlan, value: str, nproc: int) -> None:
    # torch.distributed.run is torchrun; going through this interpreter avoids PATH issues.
    command = [sys.executable, "-m", "torch.distributed.run", *plan.command(value, nproc)[1:]]
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"training {plan.run_dir(value)} exited with {result.returncode}")


def run_sweep(plan: SweepPlan, nproc: int = 1) -> list[SweepRow]:
    """Train every run not yet finished (in process, or torchrun when nproc > 1); collect them.

    A run that fails is logged and marked 'failed'; the others still run.
    """
    failed = set()
    for value in plan.values:
        run = plan.run_dir(value)
        if collect_one(plan, value).status == "done":
            log.info("%s: already has final results, not retrained", run)
            continue
        log.info("sweep: training %s=%s into %s", plan.key, value, run)
        try:
            if nproc > 1:
                _train_subprocess(plan, value, nproc)
            else:
                _train_in_process(plan, value)
        except Exception as exc:  # noqa: BLE001 - one failed run must not end the sweep
            log.error("sweep: %s=%s failed: %s", plan.key, value, exc)
            failed.add(value)
    rows = collect(plan)
    for row in rows:
        if row.value in failed:
            row.status = "failed"
    return rows


def result_heads(rows: Sequence[SweepRow]) -> list[str]:
    """Every head with a final result in some run, the linear head first."""
    found = {head for r in rows for head in r.miou}
    return sorted(found, key=lambda h: (h != "linear", h))


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def write_report(plan: SweepPlan, rows: Sequence[SweepRow]) -> tuple[Path, Path, Path]:
    """Write sweep.csv, sweep.md and sweep.png (mIoU against the swept value) into the out dir."""
    out = plan.out_dir
    out.mkdir(parents=True, exist_ok=True)
    heads = result_heads(rows)
    csv_path = out / "sweep.csv"
    with io.StringIO(newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["key", "value", *(f"miou_{h}" for h in heads), "best_miou", "status", "run_dir"]
        )
        for r in rows:
            writer.writerow(
                [
                    plan.key,
                    r.value,
                    *(_fmt(r.miou.get(h, math.nan)) for h in heads),
                    _fmt(r.best_miou),
                    r.status,
                    str(r.run_dir),
                ]
            )
        atomic_write_text(csv_path, handle.getvalue())
    lines = [
        f"| {plan.key} | " + "".join(f"mIoU {h} | " for h in heads) + "best mIoU | status |",
        "|---|" + "---|" * (len(heads) + 2),
    ]
    lines += [
        f"| {r.value} | "
        + "".join(f"{_fmt(r.miou.get(h, math.nan))} | " for h in heads)
        + f"{_fmt(r.best_miou)} | {r.status} |"
        for r in rows
    ]
    md_path = out / "sweep.md"
    atomic_write_text(md_path, "\n".join(lines) + "\n")
    return csv_path, md_path, plot_sweep(plan.key, rows, out / "sweep.png")


def plot_sweep(key: str, rows: Sequence[SweepRow], path: Path) -> Path:
    """mIoU against the swept value, one line per head that has results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        xs = [float(r.value) for r in rows]
        ticks = None
    except ValueError:
        # Non-numeric values (names, lists) are placed evenly, labelled by their text.
        xs, ticks = list(range(len(rows))), [r.value for r in rows]
    order = sorted(range(len(rows)), key=lambda i: xs[i])
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for head in result_heads(rows):
        ys = [rows[i].miou.get(head, math.nan) for i in order]
        if all(math.isnan(y) for y in ys):
            continue
        ax.plot([xs[i] for i in order], ys, marker="o", label=f"{head} head")
    if ticks is not None:
        ax.set_xticks(xs, ticks, rotation=30, ha="right")
    ax.set_xlabel(key)
    ax.set_ylabel("final mIoU (%)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=110))
    plt.close(fig)
    return path
