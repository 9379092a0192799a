"""The ``protoseg`` command as a user runs it: help, data tools, train/eval, demo, errors."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import pytest
from helpers import tiny_overrides

from protoseg.cli import build_parser, main
from protoseg.config import ConfigError, load_config, shipped_config_dir


def _leaf_commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """Every runnable sub-command path of the parser, found by walking its sub-parsers."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix
        return
    for name, child in subs[0].choices.items():
        yield from _leaf_commands(child, (*prefix, name))


def test_every_command_has_help(capsys):
    parser = build_parser()
    commands = list(_leaf_commands(parser))
    # The walk finds the nested commands too (a broken walk would find nothing to check).
    assert ("analyze", "tsne") in commands and ("data", "voc") in commands
    for command in commands:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([*command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert "usage: protoseg" in text and len(text.splitlines()) > 3, command


def test_data_split_command(tmp_path, capsys):
    names = tmp_path / "all.txt"
    names.write_text("\n".join(f"img_{i}" for i in range(20)))
    assert (
        main(
            [
                "data",
                "split",
                "--list",
                str(names),
                "--num-labeled",
                "5",
                "--seed",
                "1",
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    labeled = (tmp_path / "s" / "labeled.txt").read_text().split()
    unlabeled = (tmp_path / "s" / "unlabeled.txt").read_text().split()
    assert len(labeled) == 5 and len(unlabeled) == 15
    assert sorted(labeled + unlabeled) == sorted(f"img_{i}" for i in range(20))


def test_bad_input_exits_2_with_a_message(tmp_path, capsys):
    assert main(["train", "synthetic/pcr.yaml", "train.bogus=1"]) == 2
    assert "train.bogus" in capsys.readouterr().err
    assert main(["train", "synthetic/pcr.yaml", f"data.root={tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "data.root" in err
    assert main(["train", "no/such/config.yaml"]) == 2
    assert "not found" in capsys.readouterr().err


def test_train_then_eval_from_the_cli(synthetic_root, tmp_path, capsys):
    run = tmp_path / "run"
    args = [
        f"data.root={synthetic_root}",
        "data.labeled_split=splits/8/labeled.txt",
        "data.unlabeled_split=splits/8/unlabeled.txt",
        "data.crop_size=48",
        "train.batch_size=4",
        "train.iterations=3",
        "train.progress=false",
        "method.warmup_epochs=0",
        "method.prototypes.sample_grid=8",
    ]
    assert main(["train", "synthetic/pcr.yaml", *args, f"train.out_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and str(run) in out
    resolved = load_config(run / "config.yaml")
    assert resolved.train.iterations == 3 and resolved.method.name == "pcr"
    for head in ("linear", "prototype"):
        target = tmp_path / f"eval_{head}.json"
        assert (
            main(
                [
                    "eval",
                    "synthetic/pcr.yaml",
                    *args,
                    "--checkpoint",
                    str(run / "model.pt"),
                    "--head",
                    head,
                    "--out",
                    str(target),
                ]
            )
            == 0
        )
        result = json.loads(target.read_text())
        assert 0 <= result["miou"] <= 100 and result["num_images"] == 12
    saved = json.loads((run / "eval_final_linear.json").read_text())
    assert json.loads((tmp_path / "eval_linear.json").read_text())["miou"] == pytest.approx(
        saved["miou"], abs=1e-6
    )


def test_every_shipped_config_loads():
    files = sorted(shipped_config_dir().rglob("*.yaml"))
    assert len(files) >= 40
    cells: Counter[str] = Counter()
    for path in files:
        cfg = load_config(path)
        if path.parent.name.isdigit():
            cells[cfg.method.name] += 1
            n = path.parent.name
            assert f"/{n}/" in cfg.data.labeled_split and cfg.method.name == path.stem
    for method in ("supervised", "cutmix_seg", "pcr"):
        assert cells[method] == 5 + 4 + 4  # Tables 1-3
    for base in ("u2pl", "cps", "fixmatch", "unimatch"):
        for method in (base, f"{base}+pcr"):
            assert cells[method] == 5 + 4, method  # VOC classic and Cityscapes, every split
    voc = load_config("voc/classic/92/pcr.yaml")
    assert (voc.train.batch_size, voc.data.crop_size, voc.optim.lr) == (16, 513, 0.001)
    assert (voc.method.confidence_threshold, voc.method.prototypes.per_class) == (0.8, 4)
    city = load_config("cityscapes/fine/744/pcr.yaml")
    assert (city.eval.mode, city.eval.window, city.eval.stride) == ("sliding", 769, 513)
    assert city.model.aux_head and city.train.aux_weight == 0.4
    u2pl = load_config("voc/classic/92/u2pl.yaml")
    assert (u2pl.train.loss, u2pl.method.drop_percent, u2pl.method.contrast.num_queries) == (
        "ce",
        80.0,
        256,
    )
    assert load_config("cityscapes/fine/186/u2pl.yaml").method.warmup_epochs == 0
    assert load_config("voc/classic/92/cps.yaml").method.cps_weight == 1.0
    assert load_config("cityscapes/fine/186/cps.yaml").method.cps_weight == 5.0
    with pytest.raises(ConfigError, match="method.strong_aug"):
        load_config("voc/pcr.yaml", ["method.strong_aug=mixup"])
    uni = load_config("voc/classic/92/unimatch.yaml")
    assert (uni.train.batch_size, uni.data.crop_size, uni.model.output_stride) == (8, 321, 16)
    assert (uni.method.confidence_threshold, uni.train.loss) == (0.95, "ce")
    uni_city = load_config("cityscapes/fine/186/fixmatch.yaml")
    assert (uni_city.data.crop_size, uni_city.optim.lr, uni_city.train.epochs) == (801, 0.005, 240)
    assert uni_city.method.confidence_threshold == 0 and not uni_city.model.aux_head
    # UniMatch draws the scale uniformly; its OHEM keeps 200000 pixels per GPU of 2 crops.
    assert (uni_city.data.scale_sampling, uni_city.train.ohem_min_kept) == ("uniform", 100000)
    assert (uni_city.eval.window, uni_city.eval.stride, uni_city.eval.miou) == (801, 534, "release")


def test_release_recipes_take_the_releases_training_details():
    # This tree's recipes (an editable install of another checkout maps the shipped ones there).
    configs = Path(__file__).resolve().parents[1] / "configs"
    for name in ("voc/classic/92", "voc/blender/662", "cityscapes/fine/744"):
        for method in ("pcr", "cutmix_seg"):
            cfg = load_config(configs / f"{name}/{method}.yaml")
            assert cfg.data.scale_sampling == "split" and cfg.eval.miou == "release"
            # 100000 per GPU batch of 2 crops in the release.
            assert cfg.train.ohem_min_kept == 50000
            assert (cfg.method.ema_start, cfg.method.teacher_bn) == ("after_epoch", "student_batch")
    mean_teacher = load_config(configs / "voc/mean_teacher.yaml")
    assert (mean_teacher.method.ema_start, mean_teacher.method.teacher_bn) == (
        "after_epoch",
        "student_batch",
    )
    # The synthetic recipe keeps the generic defaults (and its published numbers).
    demo = load_config(configs / "synthetic/pcr.yaml")
    assert (demo.data.scale_sampling, demo.eval.miou) == ("uniform", "nanmean")
    assert (demo.method.ema_start, demo.method.teacher_bn) == ("ramp", "forward")


# End to end (tens of seconds): in `make test-all`, not the default suite.
@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    # A tiny pretraining (the default one takes minutes), which every run then starts from.
    tiny = ["--num-images", "64", "--epochs", "1", "--device", "cpu"]
    assert main(["pretrain", "--out", str(tmp_path / "backbone"), *tiny]) == 0
    (weights,) = (tmp_path / "backbone").glob("*.safetensors")
    demo = ["demo", "--out", str(tmp_path / "demo"), "--iterations", "2", "--device", "cpu"]
    assert main([*demo, "--pretrained", str(weights)]) == 0
    out = capsys.readouterr().out
    for name in ("supervised", "cutmix_seg", "pcr"):
        assert name in out
        assert (tmp_path / "demo" / name / "model.pt").is_file()
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "| pcr |" in report
    for png in ("miou.png", "curves.png", "predictions.png"):
        assert (tmp_path / "demo" / png).stat().st_size > 2000
    rows = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert [r["name"] for r in rows] == ["supervised", "cutmix_seg", "pcr"]
    for name in ("supervised", "pcr"):
        config = (tmp_path / "demo" / name / "config.yaml").read_text()
        assert f"pretrained: {weights}" in config


def test_demo_regenerates_a_stale_dataset_and_keeps_foreign_folders(tmp_path):
    from protoseg.cli.demo import ensure_dataset
    from protoseg.data.splits import DataError
    from protoseg.data.synthetic import STAMP_FILE

    root = ensure_dataset(tmp_path / "data")
    stamp = json.loads((root / STAMP_FILE).read_text())
    assert (root / "splits" / str(stamp["label_counts"][0]) / "labeled.txt").is_file()
    first_image = sorted((root / "JPEGImages").iterdir())[0]
    marker = root / "notes_of_the_user.txt"
    marker.write_text("x")
    ensure_dataset(root)
    assert marker.is_file()  # the current version is reused as it is
    (root / STAMP_FILE).write_text(json.dumps({**stamp, "version": -1}))
    first_image.write_bytes(b"stale")
    own_photo = root / "JPEGImages" / "my_photo.jpg"
    own_split = root / "splits" / "mine.txt"
    own_photo.write_bytes(b"the user's photo")
    own_split.write_text("my_photo\n")
    with pytest.raises(DataError, match=r"another generator version.*--overwrite"):
        ensure_dataset(root)  # a stale set is regenerated only when asked
    assert first_image.read_bytes() == b"stale"
    ensure_dataset(root, overwrite=True)
    assert json.loads((root / STAMP_FILE).read_text()) == stamp
    assert first_image.read_bytes() != b"stale"  # regenerated
    assert marker.read_text() == "x"  # what the generator did not write stays,
    assert own_photo.read_bytes() == b"the user's photo"  # inside its folders too
    assert own_split.read_text() == "my_photo\n"
    for foreign_files in (["notes.txt"], ["notes.txt", "classes.txt"]):
        foreign = tmp_path / f"mine{len(foreign_files)}"
        foreign.mkdir()
        for name in foreign_files:
            (foreign / name).write_text("keep me")
        with pytest.raises(DataError, match="no protoseg synthetic stamp"):
            ensure_dataset(foreign)
        assert all((foreign / n).read_text() == "keep me" for n in foreign_files)


def test_synthetic_help_states_the_generator_defaults(capsys):
    from protoseg.data import DEFAULT_LABEL_COUNTS, DEFAULT_NUM_TRAIN

    with pytest.raises(SystemExit):
        build_parser().parse_args(["data", "synthetic", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default {DEFAULT_NUM_TRAIN})" in text
    assert f"(default {','.join(map(str, DEFAULT_LABEL_COUNTS))})" in text


def test_unattended_run_logs_plain_lines_to_train_log(synthetic_root, tmp_path, capsys):
    run = tmp_path / "run"
    args = tiny_overrides(synthetic_root, run, "train.iterations=4", "train.log_every=2")
    assert main(["train", "synthetic/supervised.yaml", *args]) == 0
    out = capsys.readouterr().out
    assert out.count("final mIoU") == 1 and "pixel accuracy" not in out  # the table once
    log = (run / "train.log").read_text()
    assert "step 2/4 loss=" in log and "step 4/4 loss=" in log and "eta=" in log
    assert "final (linear head) at step 4" in log and "\r" not in log


def test_default_run_folder_follows_the_config(tmp_path):
    assert load_config("synthetic/pcr.yaml", ["data.root=x"]).train.out_dir == str(
        Path("runs/synthetic/pcr")
    )
    assert load_config("synthetic/supervised.yaml", ["data.root=x"]).train.out_dir == str(
        Path("runs/synthetic/supervised")
    )


def test_a_run_shorter_than_the_warmup_is_flagged(synthetic_root, tmp_path, caplog):
    from protoseg.engine.trainer import Trainer

    args = tiny_overrides(synthetic_root, tmp_path / "w", "train.iterations=1", method="pcr")
    cfg = load_config("synthetic/pcr.yaml", [*args, "method.warmup_epochs=3"])
    Trainer(cfg).fit()
    assert "supervised only" in caplog.text


def test_eval_takes_the_model_files_own_config(synthetic_root, tmp_path, capsys):
    run = tmp_path / "run"
    args = tiny_overrides(synthetic_root, run, "train.iterations=1")
    assert main(["train", "synthetic/supervised.yaml", *args]) == 0
    capsys.readouterr()
    target = tmp_path / "e.json"
    argv = ["eval", f"data.root={synthetic_root}", "--checkpoint", str(run / "model.pt")]
    assert main([*argv, "--out", str(target)]) == 0
    assert json.loads(target.read_text())["num_images"] == 12


def test_print_config_and_help_texts(capsys):
    assert main(["train", "synthetic/pcr.yaml", "data.root=x", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "name: pcr" in printed and "per_class: 3" in printed
    for command, takes_overrides in [("train", True), ("predict", False), ("export", False)]:
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        assert ("Overrides are dotted keys" in capsys.readouterr().out) == takes_overrides


def test_every_full_demo_run_has_a_valid_config(tmp_path):
    from protoseg.cli.demo import build_run_config, default_runs

    runs = default_runs(full=True)
    assert len(runs) > 3
    for spec in runs:
        cfg = build_run_config(spec, tmp_path / "data", tmp_path / spec.name, 0, None, "cpu")
        assert cfg.train.out_dir == str(tmp_path / spec.name)


@pytest.mark.slow  # two fresh processes (torch, gloo): tens of seconds on 2 cores
def test_demo_runs_in_processes_give_the_in_process_numbers(tmp_path):
    # The parallel demo must not change the table: a run trained in a spawned worker on one
    # thread equals the same run trained here on one thread.
    import torch

    from protoseg.cli.demo import RunSpec, build_run_config, ensure_dataset, train_runs

    root = ensure_dataset(tmp_path / "data")
    spec = RunSpec("cutmix_seg", "synthetic/cutmix_seg.yaml")

    def run(folder: str) -> tuple:
        cfg = build_run_config(
            spec,
            root,
            tmp_path / folder,
            seed=0,
            iterations=4,
            device="cpu",
            extra=[
                "method.warmup_epochs=0",
                "train.progress=false",
                "data.val_split=splits/16/labeled.txt",  # 16 images: a quick evaluation
            ],
        )
        return (cfg, spec)

    threads = torch.get_num_threads()
    try:
        (here,) = train_runs([run("here")], jobs=1, threads=1)
    finally:
        torch.set_num_threads(threads)
    (child,) = train_runs([run("child")], jobs=2, threads=1)
    assert child.out_dir != here.out_dir
    assert child.threads == here.threads == 1
    assert (child.miou, child.iou) == (here.miou, here.iou)
    assert (tmp_path / "child" / "model.pt").is_file()


@pytest.mark.parametrize("jobs, threads", [(0, None), (2, 0)])
def test_demo_refuses_no_jobs_or_threads_before_any_work(tmp_path, jobs, threads):
    from protoseg.cli.demo import run_demo

    with pytest.raises(ValueError, match="must be >= 1"):
        run_demo(out=tmp_path / "demo", device="cpu", jobs=jobs, threads=threads)
    assert not (tmp_path / "demo").exists()
