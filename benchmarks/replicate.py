"""Variance of the synthetic comparison along three axes: data draw, labelled split, seed.

Each run varies the generated dataset (``--data-seeds``, the generator seed; one folder
``OUT/data/draw{d}`` per draw), the labelled split (``--split-seeds``: ``--labels`` images
drawn from ``splits/full`` into ``splits/{count}-split{s}``) and the training seed
(``--seeds``). ``--design axes`` runs the baseline (first value of every axis) plus each axis
varied alone; ``--design grid`` runs the full product. Every method gets the same runs, plus
the fully labelled supervised ceiling per (draw, seed) unless ``--no-ceiling``. Every run
starts from the same pretrained backbone (``protoseg pretrain``'s, made once in
``OUT/pretrained``; ``--pretrained none`` for random initialisation). Runs live in
``OUT/runs/<method>/d{d}-s{s}-t{t}/``; one with an ``outcome.json`` is done and skipped, an
unfinished one restarts and the Trainer resumes from its checkpoint. Writes ``results.json``
(one row per run) and ``results.md`` (spread per axis, paired tests, per-draw table).

The README's comparisons at the shipped recipe (800 iterations): every recipe over the five
draws, and supervised over draw 0's five labelled splits, two at a time:

    python benchmarks/replicate.py --methods supervised mean_teacher cutmix_seg pcr fixmatch \
        fixmatch+pcr unimatch unimatch+pcr u2pl u2pl+pcr cps cps+pcr --data-seeds 0 1 2 3 4 \
        --split-seeds 0 --seeds 0 --design grid --jobs 2 --out runs/rep800
    python benchmarks/replicate.py --methods supervised --data-seeds 0 --split-seeds 0 1 2 3 4 \
        --seeds 0 --design grid --jobs 2 --out runs/rep800

and those of the previous recipe add ``--iterations 400`` (README, "At the previous recipe").
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CEILING = "supervised_full"  # the supervised recipe with every training image labelled
AXES = ("data_seed", "split_seed", "train_seed")


@dataclass(frozen=True)
class Run:
    """One planned training run; ``split_seed`` is None for the fully labelled ceiling."""

    method: str
    data_seed: int
    split_seed: int | None
    train_seed: int

    @property
    def key(self) -> tuple[int, int | None, int]:
        """What paired comparisons match on: identical data, split and seed."""
        return (self.data_seed, self.split_seed, self.train_seed)

    def folder(self, out: Path) -> Path:
        """``OUT/runs/<method>/d{d}-s{s}-t{t}`` (``s`` is ``full`` for the ceiling)."""
        split = "full" if self.split_seed is None else self.split_seed
        return out / "runs" / self.method / f"d{self.data_seed}-s{split}-t{self.train_seed}"


def shipped_methods() -> list[str]:
    """The recipes in the shipped ``configs/synthetic/`` (supervised first), without base."""
    from protoseg.config import shipped_config_dir

    names = sorted(p.stem for p in (shipped_config_dir() / "synthetic").glob("*.yaml"))
    names = [n for n in names if n != "base"]
    return sorted(names, key=lambda n: n != "supervised")


def design_points(
    data: list[int], splits: list[int], seeds: list[int], design: str
) -> list[tuple[int, int, int]]:
    """The (data, split, seed) triples of a design: ``axes`` or the full ``grid``."""
    if design == "grid":
        return [(d, s, t) for d in data for s in splits for t in seeds]
    d0, s0, t0 = data[0], splits[0], seeds[0]
    points = [(d0, s0, t0)]
    points += [(d, s0, t0) for d in data[1:]]
    points += [(d0, s, t0) for s in splits[1:]]
    points += [(d0, s0, t) for t in seeds[1:]]
    return list(dict.fromkeys(points))  # a repeated value on an axis is one run, not two


def plan_runs(
    methods: list[str],
    data: list[int],
    splits: list[int],
    seeds: list[int],
    design: str = "axes",
    ceiling: bool = True,
) -> list[Run]:
    """Every run of the benchmark; the ceiling covers each (draw, seed) pair of the design."""
    points = design_points(data, splits, seeds, design)
    runs = [Run(m, d, s, t) for m in methods for d, s, t in points]
    if ceiling:
        pairs = dict.fromkeys((d, t) for d, _, t in points)
        runs += [Run(CEILING, d, None, t) for d, t in pairs]
    return runs


def recipe(method: str) -> str:
    """The shipped config a method trains with (the ceiling is the supervised recipe)."""
    return f"synthetic/{'supervised' if method == CEILING else method}.yaml"


def ensure_split(root: Path, count: int, split_seed: int) -> str:
    """Write ``splits/{count}-split{s}`` once (reused afterwards); return its folder name."""
    from protoseg.data.splits import split_list

    name = f"{count}-split{split_seed}"
    folder = root / "splits" / name
    if not ((folder / "labeled.txt").is_file() and (folder / "unlabeled.txt").is_file()):
        # force: a lone file left by an interrupted write is redrawn identically (same seed).
        split_list(root / "splits/full/labeled.txt", folder, count, seed=split_seed, force=True)
    return name


def run_one(task: dict) -> dict:
    """Train one run in this process with ``task['threads']`` threads; write outcome.json."""
    import torch

    from protoseg.cli.demo import RunSpec, build_run_config, train_run

    torch.set_num_threads(task["threads"])
    spec = RunSpec(task["method"], task["config"], labeled=task["labeled"])
    out_dir = Path(task["out_dir"])
    extra = ["train.progress=false", *task["extra"]]
    cfg = build_run_config(
        spec,
        Path(task["data_root"]),
        out_dir,
        task["train_seed"],
        task["iterations"],
        task["device"],
        extra,
    )
    row = train_run(cfg, spec).to_dict()
    row.update({k: task[k] for k in ("method", *AXES)})  # "threads" is measured by train_run
    row["recipe"] = task["config"]
    tmp = out_dir / "outcome.json.tmp"  # replaced atomically: a half-written file is no result
    tmp.write_text(json.dumps(row, indent=2))
    os.replace(tmp, out_dir / "outcome.json")
    return row


def launch(task: dict) -> int:
    """Run one task in its own Python process, thread-limited; its log goes to its folder."""
    env = dict(os.environ, OMP_NUM_THREADS=str(task["threads"]))
    env["MKL_NUM_THREADS"] = str(task["threads"])
    out_dir = Path(task["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-one", json.dumps(task)]
    with open(out_dir / "replicate.log", "a") as log:
        return subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode


def run_pending(tasks: list[dict], jobs: int) -> list[str]:
    """Launch every task whose outcome.json is missing, ``jobs`` at a time; return failures."""
    todo = [t for t in tasks if not (Path(t["out_dir"]) / "outcome.json").is_file()]
    failed: list[str] = []

    def one(task: dict) -> None:
        code = launch(task)
        done = Path(task["out_dir"]) / "outcome.json"
        if code == 0 and done.is_file():
            row = json.loads(done.read_text())
            print(f"{task['out_dir']}: mIoU {row['miou']:.2f} ({row['seconds']:.0f} s)", flush=True)
        else:
            failed.append(task["out_dir"])
            print(f"{task['out_dir']}: FAILED (exit {code}), see replicate.log there", flush=True)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, todo))
    return failed


def mean_std(values: list[float]) -> str:
    """'mean ± sample std' ('-' for no values, std 0 for one)."""
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {spread:.2f}"


def r_key(row: dict) -> tuple:
    """A result row's (data, split, seed)."""
    return tuple(row[a] for a in AXES)


def axis_spread(rows: list[dict], axis: str, base: dict) -> tuple[float | None, int]:
    """Sample std of the runs where only ``axis`` moves from ``base`` (baseline included)."""
    others = [a for a in AXES if a != axis]
    values = [r["miou"] for r in rows if all(r[a] == base[a] for a in others)]
    return (statistics.stdev(values) if len(values) > 1 else None), len(values)


def paired(rows: list[dict], a: str, b: str) -> list[tuple[float, float]]:
    """(a, b) mIoU pairs over the runs both have with identical (data, split, seed)."""
    by_b = {r_key(r): r["miou"] for r in rows if r["method"] == b}
    return [(r["miou"], by_b[r_key(r)]) for r in rows if r["method"] == a and r_key(r) in by_b]


def paired_tests(pairs: list[tuple[float, float]]) -> tuple[float | None, float | None]:
    """Paired t-test and two-sided sign-test p-values (None where undefined)."""
    from scipy.stats import binomtest, ttest_rel

    diffs = [a - b for a, b in pairs]
    if len(diffs) < 2:
        return None, None
    nonzero = [d for d in diffs if d != 0]
    sign = float(binomtest(sum(d > 0 for d in nonzero), len(nonzero)).pvalue) if nonzero else None
    if statistics.stdev(diffs) == 0:
        return None, sign  # t is undefined when every difference is the same
    with warnings.catch_warnings():  # nearly equal differences only warn of precision loss
        warnings.simplefilter("ignore", RuntimeWarning)
        t_p = float(ttest_rel([a for a, _ in pairs], [b for _, b in pairs]).pvalue)
    return t_p, sign


def default_pairs(methods: list[str]) -> list[tuple[str, str]]:
    """Each method vs supervised, pcr vs cutmix_seg, X+pcr vs X: those present in methods."""
    pairs = [(m, "supervised") for m in methods if m not in ("supervised", CEILING)]
    pairs += [("pcr", "cutmix_seg")]
    pairs += [(m, m.removesuffix("+pcr")) for m in methods if m.endswith("+pcr")]
    pairs = [(a, b) for a, b in pairs if a in methods and b in methods]
    return list(dict.fromkeys(pairs))


def fmt(x: float | None, digits: int = 2) -> str:
    """A table cell: '-' for None; ``digits=0`` gives 3 significant digits (p-values)."""
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if digits else f"{x:.3g}"


def at_baseline(rows: list[dict], method: str, draw: int, base: dict) -> float | None:
    """A method's mIoU on one data draw with split and seed at the baseline."""
    split = None if method == CEILING else base["split_seed"]
    key = (draw, split, base["train_seed"])
    hits = [r["miou"] for r in rows if r["method"] == method and r_key(r) == key]
    return hits[0] if hits else None


def spread_table(rows: list[dict], methods: list[str], base: dict) -> list[str]:
    """Per method: mean ± std over all runs and the std along each axis alone."""
    lines = ["| method | runs | mean ± std | std: data draw | std: split | std: seed |"]
    lines += ["|---|---|---|---|---|---|"]
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        # The ceiling has no split: its baseline is the full labelled list.
        mbase = dict(base, split_seed=None) if m == CEILING else base
        spreads = [axis_spread(mine, axis, mbase) for axis in AXES]
        cells = [f"{fmt(std)} (n={n})" if std is not None else "-" for std, n in spreads]
        overall = mean_std([r["miou"] for r in mine])
        lines.append(f"| {m} | {len(mine)} | {overall} | " + " | ".join(cells) + " |")
    return lines


def ceiling_table(rows: list[dict], draws: list[int], base: dict) -> list[str]:
    """Per data draw: the ceiling, supervised and the gap between them (baseline seed)."""
    lines = ["| data draw | ceiling | supervised | gap |", "|---|---|---|---|"]
    for d in draws:
        ceil, sup = at_baseline(rows, CEILING, d, base), at_baseline(rows, "supervised", d, base)
        gap = ceil - sup if ceil is not None and sup is not None else None
        lines.append(f"| {d} | {fmt(ceil)} | {fmt(sup)} | {fmt(gap)} |")
    return lines


def paired_table(rows: list[dict], methods: list[str]) -> list[str]:
    """Per default pair: the paired differences, how often a leads, and both p-values."""
    lines = ["| a - b | n | mean ± std | a ahead | t-test p | sign-test p |"]
    lines += ["|---|---|---|---|---|---|"]
    for a, b in default_pairs(methods):
        pairs = paired(rows, a, b)
        diffs = [x - y for x, y in pairs]
        t_p, s_p = paired_tests(pairs)
        ahead = f"{sum(d > 0 for d in diffs)}/{len(diffs)}"
        lines.append(
            f"| {a} - {b} | {len(diffs)} | {mean_std(diffs)} | {ahead} | "
            f"{fmt(t_p, 0)} | {fmt(s_p, 0)} |"
        )
    return lines


def draw_table(rows: list[dict], methods: list[str], draws: list[int], base: dict) -> list[str]:
    """Methods x data draws at the baseline split and seed, each cell with its rank."""
    lines = ["| method | " + " | ".join(f"draw {d}" for d in draws) + " |"]
    lines += ["|---|" + "---|" * len(draws)]
    order = {}
    for d in draws:
        scored = [(v, m) for m in methods if (v := at_baseline(rows, m, d, base)) is not None]
        order[d] = [m for _, m in sorted(scored, reverse=True) if m != CEILING]
    for m in methods:
        cells = []
        for d in draws:
            v = at_baseline(rows, m, d, base)
            rank = f" ({order[d].index(m) + 1})" if m in order[d] else ""
            cells.append("-" if v is None else f"{v:.2f}{rank}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def class_table(rows: list[dict], methods: list[str]) -> list[str]:
    """Per method: each class's IoU, mean over its runs (where a method wins or loses)."""
    from protoseg.data import SYNTHETIC_CLASSES

    lines = ["| method | runs | " + " | ".join(SYNTHETIC_CLASSES) + " |"]
    lines += ["|---|---|" + "---|" * len(SYNTHETIC_CLASSES)]
    for m in methods:
        ious = [
            r["iou"]
            for r in rows
            if r["method"] == m and len(r.get("iou", [])) == len(SYNTHETIC_CLASSES)
        ]
        if not ious:
            continue
        means = [
            statistics.mean(v for v in column if v == v) if any(v == v for v in column) else None
            for column in zip(*ious)
        ]
        lines.append(f"| {m} | {len(ious)} | " + " | ".join(fmt(v, 1) for v in means) + " |")
    return lines


def summarise(rows: list[dict], base: dict, header: str = "") -> str:
    """The Markdown summary: spread per axis, ceiling gap, paired tests, per-draw table."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    draws = sorted({r["data_seed"] for r in rows})
    at = f"split {base['split_seed']}, seed {base['train_seed']}"
    lines = [header, "", "## mIoU per method, and its std along each axis alone", ""]
    lines += spread_table(rows, methods, base)
    if CEILING in methods:
        lines += ["", f"Ceiling (all labelled) vs supervised per data draw ({at}):", ""]
        lines += ceiling_table(rows, draws, base)
    lines += ["", "## Paired differences (same data draw, split and seed)", ""]
    lines += paired_table(rows, methods)
    lines += ["", f"## mIoU per data draw ({at}; rank among the methods in brackets)", ""]
    lines += draw_table(rows, methods, draws, base)
    lines += ["", "## IoU per class (mean over each method's runs)", ""]
    lines += class_table(rows, methods)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Plan, run what is missing (``--jobs`` at a time) and write the summary."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=None, help="default: configs/synthetic/*")
    p.add_argument("--data-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--split-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--design", choices=("axes", "grid"), default="axes")
    p.add_argument("--labels", type=int, default=16, help="labelled images per split")
    p.add_argument("--no-ceiling", action="store_true", help="skip the fully labelled runs")
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--extra", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--pretrained",
        default=None,
        help="backbone every run starts from: default, the synthetic pretraining's (cached in "
        "OUT/pretrained); a weights file; or 'none' (random initialisation)",
    )
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, one process each")
    p.add_argument("--threads", type=int, default=None, help="default: cpu_count // jobs")
    p.add_argument("--out", default="runs/replicate")
    p.add_argument("--run-one", default=None, help=argparse.SUPPRESS)  # the child's entry
    args = p.parse_args(argv)
    if args.run_one:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        run_one(json.loads(args.run_one))
        return 0
    from protoseg.cli.demo import ensure_backbone, ensure_dataset

    out = Path(args.out)
    jobs = max(1, args.jobs)
    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)
    methods = args.methods or shipped_methods()
    unknown = sorted(set(methods) - set(shipped_methods()))
    if unknown:
        p.error(f"no recipe configs/synthetic/<name>.yaml for {unknown}; see {shipped_methods()}")
    runs = plan_runs(
        methods, args.data_seeds, args.split_seeds, args.seeds, args.design, not args.no_ceiling
    )
    # Data, split files and the pretrained backbone are made here, before any child starts,
    # so no two race on them.
    roots = {d: ensure_dataset(out / "data" / f"draw{d}", seed=d) for d in args.data_seeds}
    backbone = ensure_backbone(out / "pretrained", args.pretrained, args.device)
    tasks = []
    for run in runs:
        root = roots[run.data_seed]
        labeled = (
            "full" if run.split_seed is None else ensure_split(root, args.labels, run.split_seed)
        )
        tasks.append(
            {
                **asdict(run),
                "config": recipe(run.method),
                "labeled": labeled,
                "data_root": str(root),
                "out_dir": str(run.folder(out)),
                "threads": threads,
                "iterations": args.iterations,
                "device": args.device,
                "extra": [
                    *([f"model.pretrained={backbone}"] if backbone is not None else []),
                    *args.extra,
                ],
            }
        )
    todo = sum(not (Path(t["out_dir"]) / "outcome.json").is_file() for t in tasks)
    started = time.perf_counter()
    failed = run_pending(tasks, jobs)
    wall = time.perf_counter() - started
    rows = [
        json.loads(f.read_text()) for r in runs if (f := r.folder(out) / "outcome.json").is_file()
    ]
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    measured = sorted({r["threads"] for r in rows})
    header = (
        f"# Replicate: {args.design} design, {args.labels} labels, data seeds "
        f"{args.data_seeds}, split seeds {args.split_seeds}, train seeds {args.seeds}\n\n"
        f"{len(rows)}/{len(runs)} runs finished; {threads} threads per run x {jobs} jobs "
        f"(rows measured with threads {measured}: results depend on the thread count). "
        f"Wall time {wall / 60:.1f} min for the {todo} runs started in this invocation"
        f"{f', {len(failed)} failed' if failed else ''}.\n\n"
        f"Command: `{shlex.join(['python', 'benchmarks/replicate.py', *(argv or sys.argv[1:])])}`"
    )
    base = {
        "data_seed": args.data_seeds[0],
        "split_seed": args.split_seeds[0],
        "train_seed": args.seeds[0],
    }
    text = summarise(rows, base, header)
    (out / "results.md").write_text(text + "\n")
    print("\n" + text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
