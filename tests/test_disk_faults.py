"""Full and read-only disks: one line naming the file, no traceback, no truncated output.

The slow tests mount a real 1 MiB tmpfs (root only; skipped with the reason otherwise):
chmod cannot make a folder read-only for root, and a real file system is the only honest
way to run out of space. The fast tests inject the file-system errors where they strike.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from method_contract import tiny_config

from protoseg.cli import main
from protoseg.files import CheckpointError, atomic_write, save_file
from protoseg.inference import model_payload
from protoseg.models import create_model


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    cfg = tiny_config("supervised", "data.num_classes=6", "data.class_names=[]")
    return save_file(model_payload(cfg, create_model(cfg.model, 6), {}), tmp_path / "m.pt")


def _one_line_error(err: str, path: Path, command: str = "") -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (command, err)
    assert "Traceback (most recent call last)" not in err and str(path) in err, (command, err)


# ---- fast: injected faults -----------------------------------------------------------------
def test_the_writers_cleanup_does_not_raise_again_on_a_read_only_disk(
    tmp_path: Path, monkeypatch
) -> None:
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "replace", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)  # the cleanup fails as well
    with pytest.raises(CheckpointError, match=r"could not write .*out\.json.*Read-only"):
        atomic_write(tmp_path / "out.json", lambda handle: handle.write(b"{}"))


def test_an_os_error_reaches_the_user_as_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    target = tmp_path / "splits"

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(target / "labeled.txt"))

    import protoseg.data

    monkeypatch.setattr(protoseg.data, "split_list", full_disk)
    names = tmp_path / "all.txt"
    names.write_text("a\nb\nc\n")
    argv = ["data", "split", "--list", str(names), "--num-labeled", "1", "--out", str(target)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    _one_line_error(err, target)
    assert "No space left on device" in err and "disk has room" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores chmod; the tmpfs tests cover root")
def test_a_read_only_folder_is_named_by_every_writer(
    model_file: Path, tmp_path: Path, capsys, synthetic_root: Path
) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        _check_commands_fail_cleanly(model_file, folder, capsys, synthetic_root)
    finally:
        folder.chmod(0o700)


# ---- slow: a real small file system ---------------------------------------------------------
@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs mounted under tmp_path (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "mnt"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path) -> None:
    with open(folder / "filler", "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def _check_commands_fail_cleanly(
    model_file: Path, folder: Path, capsys, synthetic_root: Path
) -> None:
    """Every writing command exits 2 with one line naming its output, and leaves no file."""
    from PIL import Image

    image = model_file.parent / "photo.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(image)
    before = set(folder.rglob("*"))
    commands = {
        "predict": (["predict", str(image), "--checkpoint", str(model_file)], folder / "pred"),
        "export torchscript": (
            ["export", "--checkpoint", str(model_file), "--format", "torchscript"],
            folder / "m.ts",
        ),
        "data synthetic": (
            ["data", "synthetic", "--num-train", "4", "--num-val", "2", "--labels", "2"],
            folder / "syn",
        ),
        "data split": (
            ["data", "split", "--list", str(_names(model_file)), "--num-labeled", "1"],
            folder / "split",
        ),
        "eval": (
            ["eval", "synthetic/supervised.yaml", f"data.root={synthetic_root}"]
            + ["--checkpoint", str(model_file)],
            folder / "result.json",
        ),
        "analyze qualitative": (
            ["analyze", "qualitative", "--checkpoint", str(model_file), "--count", "1"]
            + ["--config", "synthetic/supervised.yaml", f"data.root={synthetic_root}"],
            folder / "grid.png",
        ),
    }
    for name, (argv, out) in commands.items():
        assert main([*argv, "--out", str(out)]) == 2, name
        err = capsys.readouterr().err
        _one_line_error(err, folder, name)
        leftovers = {p for p in set(folder.rglob("*")) - before if p.is_file()}
        assert not leftovers, (name, leftovers)


def _names(model_file: Path) -> Path:
    path = model_file.parent / "names.txt"
    path.write_text("a\nb\nc\n")
    return path


@pytest.mark.slow
def test_a_full_disk_fails_every_command_cleanly(
    model_file: Path, tiny_fs: Path, capsys, synthetic_root: Path
) -> None:
    _fill(tiny_fs)
    _check_commands_fail_cleanly(model_file, tiny_fs, capsys, synthetic_root)


@pytest.mark.slow
def test_a_read_only_disk_fails_every_command_cleanly(
    model_file: Path, tiny_fs: Path, capsys, synthetic_root: Path
) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    _check_commands_fail_cleanly(model_file, tiny_fs, capsys, synthetic_root)


@pytest.mark.slow
def test_an_export_to_a_nearly_full_disk_leaves_no_truncated_file(
    model_file: Path, tiny_fs: Path, capsys, monkeypatch
) -> None:
    # Room for the sidecar and a little more, not for the weights.
    size = model_file.stat().st_size
    assert size > 300_000, "the test needs a model larger than the space left"
    with open(tiny_fs / "filler", "wb") as handle:
        handle.write(b"\0" * (1024 * 1024 - 200_000))
    target = tiny_fs / "m.ts"
    argv = ["export", "--checkpoint", str(model_file), "--format", "torchscript"]
    assert main([*argv, "--out", str(target)]) == 2
    _one_line_error(capsys.readouterr().err, tiny_fs)
    assert sorted(p.name for p in tiny_fs.iterdir()) == ["filler"]
    # With the space-check passed (say the estimate were low), the write itself is atomic.
    import protoseg.analysis.export as export

    monkeypatch.setattr(export, "check_free_space", lambda path, module: None)
    assert main([*argv, "--out", str(target)]) == 2
    _one_line_error(capsys.readouterr().err, tiny_fs)
    assert sorted(p.name for p in tiny_fs.iterdir()) == ["filler"]


@pytest.mark.slow
def test_training_on_a_full_disk_names_the_file_and_keeps_the_last_checkpoint(
    synthetic_root: Path, tiny_fs: Path, capsys
) -> None:
    from helpers import tiny_overrides

    run = tiny_fs / "run"
    extra = ["train.iterations=4", "train.checkpoint_every=2", "train.keep_last=4"]
    argv = ["train", "synthetic/supervised.yaml", *tiny_overrides(synthetic_root, run, *extra)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(run) in err and "disk has room" in err, err
    assert not list(run.rglob("*.tmp"))
