"""No output replaces an input, a model file or an earlier result without --overwrite, checked
by one function (protoseg.outputs) that compares files, not spellings of paths."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from method_contract import tiny_config

from protoseg.cli import main
from protoseg.files import save_file
from protoseg.inference import model_payload
from protoseg.models import create_model
from protoseg.outputs import OutputError, check_outputs, protect, same_file


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    """A real model file of a tiny network (6 classes, as the synthetic set)."""
    cfg = tiny_config("supervised", "data.num_classes=6", "data.class_names=[]")
    path = tmp_path / "m.pt"
    save_file(model_payload(cfg, create_model(cfg.model, 6), {}), path)
    return path


def _data(root: Path) -> list[str]:
    return [f"data.root={root}", "data.labeled_split=splits/8/labeled.txt"]


# ---- the one check ------------------------------------------------------------------------------
def test_same_file_sees_through_links_and_spellings(tmp_path: Path) -> None:
    original = tmp_path / "m.pt"
    original.write_bytes(b"weights")
    hard = tmp_path / "hard.pt"
    os.link(original, hard)
    soft = tmp_path / "soft.pt"
    soft.symlink_to(original)
    (tmp_path / "sub").mkdir()
    spelled = tmp_path / "sub" / ".." / "m.pt"
    for other in (hard, soft, spelled):
        assert same_file(other, original), other
        with pytest.raises(OutputError, match="model file"):
            check_outputs([other], protect([original], "model file"), overwrite=True)
    copy = tmp_path / "copy.pt"
    copy.write_bytes(b"weights")
    assert not same_file(copy, original)  # equal bytes are not the same file


def test_an_existing_file_inside_a_protected_folder_is_never_replaced(tmp_path: Path) -> None:
    dataset = tmp_path / "data"
    (dataset / "JPEGImages").mkdir(parents=True)
    image = dataset / "JPEGImages" / "a.jpg"
    image.write_bytes(b"photo")
    guard = protect([dataset], "dataset folder")
    with pytest.raises(OutputError, match="inside the dataset folder"):
        check_outputs([image], guard, overwrite=True)
    check_outputs([dataset / "figure.png"], guard)  # a new file there is fine
    earlier = tmp_path / "result.json"
    earlier.write_text("{}")
    with pytest.raises(OutputError, match="--overwrite"):
        check_outputs([earlier], guard)
    check_outputs([earlier], guard, overwrite=True)
    with pytest.raises(OutputError, match="is a folder"):
        check_outputs([dataset], (), overwrite=True)


# ---- every command ------------------------------------------------------------------------------
def test_eval_never_writes_its_results_over_the_model(
    model_file: Path, synthetic_root: Path, tmp_path: Path, capsys
) -> None:
    original = model_file.read_bytes()
    base = ["eval", "synthetic/supervised.yaml", *_data(synthetic_root)]
    base += ["--checkpoint", str(model_file)]
    for spelling in (str(model_file), str(tmp_path / "." / "m.pt")):
        assert main([*base, "--out", spelling, "--overwrite"]) == 2
        assert "model file being read" in capsys.readouterr().err
    assert model_file.read_bytes() == original
    out = tmp_path / "result.json"
    assert main([*base, "--out", str(out)]) == 0
    first = json.loads(out.read_text())
    assert main([*base, "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*base, "--out", str(out), "--overwrite"]) == 0
    assert json.loads(out.read_text())["miou"] == first["miou"]


def test_eval_out_inside_the_dataset_is_refused(
    model_file: Path, synthetic_root: Path, capsys
) -> None:
    split = synthetic_root / "splits" / "val.txt"
    before = split.read_text()
    argv = ["eval", *_data(synthetic_root), "--checkpoint", str(model_file), "--out", str(split)]
    assert main([*argv, "--overwrite"]) == 2
    assert "dataset folder" in capsys.readouterr().err
    assert split.read_text() == before


def test_analyze_figures_never_replace_a_dataset_image(
    model_file: Path, synthetic_root: Path, capsys
) -> None:
    image = sorted((synthetic_root / "JPEGImages").iterdir())[0]
    before = image.read_bytes()
    common = ["--checkpoint", str(model_file), "--config", "synthetic/supervised.yaml"]
    for command in (["qualitative", "--count", "1"], ["tsne"], ["discrimination"]):
        out = image if command[0] != "discrimination" else image.parent
        if command[0] == "discrimination":
            # Its --out is a folder; the table files it would write are the outputs.
            (image.parent / "discrimination.md").write_text("the user's notes")
        argv = ["analyze", *command, *common, *_data(synthetic_root), "--out", str(out)]
        assert main([*argv, "--overwrite"]) == 2, command
        assert "dataset folder" in capsys.readouterr().err, command
    assert image.read_bytes() == before
    assert (image.parent / "discrimination.md").read_text() == "the user's notes"
    (image.parent / "discrimination.md").unlink()


def test_export_and_convert_never_replace_their_input(model_file: Path, capsys) -> None:
    original = model_file.read_bytes()
    hard = model_file.with_name("alias.pt")
    os.link(model_file, hard)
    export = ["export", "--checkpoint", str(model_file), "--format", "torchscript"]
    assert main([*export, "--out", str(hard), "--overwrite"]) == 2
    assert "model file being exported" in capsys.readouterr().err
    convert = ["convert", "release", str(model_file), "--dataset", "voc"]
    assert main([*convert, "--out", str(hard), "--overwrite"]) == 2
    assert "is the input" in capsys.readouterr().err
    assert model_file.read_bytes() == original


def test_data_split_never_replaces_its_list(tmp_path: Path, capsys) -> None:
    out = tmp_path / "s"
    out.mkdir()
    names = out / "labeled.txt"
    names.write_text("\n".join(f"img{i}" for i in range(10)) + "\n")
    argv = ["data", "split", "--list", str(names), "--num-labeled", "3", "--out", str(out)]
    assert main([*argv, "--force"]) == 2
    assert "is the input" in capsys.readouterr().err
    assert len(names.read_text().split()) == 10


@pytest.mark.slow  # one real training step, about 5 s on a 2-core CPU
def test_training_into_a_finished_run_without_checkpoints_is_refused(
    synthetic_root: Path, tmp_path: Path, capsys
) -> None:
    from helpers import tiny_overrides

    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pt").write_bytes(b"the finished model")
    (run / "config.yaml").write_text("the finished run's recipe\n")
    argv = ["train", "synthetic/supervised.yaml", *tiny_overrides(synthetic_root, run)]
    assert main([*argv, "train.iterations=1"]) == 2
    err = capsys.readouterr().err
    assert "finished run (model.pt)" in err and "--overwrite" in err
    assert (run / "model.pt").read_bytes() == b"the finished model"
    assert (run / "config.yaml").read_text() == "the finished run's recipe\n"
    assert main([*argv, "train.iterations=1", "--overwrite"]) == 0
    assert (run / "model.pt").read_bytes() != b"the finished model"


def test_predict_refuses_an_output_that_is_a_hard_link_of_an_input(
    model_file: Path, tmp_path: Path, capsys
) -> None:
    from PIL import Image

    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    out.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(photos / "a.png")
    os.link(photos / "a.png", out / "a.png")  # the mask's name is a second name of the input
    original = (photos / "a.png").read_bytes()
    argv = ["predict", str(photos), "--checkpoint", str(model_file), "--out", str(out)]
    assert main([*argv, "--overwrite"]) == 2
    assert "overwrite the input image" in capsys.readouterr().err
    assert (photos / "a.png").read_bytes() == original
