"""The synthetic pretraining set and ``protoseg pretrain``: no leak of the target task,
deterministic images, timm-loadable weights, a cache keyed by the settings."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from protoseg.cli import build_parser, main
from protoseg.data.synthetic import MODES, PALETTES
from protoseg.data.synthetic_pretrain import (
    PRETRAIN_LABELS,
    PRETRAIN_PALETTES,
    PRETRAIN_SHAPES,
    PRETRAIN_TEXTURES,
    pretrain_shape_parts,
    render_pretrain_set,
)
from protoseg.engine import pretrain
from protoseg.engine.pretrain import PretrainSettings, cached_stamp, ensure_pretrained
from protoseg.models.backbone import Backbone

# Seconds on a CPU: a handful of 32 px images, one epoch.
TINY = PretrainSettings(num_images=64, num_val=16, epochs=1, batch_size=32)


def test_pretraining_classes_share_nothing_with_the_segmentation_classes():
    seg_shapes = {mode.shape for modes in MODES.values() for mode in modes}
    seg_textures = {mode.texture for modes in MODES.values() for mode in modes}
    seg_colours = {colour for pair in PALETTES for colour in pair}
    assert not seg_shapes & set(PRETRAIN_SHAPES)
    assert not seg_textures & set(PRETRAIN_TEXTURES)
    assert not seg_colours & {colour for pair in PRETRAIN_PALETTES for colour in pair}
    assert PRETRAIN_LABELS == PRETRAIN_SHAPES


def test_every_pretraining_shape_paints_pixels():
    from PIL import Image, ImageDraw

    for shape in PRETRAIN_SHAPES:
        stencil = Image.new("L", (40, 40), 0)
        draw = ImageDraw.Draw(stencil)
        for points, value in pretrain_shape_parts(shape, 12.0):
            draw.polygon([(x + 20, y + 20) for x, y in points], fill=value)
        painted = int((np.asarray(stencil) > 0).sum())
        assert 60 < painted < 40 * 40, shape


def test_pretraining_images_depend_on_seed_and_index_only():
    images, labels = render_pretrain_set(20, 32, seed=3)
    split_images, split_labels = render_pretrain_set(20, 32, seed=3, workers=2)
    assert np.array_equal(images, split_images) and np.array_equal(labels, split_labels)
    tail, tail_labels = render_pretrain_set(5, 32, seed=3, first=15)
    assert np.array_equal(tail, images[15:]) and np.array_equal(tail_labels, labels[15:])
    other, _ = render_pretrain_set(20, 32, seed=4)
    assert not np.array_equal(other, images)
    assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8
    assert labels.min() >= 0 and labels.max() < len(PRETRAIN_LABELS)


def test_pretrained_file_loads_into_timm_and_the_segmentation_backbone(tmp_path):
    result = ensure_pretrained(tmp_path, TINY, device="cpu", progress=False)
    assert not result.reused and result.file.parent == tmp_path
    assert 0.0 <= result.val_accuracy <= 100.0
    saved = load_file(str(result.file))
    # timm reads the file as a checkpoint of the classifier it came from.
    classifier = timm.create_model(
        "resnet10t",
        num_classes=len(PRETRAIN_LABELS),
        pretrained=True,
        pretrained_cfg_overlay={"file": str(result.file), "num_classes": len(PRETRAIN_LABELS)},
    )
    for key in ("fc.weight", "conv1.0.weight", "layer4.0.bn2.running_var"):
        assert torch.equal(classifier.state_dict()[key], saved[key]), key
    # model.pretrained=FILE: the dilated features-only trunk takes every weight but the fc.
    trunk = Backbone("resnet10t", str(result.file), output_stride=16).trunk.state_dict()
    assert torch.equal(trunk["layer3.0.conv1.weight"], saved["layer3.0.conv1.weight"])
    fresh = Backbone("resnet10t", "", output_stride=16).trunk.state_dict()
    assert not torch.equal(fresh["layer3.0.conv1.weight"], saved["layer3.0.conv1.weight"])


def test_pretraining_is_cached_by_its_settings(tmp_path, monkeypatch):
    first = ensure_pretrained(tmp_path, TINY, device="cpu", progress=False)
    stamp = cached_stamp(first.file)
    assert stamp is not None and stamp["num_images"] == TINY.num_images

    def refuse(*args, **kwargs):
        raise AssertionError("trained again although the cache holds these settings")

    monkeypatch.setattr(pretrain, "pretrain_backbone", refuse)
    again = ensure_pretrained(tmp_path, TINY, device="cpu", progress=False)
    assert again.reused and again.file == first.file
    assert again.val_accuracy == pytest.approx(first.val_accuracy, abs=1e-3)
    other = dataclasses.replace(TINY, seed=1)
    assert other.file_name() != TINY.file_name()
    with pytest.raises(AssertionError, match="trained again"):
        ensure_pretrained(tmp_path, other, device="cpu", progress=False)
    # A truncated file is not a cache hit: it is trained again, never trusted.
    first.file.write_bytes(first.file.read_bytes()[:100])
    assert cached_stamp(first.file) is None
    with pytest.raises(AssertionError, match="trained again"):
        ensure_pretrained(tmp_path, TINY, device="cpu", progress=False)


def test_pretrained_weights_do_not_depend_on_the_callers_thread_count(tmp_path):
    # The settings fix the thread count (torch's CPU reductions split per thread), so the
    # same settings give the same file on machines with other core counts.
    before = torch.get_num_threads()
    files = []
    try:
        for ambient in (1, 3):
            torch.set_num_threads(ambient)
            out = tmp_path / f"ambient{ambient}"
            files.append(pretrain.pretrain_backbone(TINY, out / "w.safetensors", "cpu", False))
            assert torch.get_num_threads() == ambient  # the caller's count is given back
        one, three = (load_file(str(result.file)) for result in files)
        assert all(torch.equal(one[k], three[k]) for k in one)
        # The count is a setting of its own: another one is another file name.
        assert dataclasses.replace(TINY, threads=1).file_name() != TINY.file_name()
    finally:
        torch.set_num_threads(before)


def test_pretrain_command_writes_then_reuses(tmp_path, capsys):
    args = ["pretrain", "--out", str(tmp_path), "--num-images", "64", "--epochs", "1"]
    args += ["--device", "cpu"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "trained in" in first and "model.pretrained=" in first
    written = sorted(tmp_path.glob("*.safetensors"))
    assert len(written) == 1
    assert main(args) == 0
    assert "reused" in capsys.readouterr().out
    assert sorted(tmp_path.glob("*.safetensors")) == written


def test_pretrain_help_states_the_settings_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    defaults = PretrainSettings()
    for value in (defaults.backbone, defaults.num_images, defaults.image_size, defaults.epochs):
        assert f"{value}" in text


def test_settings_are_checked():
    with pytest.raises(ValueError, match="must all be >= 1"):
        PretrainSettings(epochs=0).check()
    with pytest.raises(ValueError, match="image_size"):
        PretrainSettings(image_size=8).check()
    assert json.loads(json.dumps(TINY.stamp())) == TINY.stamp()


def test_demo_backbone_choice(tmp_path, monkeypatch):
    from protoseg.cli import demo
    from protoseg.data.splits import DataError

    assert demo.ensure_backbone(tmp_path, "none") is None
    weights = tmp_path / "mine.safetensors"
    weights.write_bytes(b"x")
    assert demo.ensure_backbone(tmp_path, str(weights)) == weights.resolve()
    with pytest.raises(DataError, match="no such file"):
        demo.ensure_backbone(tmp_path, str(tmp_path / "absent.safetensors"))
    # The default is the cached synthetic pretraining, made in the cache folder.
    seen = {}

    def fake_ensure(cache_dir, settings=None, device="auto", force=False, progress=True):
        seen["cache"] = cache_dir
        return pretrain.PretrainResult(tmp_path / "cached.safetensors", 50.0, 0.0, True)

    monkeypatch.setattr(pretrain, "ensure_pretrained", fake_ensure)
    assert demo.ensure_backbone(tmp_path / "cache", None) == (tmp_path / "cached.safetensors")
    assert seen["cache"] == tmp_path / "cache"
    assert main(["demo", "--out", str(tmp_path / "d"), "--pretrained", "/nowhere/w.pt"]) == 2
    assert not (tmp_path / "d" / "data").exists()  # refused before any image is drawn


# A four-block ViT of width 32 with 8 px patches: the shape of synthetic/vit.yaml, smaller.
TINY_VIT_ARGS = {"patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2, "img_size": 64}


def test_a_vit_pretrained_file_loads_into_the_vit_encoder(tmp_path):
    from protoseg.models.vit import ViTEncoder

    settings = dataclasses.replace(
        TINY, backbone="vit_small_patch14_dinov2", model_args=TINY_VIT_ARGS
    )
    # 32 px pretraining images through a ViT whose position grid is the 64 px crop's.
    result = ensure_pretrained(tmp_path, settings, device="cpu", progress=False)
    saved = load_file(str(result.file))
    assert saved["pos_embed"].shape == (1, 1 + 8 * 8, 32) and "head.weight" in saved
    # Every encoder tensor is in the file; its classifier is dropped without a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder = ViTEncoder(
            "vit_small_patch14_dinov2", str(result.file), encoder_args=TINY_VIT_ARGS
        )
    loaded = encoder.trunk.state_dict()
    for key in ("pos_embed", "patch_embed.proj.weight", "blocks.3.mlp.fc2.weight", "norm.bias"):
        assert torch.equal(loaded[key], saved[key]), key
    fresh = ViTEncoder("vit_small_patch14_dinov2", "", encoder_args=TINY_VIT_ARGS)
    assert not torch.equal(
        fresh.trunk.state_dict()["blocks.0.attn.qkv.weight"], saved["blocks.0.attn.qkv.weight"]
    )


def test_model_args_are_part_of_the_cache_key_and_checked():
    wider = dataclasses.replace(TINY, model_args={"embed_dim": 64})
    assert wider.stamp()["model_args"] == {"embed_dim": 64}
    assert wider.file_name() != TINY.file_name()
    assert dataclasses.replace(TINY, model_args={"embed_dim": 32}).file_name() != wider.file_name()
    with pytest.raises(ValueError, match="num_classes"):
        dataclasses.replace(TINY, model_args={"num_classes": 3}).check()


def test_pretrain_command_reads_model_args(tmp_path, capsys, monkeypatch):
    seen = []

    def record(out, settings, device, force):
        seen.append(settings)
        raise SystemExit(0)

    monkeypatch.setattr(pretrain, "ensure_pretrained", record)
    with pytest.raises(SystemExit):
        main(
            [
                "pretrain",
                "--out",
                str(tmp_path),
                "--model-arg",
                "depth=4",
                "--model-arg",
                "img_size=64",
            ]
        )
    assert seen[0].model_args == {"depth": 4, "img_size": 64}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        main(["pretrain", "--out", str(tmp_path), "--model-arg", "depth"])


def test_settings_without_model_args_keep_their_earlier_stamp():
    """Caches written before ``model_args`` existed stay valid: the field joins the stamp
    (and the file name) only when it is set."""
    assert "model_args" not in TINY.stamp()
    assert "model_args" in dataclasses.replace(TINY, model_args={"depth": 2}).stamp()
    assert PretrainSettings().file_name() == "resnet10t-synthetic-3846773da1.safetensors"
