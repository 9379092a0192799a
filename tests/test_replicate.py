"""benchmarks/replicate.py: run planning, paired statistics, axis spreads, resuming, splits.

No model is trained: the statistics run on hand-made result rows and the launcher is
replaced by one that writes an outcome.json.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
from helpers import imported_benchmark
from scipy.stats import binomtest, ttest_rel


@pytest.fixture(scope="module")
def rep():
    """The benchmark script, imported as a module."""
    yield from imported_benchmark("replicate")


def row(method: str, d: int, s: int | None, t: int, miou: float) -> dict:
    """A result row as outcome.json holds it (only the fields the summary reads)."""
    return {"method": method, "data_seed": d, "split_seed": s, "train_seed": t, "miou": miou}


def fake_rows(rep) -> list[dict]:
    """An axes design over 3 values per axis for three methods plus the ceiling."""
    rows = []
    for run in rep.plan_runs(["supervised", "cutmix_seg", "pcr"], [0, 1, 2], [0, 1, 2], [0, 1, 2]):
        d, s, t = run.key
        level = {"supervised": 40.0, "cutmix_seg": 45.0, "pcr": 47.0, rep.CEILING: 70.0}
        miou = level[run.method] + 2.0 * d + 0.5 * (s or 0) + 0.1 * t
        rows.append(row(run.method, d, s, t, miou + (0.3 if run.method == "pcr" and t else 0)))
    return rows


def test_axes_design_is_baseline_plus_each_axis_alone(rep):
    five = [0, 1, 2, 3, 4]
    points = rep.design_points(five, five, five, "axes")
    assert len(points) == 13 and len(set(points)) == 13
    assert points[0] == (0, 0, 0)
    # Every other run moves exactly one axis away from the baseline.
    assert all(sum(v != 0 for v in p) == 1 for p in points[1:])
    assert len(rep.design_points(five, [0, 1], [7, 8, 9], "grid")) == 5 * 2 * 3
    runs = rep.plan_runs(["supervised", "pcr"], five, five, five, "axes", ceiling=True)
    ceiling = [r for r in runs if r.method == rep.CEILING]
    # One ceiling per (draw, seed) pair of the design: 5 draws at seed 0, 4 more seeds at draw 0.
    assert len(runs) == 2 * 13 + 9 and len(ceiling) == 9
    assert all(r.split_seed is None for r in ceiling)
    assert rep.Run("pcr", 1, 2, 3).folder(Path("o")) == Path("o/runs/pcr/d1-s2-t3")
    assert rep.recipe(rep.CEILING) == "synthetic/supervised.yaml"


def test_shipped_methods_are_the_synthetic_recipes(rep):
    methods = rep.shipped_methods()
    assert methods[0] == "supervised" and "base" not in methods
    assert {"pcr", "cutmix_seg", "fixmatch+pcr", "unimatch+pcr"} <= set(methods)


def test_paired_differences_match_on_all_three_axes(rep):
    rows = [
        row("pcr", 0, 0, 0, 50.0),
        row("sup", 0, 0, 0, 45.0),
        row("pcr", 0, 1, 0, 52.0),
        row("sup", 0, 1, 0, 51.0),
        row("pcr", 1, 0, 0, 60.0),  # no supervised run on draw 1: unpaired
        row("sup", 0, 0, 1, 10.0),  # no pcr run with seed 1: unpaired
    ]
    assert sorted(rep.paired(rows, "pcr", "sup")) == [(50.0, 45.0), (52.0, 51.0)]


def test_p_values_equal_scipys(rep):
    a = [50.0, 52.0, 49.5, 51.0, 48.0, 53.0]
    b = [49.0, 50.5, 49.0, 48.0, 47.9, 50.0]
    t_p, sign_p = rep.paired_tests(list(zip(a, b)))
    assert t_p == pytest.approx(ttest_rel(a, b).pvalue)
    assert sign_p == pytest.approx(2 * 0.5**6) == pytest.approx(binomtest(6, 6).pvalue)


def test_degenerate_pairs_give_dashes_without_warnings(rep):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rep.paired_tests([]) == (None, None)
        assert rep.paired_tests([(1.0, 0.0)]) == (None, None)
        assert rep.paired_tests([(1.0, 1.0), (2.0, 2.0)]) == (None, None)
        t_p, sign_p = rep.paired_tests([(2.0, 1.0), (3.0, 2.0), (4.0, 3.0)])
        assert t_p is None and sign_p == pytest.approx(0.25)
        rows = [row("pcr", 0, 0, 0, 1.0), row("supervised", 0, 0, 0, 1.0)]
        assert "| pcr - supervised | 1 | 0.00 ± 0.00 | 0/1 | - | - |" in rep.summarise(
            rows, {"data_seed": 0, "split_seed": 0, "train_seed": 0}
        )


def test_axis_spread_uses_only_the_runs_on_that_axis(rep):
    base = {"data_seed": 0, "split_seed": 0, "train_seed": 0}
    rows = [
        row("m", 0, 0, 0, 10.0),
        row("m", 1, 0, 0, 14.0),
        row("m", 2, 0, 0, 18.0),  # data axis: 10, 14, 18
        row("m", 0, 1, 0, 11.0),  # split axis: 10, 11
        row("m", 0, 0, 1, 10.0),
        row("m", 0, 0, 2, 10.0),  # seed axis: 10, 10, 10
        row("m", 1, 1, 1, 99.0),  # off every axis (a grid corner): in no spread
    ]
    assert rep.axis_spread(rows, "data_seed", base) == (pytest.approx(4.0), 3)
    assert rep.axis_spread(rows, "split_seed", base) == (pytest.approx(0.5**0.5), 2)
    assert rep.axis_spread(rows, "train_seed", base) == (0.0, 3)
    assert rep.axis_spread(rows[:1], "data_seed", base) == (None, 1)


def test_summary_tables(rep):
    base = {"data_seed": 0, "split_seed": 0, "train_seed": 0}
    text = rep.summarise(fake_rows(rep), base, "# header")
    print(text)
    assert text.startswith("# header")
    assert "| pcr | 7 | " in text and "| 2.00 (n=3) | 0.50 (n=3) |" in text
    assert "| 0 | 70.00 | 40.00 | 30.00 |" in text  # ceiling, supervised, gap on draw 0
    assert "| pcr - supervised | 7 | " in text and "| pcr - cutmix_seg | 7 |" in text
    assert "| cutmix_seg - supervised | 7 | 5.00 ± 0.00 | 7/7 | - | 0.0156 |" in text
    assert "| pcr | 47.00 (1) | 49.00 (1) | 51.00 (1) |" in text
    assert "| supervised_full | 70.00 | 72.00 | 74.00 |" in text


def test_default_pairs_only_those_present(rep):
    methods = ["supervised", "pcr", "fixmatch", "fixmatch+pcr", "unimatch+pcr", rep.CEILING]
    pairs = rep.default_pairs(methods)
    assert ("pcr", "supervised") in pairs and ("fixmatch+pcr", "fixmatch") in pairs
    assert ("pcr", "cutmix_seg") not in pairs and ("unimatch+pcr", "unimatch") not in pairs
    assert not any(rep.CEILING in p for p in pairs)


def test_finished_runs_are_not_launched_again(rep, tmp_path, monkeypatch):
    runs = rep.plan_runs(["pcr"], [0], [0, 1], [0], ceiling=False)
    tasks = [{"method": r.method, "out_dir": str(r.folder(tmp_path))} for r in runs]
    done = Path(tasks[0]["out_dir"])
    done.mkdir(parents=True)
    (done / "outcome.json").write_text(json.dumps({"miou": 1.0, "seconds": 1.0}))
    launched = []

    def fake_launch(task: dict) -> int:
        launched.append(task["out_dir"])
        Path(task["out_dir"]).mkdir(parents=True, exist_ok=True)
        (Path(task["out_dir"]) / "outcome.json").write_text('{"miou": 2.0, "seconds": 3.0}')
        return 0

    monkeypatch.setattr(rep, "launch", fake_launch)
    assert rep.run_pending(tasks, jobs=2) == []
    assert launched == [tasks[1]["out_dir"]]
    assert rep.run_pending(tasks, jobs=1) == [] and len(launched) == 1
    monkeypatch.setattr(rep, "launch", lambda task: 1)  # a crash is reported, not raised
    (Path(tasks[1]["out_dir"]) / "outcome.json").unlink()
    assert rep.run_pending(tasks, jobs=1) == [tasks[1]["out_dir"]]


def test_split_files_written_once_per_split_seed(rep, tmp_path):
    names = [f"train_{i:05d}" for i in range(20)]
    full = tmp_path / "splits" / "full" / "labeled.txt"
    full.parent.mkdir(parents=True)
    full.write_text("\n".join(names) + "\n")
    assert rep.ensure_split(tmp_path, 4, 3) == "4-split3"
    folder = tmp_path / "splits" / "4-split3"
    labeled = (folder / "labeled.txt").read_text().split()
    unlabeled = (folder / "unlabeled.txt").read_text().split()
    assert len(labeled) == 4 and not set(labeled) & set(unlabeled)
    assert sorted(labeled + unlabeled) == names
    assert rep.ensure_split(tmp_path, 4, 4) == "4-split4"
    assert (tmp_path / "splits/4-split4/labeled.txt").read_text().split() != labeled
    (folder / "labeled.txt").write_text("kept\n")  # an existing split is reused, not redrawn
    rep.ensure_split(tmp_path, 4, 3)
    assert (folder / "labeled.txt").read_text() == "kept\n"


def test_main_plans_runs_and_writes_the_summary(rep, tmp_path, monkeypatch, capsys):
    import protoseg.cli.demo as demo
    from protoseg.data import generate_synthetic

    def tiny_dataset(root: Path, seed: int = 0) -> Path:
        if not (root / "splits").is_dir():
            generate_synthetic(root, 20, 2, image_size=32, label_counts=(4,), seed=seed)
        return root

    def fake_launch(task: dict) -> int:
        root = Path(task["data_root"])
        assert (root / "splits" / task["labeled"] / "labeled.txt").is_file()
        cfg = demo.build_run_config(
            demo.RunSpec(task["method"], task["config"], labeled=task["labeled"]),
            root,
            Path(task["out_dir"]),
            task["train_seed"],
            task["iterations"],
            "cpu",
            task["extra"],
        )
        assert cfg.train.iterations == 7 and cfg.train.seed == task["train_seed"]
        # Every run starts from the one backbone file the parent resolved.
        assert cfg.model.pretrained == str(weights)
        Path(task["out_dir"]).mkdir(parents=True)
        miou = 50.0 + task["data_seed"] + (task["method"] == "pcr")
        outcome = {**task, "miou": miou, "seconds": 1.0}
        (Path(task["out_dir"]) / "outcome.json").write_text(json.dumps(outcome))
        return 0

    weights = tmp_path / "backbone.safetensors"
    weights.write_bytes(b"weights")  # the file is only passed on, never read here
    monkeypatch.setattr(demo, "ensure_dataset", tiny_dataset)
    monkeypatch.setattr(rep, "launch", fake_launch)
    argv = [
        "--pretrained",
        str(weights),
        "--methods",
        "supervised",
        "pcr",
        "--data-seeds",
        "0",
        "1",
        "--split-seeds",
        "0",
        "1",
        "--seeds",
        "0",
        "--labels",
        "4",
        "--iterations",
        "7",
        "--jobs",
        "2",
        "--threads",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert rep.main(argv) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert len(rows) == 2 * 3 + 2  # 3 design points per method, ceiling on draws 0 and 1
    # Split files are drawn per data draw, only where the design uses them.
    assert (tmp_path / "data/draw0/splits/4-split1/labeled.txt").is_file()
    assert not (tmp_path / "data/draw1/splits/4-split1").exists()
    text = (tmp_path / "results.md").read_text()
    assert "1 threads per run x 2 jobs" in text and "--iterations 7" in text
    assert "| pcr - supervised | 3 | 1.00 ± 0.00 | 3/3 | - | 0.25 |" in text
    monkeypatch.setattr(rep, "launch", lambda task: pytest.fail("a finished run relaunched"))
    assert rep.main(argv) == 0
    assert "for the 0 runs started" in capsys.readouterr().out


def test_class_table_averages_each_class_over_a_methods_runs(rep):
    rows = [
        {"method": "pcr", "iou": [90.0, 50.0, 10.0, 20.0, 30.0, float("nan")]},
        {"method": "pcr", "iou": [94.0, 40.0, 30.0, 20.0, 10.0, 60.0]},
        {"method": "supervised", "iou": [1.0, 2.0]},  # not one IoU per class: left out
    ]
    lines = rep.class_table(rows, ["pcr", "supervised"])
    # The absent class (NaN) counts in no mean; a method without usable rows gets no line.
    assert lines[2] == "| pcr | 2 | 92.0 | 45.0 | 20.0 | 20.0 | 20.0 | 60.0 |"
    assert len(lines) == 3


def test_a_run_config_builds_in_a_fresh_interpreter(tmp_path):
    """replicate.py's child processes import protoseg.cli.demo alone (not the CLI's entry
    point): the method registry must come with it, or every run fails at load_config."""
    import subprocess
    import sys

    code = (
        "import protoseg.cli.demo\n"
        "from protoseg.config import load_config\n"
        "print(load_config('synthetic/u2pl.yaml', ['data.root=x']).method.name)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("u2pl")
