"""The catalogue of bad inputs and faults (README, "Reliability"): no code from files, no lost
files, no silent wrong results, errors instead of tracebacks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import tiny_overrides
from method_contract import tiny_config

from protoseg import load
from protoseg.cli import main
from protoseg.config import ConfigError, load_config
from protoseg.engine.checkpoint import checkpoint_dir
from protoseg.engine.run_lock import RunFolderBusyError, RunLock
from protoseg.engine.trainer import Trainer
from protoseg.files import CheckpointError, atomic_write, save_file
from protoseg.inference import model_payload
from protoseg.models import create_model

MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / "protoseg_unpickled_code_ran"


class RunsCode:
    """Unpickling this object would create MARKER: what a poisoned file carries."""

    def __reduce__(self):
        return (Path.touch, (MARKER,))


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    """A real model file of a tiny network (6 classes, as the synthetic set)."""
    cfg = tiny_config("supervised", "data.num_classes=6", "data.class_names=[]")
    path = tmp_path / "model.pt"
    save_file(model_payload(cfg, create_model(cfg.model, 6), {}), path)
    return path


@pytest.fixture
def poisoned(model_file: Path) -> Path:
    """The same model file with one entry whose unpickling would run code."""
    MARKER.unlink(missing_ok=True)
    data = torch.load(model_file, weights_only=True)
    data["extra"] = RunsCode()
    path = model_file.with_name("poisoned.pt")
    torch.save(data, path)
    return path


def _synthetic(root: Path) -> list[str]:
    return [
        f"data.root={root}",
        "data.labeled_split=splits/8/labeled.txt",
        "data.unlabeled_split=splits/8/unlabeled.txt",
    ]


# ---- 1. loading never runs code ----------------------------------------------------------------
def test_a_clean_model_file_loads(model_file: Path) -> None:
    assert load(model_file).config.data.num_classes == 6


def test_every_command_refuses_a_file_that_would_run_code(
    poisoned: Path, synthetic_root: Path, tmp_path: Path, capsys
) -> None:
    image = next((synthetic_root / "JPEGImages").iterdir())
    data = _synthetic(synthetic_root)
    commands = [
        ["predict", str(image), "--checkpoint", str(poisoned), "--out", str(tmp_path / "p")],
        ["eval", "synthetic/supervised.yaml", *data, "--checkpoint", str(poisoned)],
        ["export", "--checkpoint", str(poisoned), "--format", "torchscript"]
        + ["--out", str(tmp_path / "m.ts")],
        ["analyze", "qualitative", "--checkpoint", str(poisoned), "--config"]
        + ["synthetic/supervised.yaml", *data, "--out", str(tmp_path / "q.png")],
        ["train", "synthetic/supervised.yaml", *tiny_overrides(synthetic_root, tmp_path / "r")]
        + ["--resume", str(poisoned)],
    ]
    for argv in commands:
        assert main(argv) == 2, argv[0]
        assert "refused" in capsys.readouterr().err, argv[0]
        assert not MARKER.exists(), argv[0]
    with pytest.raises(CheckpointError, match="refused"):
        load(poisoned)
    # Auto-resume finds it among the run's checkpoints and refuses it too.
    run = tmp_path / "auto"
    checkpoint_dir(run).mkdir(parents=True)
    (checkpoint_dir(run) / "step_0000002.pt").write_bytes(poisoned.read_bytes())
    assert main(["train", "synthetic/supervised.yaml", *tiny_overrides(synthetic_root, run)]) == 2
    assert "refused" in capsys.readouterr().err
    assert not MARKER.exists()


def test_written_files_have_normal_permissions(model_file: Path, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = save_file({"format": "x"}, tmp_path / "f.pt")
        text = atomic_write(tmp_path / "f.json", lambda handle: handle.write(b"{}"))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert text.stat().st_mode & 0o777 == 0o644


# ---- 2. never destroy a user's files -----------------------------------------------------------
def test_predict_never_overwrites_its_inputs(model_file: Path, tmp_path: Path, capsys) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 10, 10)).save(photos / "a.png")
    original = (photos / "a.png").read_bytes()
    predict = ["predict", str(photos), "--checkpoint", str(model_file)]
    assert main([*predict, "--out", str(photos)]) == 2
    assert "overwrite the input image" in capsys.readouterr().err
    assert main([*predict, "--recursive", "--out", str(photos / "masks")]) == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert (photos / "a.png").read_bytes() == original and not (photos / "masks").exists()
    out = tmp_path / "preds"
    assert main([*predict, "--out", str(out)]) == 0
    first = (out / "a.png").read_bytes()
    assert main([*predict, "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*predict, "--out", str(out), "--overwrite"]) == 0
    assert (out / "a.png").read_bytes() == first


def test_export_never_replaces_the_model(model_file: Path, tmp_path: Path, capsys) -> None:
    original = model_file.read_bytes()
    export = ["export", "--checkpoint", str(model_file), "--format", "torchscript"]
    assert main([*export, "--out", str(model_file)]) == 2
    assert "is the model file being exported" in capsys.readouterr().err
    assert model_file.read_bytes() == original
    target = tmp_path / "net.ts"
    target.write_text("mine")
    assert main([*export, "--out", str(target)]) == 2
    assert "--overwrite" in capsys.readouterr().err and target.read_text() == "mine"
    assert main([*export, "--out", str(tmp_path / "no" / "such" / "net.ts")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_split_and_synthetic_commands_keep_existing_files(tmp_path: Path, capsys) -> None:
    names = tmp_path / "all.txt"
    names.write_text("\n".join(f"img{i}" for i in range(10)) + "\n")
    split = ["data", "split", "--list", str(names), "--num-labeled", "3"]
    assert main([*split, "--out", str(tmp_path / "s")]) == 0
    before = (tmp_path / "s" / "labeled.txt").read_text()
    assert main([*split, "--seed", "5", "--out", str(tmp_path / "s")]) == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "s" / "labeled.txt").read_text() == before
    assert main([*split, "--seed", "5", "--out", str(tmp_path / "s"), "--force"]) == 0


def test_two_runs_in_one_folder_are_refused(synthetic_root: Path, tmp_path: Path) -> None:
    cfg = load_config("synthetic/supervised.yaml", tiny_overrides(synthetic_root, tmp_path / "r"))
    with RunLock(tmp_path / "r"), pytest.raises(RunFolderBusyError, match=f"pid {os.getpid()}"):
        Trainer(cfg).fit()
    assert not (tmp_path / "r" / "config.yaml").exists()


def test_a_refused_resume_changes_nothing(synthetic_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "r"
    extra = ["train.iterations=4", "train.checkpoint_every=2"]
    Trainer(
        load_config("synthetic/supervised.yaml", tiny_overrides(synthetic_root, run, *extra))
    ).fit(max_steps=2)
    saved = (run / "config.yaml").read_text()
    other = tiny_overrides(synthetic_root, run, *extra, "optim.lr=0.5")
    with pytest.raises(CheckpointError, match="different recipe") as err:
        Trainer(load_config("synthetic/supervised.yaml", other)).fit()
    assert (run / "config.yaml").read_text() == saved
    assert "delete" not in str(err.value)  # it never advises deleting a folder


# ---- 3. no silent wrong results ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.iterations=-5", "train.iterations"),
        ("train.epochs=0", "train.epochs"),
        ("data.crop_size=8", "data.crop_size"),
        ("train.log_every=0", "train.log_every"),
        ("train.batch_size=1", "train.batch_size"),
        ("train.max_device_batch=1", "train.max_device_batch"),
    ],
)
def test_settings_that_would_train_nothing_are_refused(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("synthetic/supervised.yaml", ["data.root=x", override])


# ---- 4. errors, not tracebacks -----------------------------------------------------------------
def test_unwritable_run_folder_is_named(synthetic_root: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    args = tiny_overrides(synthetic_root, blocker / "run")
    assert main(["train", "synthetic/supervised.yaml", *args]) == 2
    assert str(blocker) in capsys.readouterr().err


def test_a_failed_checkpoint_write_names_the_file_and_keeps_no_temp(
    tmp_path: Path, monkeypatch
) -> None:
    def full_disk(obj, handle):
        handle.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos")

    monkeypatch.setattr(torch, "save", full_disk)
    target = tmp_path / "ckpt" / "step_0000010.pt"
    with pytest.raises(CheckpointError, match=r"step_0000010\.pt.*disk has room"):
        save_file({"format": "x"}, target)
    assert list(target.parent.iterdir()) == []


def test_temp_files_of_a_killed_write_are_removed(synthetic_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "r"
    leftover = checkpoint_dir(run) / ".step_0000002.pt.4242.tmp"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half a checkpoint")
    cfg = load_config(
        "synthetic/supervised.yaml", tiny_overrides(synthetic_root, run, "train.iterations=1")
    )
    Trainer(cfg).fit()
    assert not leftover.exists()


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(
    synthetic_root: Path, tmp_path: Path, caplog
) -> None:
    run = tmp_path / "r"
    cfg = load_config(
        "synthetic/supervised.yaml", tiny_overrides(synthetic_root, run, "train.iterations=6")
    )
    trainer = Trainer(cfg)
    step = trainer.method.training_step

    def interrupt(labeled, unlabeled, at):
        if at == 2:
            raise KeyboardInterrupt
        return step(labeled, unlabeled, at)

    trainer.method.training_step = interrupt  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert (checkpoint_dir(run) / "step_0000002.pt").is_file()
    assert "run the same command again to resume" in caplog.text
    resumed = Trainer(cfg)
    assert resumed.fit().steps == 6
