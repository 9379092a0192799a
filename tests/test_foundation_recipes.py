"""The UniMatch V2 / PCR recipes on DINOv2 (configs/{voc,cityscapes}/{unimatch_v2,
unimatch_v2+pcr,pcr_dinov2}.yaml): each loads and validates for every split override, the
encoder override sets the DPT widths as UniMatch V2 does, and unimatch_v2 reports its EMA
teacher and its student as two heads through the real Trainer."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_overrides

from protoseg.config import load_config
from protoseg.engine.trainer import Trainer
from protoseg.inference.model_file import read_model_file
from protoseg.models import create_model

# This checkout's recipes (the installed package may be another checkout's).
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
METHOD_FILES = ("unimatch_v2.yaml", "unimatch_v2+pcr.yaml", "pcr_dinov2.yaml")
# The label splits each dataset's recipes take by override (classic and blender for VOC).
SPLITS = {
    "voc": ("pascal", (92, 183, 366, 732, 1464, 662, 1323, 2646, 5291)),
    "cityscapes": ("cityscapes", (186, 372, 744, 1488)),
}
SHARED_SPLITS = Path(__file__).resolve().parents[2] / "shared" / "splits"


def split_overrides(folder: str, labelled: int) -> list[str]:
    """The two overrides that choose a split (docs/foundation-encoders.md)."""
    return [
        f"data.labeled_split=splits/{folder}/{labelled}/labeled.txt",
        f"data.unlabeled_split=splits/{folder}/{labelled}/unlabeled.txt",
    ]


@pytest.mark.parametrize("dataset", sorted(SPLITS))
@pytest.mark.parametrize("method_file", METHOD_FILES)
def test_every_recipe_loads_for_every_split(dataset: str, method_file: str) -> None:
    folder, sizes = SPLITS[dataset]
    for labelled in sizes:
        cfg = load_config(
            CONFIGS / dataset / method_file, ["data.root=x", *split_overrides(folder, labelled)]
        )
        assert cfg.data.labeled_split == f"splits/{folder}/{labelled}/labeled.txt"
        assert cfg.model.name == "vit_dpt" and cfg.optim.name == "adamw"
        if SHARED_SPLITS.is_dir():  # the public U2PL lists, where this checkout has them
            assert (SHARED_SPLITS.parent / cfg.data.labeled_split).is_file()
            assert (SHARED_SPLITS.parent / cfg.data.unlabeled_split).is_file()


@pytest.mark.parametrize(
    ("dataset", "crop", "epochs", "batch", "micro"),
    [("voc", 518, 60, 16, 4), ("cityscapes", 798, 180, 8, 2)],
)
def test_recipes_hold_unimatch_v2_values(
    dataset: str, crop: int, epochs: int, batch: int, micro: int
) -> None:
    """The release's configs/{pascal,cityscapes}.yaml and unimatch_v2.py, per dataset."""
    for method_file in METHOD_FILES:
        cfg = load_config(CONFIGS / dataset / method_file, ["data.root=x"])
        assert (cfg.data.crop_size, cfg.train.epochs, cfg.train.batch_size) == (crop, epochs, batch)
        assert cfg.train.max_device_batch == micro and crop % 14 == 0
        o = cfg.optim
        assert (o.lr, o.decoder_lr_mult, o.weight_decay, list(o.betas)) == (
            5e-6,
            40,
            0.01,
            [0.9, 0.999],
        )
        assert cfg.model.backbone == "vit_base_patch14_dinov2"
        assert cfg.model.vit.position_resize == "dinov2" and cfg.eval.all_heads
        if dataset == "voc":
            assert cfg.eval.mode == "whole" and cfg.eval.resize_to_multiple == 14
        else:
            ev = cfg.eval
            assert (ev.mode, ev.window, ev.stride, ev.merge) == (
                "sliding",
                798,
                532,
                "probabilities",
            )
            assert cfg.train.loss == "ohem" and cfg.train.ohem_min_kept == 100000


@pytest.mark.parametrize(
    ("backbone", "features", "out_channels"),
    [
        # unimatch_v2.py l.54-58, by encoder size.
        ("vit_small_patch14_dinov2", 64, (48, 96, 192, 384)),
        ("vit_base_patch14_dinov2", 128, (96, 192, 384, 768)),
        ("vit_large_patch14_dinov2", 256, (256, 512, 1024, 1024)),
    ],
)
def test_the_encoder_override_sets_the_dpt_widths(
    backbone: str, features: int, out_channels: tuple[int, ...]
) -> None:
    cfg = load_config(
        CONFIGS / "voc" / "unimatch_v2+pcr.yaml", ["data.root=x", f"model.backbone={backbone}"]
    )
    # Random weights on the meta device: the widths without a download or the memory.
    with torch.device("meta"):
        model = create_model(dataclasses.replace(cfg.model, pretrained=""), cfg.data.num_classes)
    assert model.feature_dim == features
    assert tuple(p.out_channels for p in model.head.projects) == out_channels


# ---- the teacher and the student as two heads -------------------------------------------------
@pytest.mark.parametrize("method", ["unimatch_v2", "unimatch_v2+pcr"])
def test_teacher_and_student_are_both_evaluated_and_the_teacher_deployed(
    synthetic_root: Path, tmp_path: Path, method: str
) -> None:
    out = tmp_path / "run"
    overrides = tiny_overrides(
        synthetic_root, out, "train.iterations=4", "train.eval_every=2", method=method
    )
    cfg = load_config(
        "synthetic/base.yaml",
        [f"method.name={method}", *overrides, "eval.all_heads=true", "optim.lr=0.01"],
    )
    trainer = Trainer(cfg)
    result = trainer.fit()
    heads = ("linear", "prototype", "student") if method.endswith("+pcr") else ("linear", "student")
    assert trainer.method.heads == heads
    assert set(result.final) == set(heads)
    for head in heads:
        saved = json.loads((out / f"eval_final_{head}.json").read_text())
        assert saved["miou"] == pytest.approx(result.final[head].miou)
    # The periodic evaluation at step 2 lists every head and its best so far.
    (entry,) = [e for e in result.history if "val_miou_student" in e]
    assert entry["step"] == 2
    for head in heads:
        assert entry[f"best_val_miou_{head}"] == entry[f"val_miou_{head}"]
    # best.pt follows the primary head, the EMA teacher's linear head.
    best = json.loads((out / "eval_best.json").read_text())
    primary = max(entry["val_miou_linear"], result.final["linear"].miou)
    assert best["miou"] == pytest.approx(primary)
    # The model file holds the teacher, which differs from the student after 4 steps.
    deployed = read_model_file(out / "model.pt").state_dict
    teacher = trainer.method.teacher.network.state_dict()
    student = trainer.method.student.state_dict()
    assert set(deployed) == set(teacher)
    assert all(torch.equal(deployed[k], teacher[k].cpu()) for k in teacher)
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)


def test_the_student_head_evaluates_the_student_network(synthetic_root: Path, tmp_path: Path):
    cfg = load_config(
        "synthetic/base.yaml",
        [
            "method.name=unimatch_v2",
            *tiny_overrides(synthetic_root, tmp_path, method="unimatch_v2"),
        ],
    )
    method = Trainer(cfg).method
    assert method.inference_model("student") is method.student
    assert method.inference_model("linear") is method.teacher.network
    assert "student" not in method.deploy()["heads"]
    with pytest.raises(ValueError, match="its heads: linear, student"):
        method.inference_model("ema")


def test_history_keeps_each_heads_best_so_far() -> None:
    from protoseg.engine.callbacks import history_entry
    from protoseg.inference import EvalResult

    def result(miou: float) -> EvalResult:
        return EvalResult(miou=miou, iou=[miou], pixel_acc=0.0, num_images=1, confusion=[[1]])

    history = [history_entry([], 2, {"linear": result(40.0), "student": result(50.0)})]
    history.append(history_entry(history, 4, {"linear": result(45.0), "student": result(30.0)}))
    assert history[1]["val_miou_student"] == 30.0 and history[1]["best_val_miou_student"] == 50.0
    assert history[1]["best_val_miou_linear"] == 45.0
