"""``protoseg demo``: the paper's comparison, small enough for a CPU, on the synthetic set.

Pretrains the backbone on the synthetic classification set (once; cached), trains each
method from it with the same budget and seed on the built-in synthetic dataset, evaluates it,
prints a comparison table and writes a Markdown report with plots. On a CPU the runs train side
by side, one process of one thread each: a small model at 64 px uses one core better than
two, and the table does not depend on how many cores the machine has.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

# Registers every method's config dataclass, which load_config resolves method.name by;
# benchmarks/replicate.py's runs import this module without the CLI's entry point.
import protoseg.methods  # noqa: F401, E402
from protoseg.config import Config, load_config
from protoseg.data import DEFAULT_LABEL_COUNTS, SYNTHETIC_CLASSES, generate_synthetic
from protoseg.data.splits import DataError
from protoseg.data.synthetic import STAMP_FILE, synthetic_stamp
from protoseg.distributed import resolve_device
from protoseg.files import atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class RunSpec:
    """One training run of a comparison: a name, a method config file and overrides."""

    name: str
    config: str
    overrides: list[str] = field(default_factory=list)
    labeled: int | str = DEFAULT_LABEL_COUNTS[0]  # 1/16
    head: str = "linear"


@dataclass
class RunOutcome:
    """What one run measured."""

    name: str
    method: str
    labeled: int | str
    seed: int
    miou: float
    iou: list[float]
    best_miou: float
    seconds: float
    out_dir: str
    head: str = "linear"
    threads: int = 0  # torch's CPU threads it trained with: the numbers depend on them

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        return dict(self.__dict__)


def default_runs(full: bool = False, methods: list[str] | None = None) -> list[RunSpec]:
    """The runs of the demo; ``full`` adds Table 4 ablations, Table 6 augmentations, 1/4 labels."""
    runs = [
        RunSpec("supervised", "synthetic/supervised.yaml"),
        RunSpec("cutmix_seg", "synthetic/cutmix_seg.yaml"),
        RunSpec("pcr", "synthetic/pcr.yaml"),
    ]
    if full:
        runs += [
            RunSpec(
                "pcr_proto_only",
                "synthetic/pcr.yaml",
                ["method.linear_head=false"],
                head="prototype",
            ),
            RunSpec("pcr_no_update", "synthetic/pcr.yaml", ["method.prototypes.update=false"]),
            RunSpec("mean_teacher", "synthetic/mean_teacher.yaml"),
        ]
        for aug in ("cutout", "classmix"):
            runs += [
                RunSpec(
                    f"cutmix_seg_{aug}", "synthetic/cutmix_seg.yaml", [f"method.strong_aug={aug}"]
                ),
                RunSpec(f"pcr_{aug}", "synthetic/pcr.yaml", [f"method.strong_aug={aug}"]),
            ]
        quarter = DEFAULT_LABEL_COUNTS[1]
        runs += [
            RunSpec(f"{m}_{quarter}", f"synthetic/{m}.yaml", labeled=quarter)
            for m in ("supervised", "cutmix_seg", "pcr")
        ]
    if methods:
        runs = [r for r in runs if r.name in methods]
        if not runs:
            raise ValueError(
                f"no demo run is named {methods}; choose from "
                f"{[r.name for r in default_runs(full=True)]}"
            )
    return runs


def build_run_config(
    spec: RunSpec,
    data_root: Path,
    out_dir: Path,
    seed: int,
    iterations: int | None,
    device: str,
    extra: list[str] | None = None,
    pretrained: Path | None = None,
) -> Config:
    """The Config of one demo run: the shipped recipe plus the run's own overrides.

    ``pretrained`` is the backbone file every run of a comparison starts from (the cached
    output of ``protoseg pretrain``); None keeps the recipe's own ``model.pretrained``.
    """
    overrides = [
        *([f"model.pretrained={pretrained}"] if pretrained is not None else []),
        f"data.root={data_root}",
        f"data.labeled_split=splits/{spec.labeled}/labeled.txt",
        f"data.unlabeled_split=splits/{spec.labeled}/unlabeled.txt",
        f"train.out_dir={out_dir}",
        f"train.seed={seed}",
        f"train.device={device}",
        *spec.overrides,
        *(extra or []),
    ]
    if iterations:
        overrides.append(f"train.iterations={iterations}")
    return load_config(spec.config, overrides)


def _check_parallelism(jobs: int, threads: int | None) -> None:
    """Refuse a run count or thread count below one."""
    if jobs < 1 or (threads is not None and threads < 1):
        raise ValueError(f"--jobs {jobs} and --threads {threads} must be >= 1")


def _train_with_threads(run: tuple[Config, RunSpec], threads: int | None) -> RunOutcome:
    """Set this process's thread count (None: leave it), then train the run; a spawned
    worker's task, whose log goes to the run's train.log."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return train_run(*run)


def train_runs(
    runs: list[tuple[Config, RunSpec]], jobs: int = 1, threads: int | None = None
) -> list[RunOutcome]:
    """Train every run, ``jobs`` at a time, on ``threads`` threads each; outcomes in run order.

    With ``jobs`` 1 the runs train here, one after another. Otherwise each trains in a fresh
    spawned process (CUDA and PyTorch's thread pools do not survive a fork).
    """
    _check_parallelism(jobs, threads)
    if jobs == 1:
        outcomes = []
        for run in runs:
            log.info("demo: training %s", run[1].name)
            outcomes.append(_train_with_threads(run, threads))
        return outcomes
    log.info(
        "demo: training %s, %d at a time, %s thread(s) each; progress in <run>/train.log",
        ", ".join(spec.name for _, spec in runs),
        jobs,
        threads or "default",
    )
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(jobs, len(runs)), maxtasksperchild=1) as pool:
        pending = [pool.apply_async(_train_with_threads, (run, threads)) for run in runs]
        outcomes = []
        for (_, spec), result in zip(runs, pending):
            outcomes.append(result.get())
            log.info("demo: %s finished, mIoU %.2f", spec.name, outcomes[-1].miou)
    return outcomes


def train_run(cfg: Config, spec: RunSpec) -> RunOutcome:
    """Train (or resume/finish) one run and return its final and best mIoU."""
    import torch

    from protoseg.engine.trainer import Trainer

    result = Trainer(cfg).fit()
    final = result.final.get(spec.head) or next(iter(result.final.values()))
    best = result.best.miou if result.best is not None else final.miou
    return RunOutcome(
        spec.name,
        cfg.method.name,
        spec.labeled,
        cfg.train.seed,
        final.miou,
        final.iou,
        best,
        result.seconds,
        str(result.out_dir),
        spec.head,
        torch.get_num_threads(),
    )


# What generate_synthetic writes into its folder (and the demo may replace).
SYNTHETIC_OUTPUTS = ("JPEGImages", "SegmentationClass", "splits", "classes.txt", STAMP_FILE)


def _written_by_generator(stamp: Path) -> bool:
    """Whether ``stamp`` is a readable synthetic.json of some generator version."""
    try:
        data = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"version", "num_train", "seed"} <= data.keys()


def _generator_files(data_root: Path) -> tuple[list[Path], list[Path]]:
    """(files the synthetic generator writes, other files) in its output folders."""
    own: list[Path] = []
    foreign: list[Path] = []
    for name in SYNTHETIC_OUTPUTS:
        target = data_root / name
        if target.is_dir():
            for path in sorted(p for p in target.rglob("*") if not p.is_dir()):
                generated = _GENERATED.match(path.relative_to(data_root).as_posix())
                (own if generated else foreign).append(path)
        elif target.exists():
            own.append(target)
    return own, foreign


# The names generate_synthetic writes inside its folders (images, masks, split lists).
_GENERATED = re.compile(
    r"^(JPEGImages/(train|val)_\d{5}\.jpg|SegmentationClass/(train|val)_\d{5}\.png"
    r"|splits/(\d+|full)/(labeled|unlabeled)\.txt|splits/val\.txt)$"
)


def ensure_dataset(data_root: Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Generate the synthetic set unless ``data_root`` already holds this version of it.

    A set of another generator version is regenerated only with ``overwrite`` (``demo
    --overwrite``), and then only the files the generator writes are replaced; any other
    file in the folder, also inside ``JPEGImages/`` or ``splits/``, stays.
    """
    stamp = data_root / STAMP_FILE
    expected = synthetic_stamp(seed=seed)
    if stamp.is_file() and json.loads(stamp.read_text()) == expected:
        return data_root
    if data_root.exists() and any(data_root.iterdir()):
        if not _written_by_generator(stamp):
            raise DataError(
                f"{data_root} exists and holds no protoseg synthetic stamp ({STAMP_FILE}); "
                "it is left untouched: choose another --out folder, or delete it yourself"
            )
        own, foreign = _generator_files(data_root)
        if not overwrite:
            kept = (
                f"; {len(foreign)} other file(s) in it (e.g. {foreign[0]}) would stay"
                if foreign
                else ""
            )
            raise DataError(
                f"{data_root} holds a synthetic dataset of another generator version "
                f"({len(own)} generated files){kept}; pass --overwrite to regenerate it, or "
                "choose another --out folder"
            )
        log.info("replacing the synthetic dataset in %s (another generator version)", data_root)
        for path in own:
            path.unlink(missing_ok=True)
    log.info("generating the synthetic dataset in %s", data_root)
    generate_synthetic(data_root, seed=seed)
    return data_root


def ensure_backbone(
    cache_dir: Path, pretrained: str | None = None, device: str = "auto"
) -> Path | None:
    """The backbone file a comparison starts from.

    ``pretrained`` None: the synthetic pretraining's weights, cached in ``cache_dir`` (trained
    there first, about three minutes on two CPU cores, when absent); "none": random
    initialisation (the recipe's own value); anything else: that weights file.
    """
    if pretrained is None:
        from protoseg.engine.pretrain import ensure_pretrained

        # Absolute: runs may be launched from other folders (benchmarks/replicate.py's).
        return ensure_pretrained(cache_dir, device=device).file.resolve()
    if pretrained.lower() == "none":
        return None
    path = Path(pretrained)
    if not path.is_file():
        raise DataError(
            f"--pretrained {pretrained}: no such file; give a weights file written by "
            "`protoseg pretrain`, or 'none' for randomly initialised backbones"
        )
    return path.resolve()


def format_comparison(outcomes: list[RunOutcome], class_names: list[str]) -> str:
    """A text table: one row per run with mIoU, per-class IoU and training time."""
    names = [n[:10] for n in class_names]
    header = (
        f"{'run':<22}{'labels':>7}{'mIoU':>8}"
        + "".join(f"{n:>11}" for n in names)
        + f"{'train s':>9}"
    )
    lines = [header, "-" * len(header)]
    for o in outcomes:
        ious = "".join(f"{v:>11.1f}" if v == v else f"{'-':>11}" for v in o.iou)
        lines.append(f"{o.name:<22}{o.labeled:>7}{o.miou:>8.2f}{ious}{o.seconds:>9.0f}")
    return "\n".join(lines)


def run_demo(
    out: str | Path = "runs/demo",
    full: bool = False,
    methods: list[str] | None = None,
    seed: int = 0,
    iterations: int | None = None,
    device: str = "auto",
    pretrained: str | None = None,
    jobs: int | None = None,
    threads: int | None = None,
    overwrite: bool = False,
) -> list[RunOutcome]:
    """Run the comparison, print the table, write ``report.md`` with plots; return the rows.

    Every run starts from the same backbone: see :func:`ensure_backbone` for ``pretrained``.
    ``jobs`` runs train at once (default: on a CPU every run, up to max(3, CPU cores); on
    CUDA one), each on ``threads`` threads (default: 1 when several train at once on a CPU,
    else PyTorch's default). Results depend on the thread count, not on ``jobs``.
    ``overwrite`` lets a dataset of another generator version be regenerated.
    """
    out = Path(out)
    started = time.perf_counter()
    specs = default_runs(full, methods)  # never empty: an unknown name is refused there
    on_cpu = resolve_device(device).type == "cpu"
    if jobs is None:
        jobs = min(len(specs), max(3, os.cpu_count() or 1)) if on_cpu else 1
    if threads is None and on_cpu and jobs > 1:
        threads = 1
    _check_parallelism(jobs, threads)  # before the pretraining, not minutes into it
    backbone = ensure_backbone(out / "pretrained", pretrained, device)
    data_root = ensure_dataset(out / "data", overwrite=overwrite)
    extra = ["train.progress=false"] if jobs > 1 else []  # interleaved bars say nothing
    runs = []
    for spec in specs:
        cfg = build_run_config(
            spec, data_root, out / spec.name, seed, iterations, device, extra, backbone
        )
        runs.append((cfg, spec))
    outcomes = train_runs(runs, jobs, threads)
    table = format_comparison(outcomes, list(SYNTHETIC_CLASSES))
    atomic_write_text(out / "results.json", json.dumps([o.to_dict() for o in outcomes], indent=2))
    from protoseg.analysis.report import write_demo_report

    report = write_demo_report(out, outcomes, list(SYNTHETIC_CLASSES), cfg)
    elapsed = time.perf_counter() - started
    print("\n" + table)
    print(
        f"\ndemo finished in {elapsed / 60:.1f} min; report: {report}; runs and model files "
        f"under {out}/<run>/ (model.pt); TensorBoard: tensorboard --logdir {out}"
    )
    return outcomes
