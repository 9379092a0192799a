"""Tests of protoseg.models: the release's DeepLabv3+ rebuilt on timm backbones."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from protoseg.config import ModelConfig
from protoseg.models import (
    MODELS,
    Backbone,
    DeepLabV3Plus,
    ModelError,
    count_parameters,
    create_model,
)
from protoseg.models import backbone as backbone_module
from protoseg.models.deeplabv3plus import scaled_aspp_dilations

RELEASE_TOTAL = 62_623_189
RELEASE_ENCODER = 42_623_936
RELEASE_DECODER = 19_999_253


def _model(num_classes: int = 21, **overrides: object) -> DeepLabV3Plus:
    """Build a DeepLabV3Plus from ModelConfig defaults plus ``overrides``."""
    model = create_model(ModelConfig(**overrides), num_classes)  # type: ignore[arg-type]
    assert isinstance(model, DeepLabV3Plus)
    return model


def _layer4_dilations(model: DeepLabV3Plus) -> tuple[int, ...]:
    """The dilations of layer4's 3x3 conv2s, checking their padding keeps the size."""
    convs = [block.conv2 for block in model.backbone.trunk.layer4]
    assert all(c.padding == c.dilation for c in convs)
    return tuple(c.dilation[0] for c in convs)


@pytest.fixture(scope="module")
def r101_os8() -> DeepLabV3Plus:
    """The release's network: resnet101s, output stride 8, no aux head, 21 classes."""
    return _model(backbone="resnet101s", output_stride=8, aux_head=False).eval()


@pytest.fixture(scope="module")
def r101_os16_aux() -> DeepLabV3Plus:
    """resnet101s at output stride 16 with the auxiliary head."""
    return _model(backbone="resnet101s", output_stride=16, aux_head=True).eval()


def test_release_parameter_count(r101_os8: DeepLabV3Plus) -> None:
    encoder = count_parameters(r101_os8.backbone)
    assert encoder == RELEASE_ENCODER
    assert count_parameters(r101_os8) - encoder == RELEASE_DECODER
    assert count_parameters(r101_os8) == RELEASE_TOTAL
    assert r101_os8.feature_dim == 512


def test_aux_head_adds_parameters_only_when_on(r101_os16_aux: DeepLabV3Plus) -> None:
    # The aux head: 3x3 conv 1024->256 (no bias), BN, 1x1 conv 256->21 with bias.
    aux = 1024 * 256 * 9 + 2 * 256 + 256 * 21 + 21
    assert r101_os16_aux.aux is not None
    assert count_parameters(r101_os16_aux.aux) == aux
    # The ASPP branch weights do not depend on the dilation, so OS 16 counts the same.
    assert count_parameters(r101_os16_aux) == RELEASE_TOTAL + aux


def test_multi_grid_dilations_os8(r101_os8: DeepLabV3Plus) -> None:
    assert _layer4_dilations(r101_os8) == (4, 8, 16)
    assert r101_os8.backbone.layer4_dilations == (4, 8, 16)
    assert r101_os8.aspp_dilations == [12, 24, 36]


def test_multi_grid_dilations_os16(r101_os16_aux: DeepLabV3Plus) -> None:
    assert _layer4_dilations(r101_os16_aux) == (2, 4, 8)
    # ASPP rates are stated for stride 8 and halved at stride 16.
    assert r101_os16_aux.aspp_dilations == [6, 12, 18]


def test_multi_grid_off_and_stride_32_keep_timm_dilations() -> None:
    assert _layer4_dilations(_model(backbone="resnet18", multi_grid=False)) == (4, 4)
    assert _layer4_dilations(_model(backbone="resnet18", multi_grid=True)) == (4, 8)
    assert _layer4_dilations(_model(backbone="resnet18", output_stride=32)) == (1, 1)


def test_scaled_aspp_dilations() -> None:
    assert scaled_aspp_dilations([12, 24, 36], 8) == [12, 24, 36]
    assert scaled_aspp_dilations([12, 24, 36], 16) == [6, 12, 18]
    assert scaled_aspp_dilations([12, 24, 36], 32) == [3, 6, 9]


def _check_shapes(model: DeepLabV3Plus, height: int, width: int, batch: int = 2) -> None:
    """Run one forward and check every output's shape against the input and layer1."""
    x = torch.randn(batch, 3, height, width)
    with torch.no_grad():
        out = model(x)
        low = model.backbone(x)[0]
    c = model.num_classes
    assert out["logits"].shape == (batch, c, height, width)
    assert out["features"].shape == (batch, model.feature_dim, *low.shape[-2:])
    # ResNet stems pad, so stride-4 maps round up.
    assert low.shape[-2:] == (math.ceil(height / 4), math.ceil(width / 4))
    assert ("aux" in out) == (model.aux is not None)
    if model.aux is not None:
        assert out["aux"].shape == (batch, c, height, width)


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("aux_head", [False, True])
@pytest.mark.parametrize(("height", "width"), [(65, 97), (33, 47)])
def test_output_shapes_resnet18(
    output_stride: int, aux_head: bool, height: int, width: int
) -> None:
    model = _model(5, backbone="resnet18", output_stride=output_stride, aux_head=aux_head)
    assert model.feature_dim == 512
    # Train mode too: aux is produced in both modes.
    model.train()
    _check_shapes(model, height, width)
    model.eval()
    _check_shapes(model, height, width, batch=1)


def test_output_shapes_resnet101s(r101_os8: DeepLabV3Plus, r101_os16_aux: DeepLabV3Plus) -> None:
    _check_shapes(r101_os8, 65, 65, batch=1)
    _check_shapes(r101_os16_aux, 33, 47, batch=1)


def test_feature_layout_is_low_level_then_aspp() -> None:
    model = _model(3, backbone="resnet18", low_level_channels=48, aspp_channels=64).eval()
    x = torch.randn(1, 3, 33, 47)
    with torch.no_grad():
        out = model(x)
        low, _, high = model.backbone(x)
        low_branch = model.low_level(low)
        aspp = F.interpolate(
            model.aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=True
        )
    assert model.feature_dim == 48 + 64
    torch.testing.assert_close(out["features"][:, :48], low_branch)
    torch.testing.assert_close(out["features"][:, 48:], aspp)


def test_classify_reproduces_logits() -> None:
    model = _model(7, backbone="resnet18", aux_head=True).eval()
    x = torch.randn(2, 3, 65, 97)
    with torch.no_grad():
        out = model(x)
        head = model.classify(out["features"])
    assert head.shape == (2, 7, *out["features"].shape[-2:])
    up = F.interpolate(head, size=x.shape[-2:], mode="bilinear", align_corners=True)
    torch.testing.assert_close(up, out["logits"])


def test_param_groups_partition_parameters() -> None:
    model = _model(backbone="resnet18", aux_head=True)
    backbone_params, decoder_params = model.param_groups()
    ids_backbone = [id(p) for p in backbone_params]
    ids_decoder = [id(p) for p in decoder_params]
    everything = [id(p) for p in model.parameters()]
    assert sorted(ids_backbone + ids_decoder) == sorted(everything)
    assert len(set(ids_backbone + ids_decoder)) == len(everything)
    assert set(ids_backbone) == {id(p) for p in model.backbone.trunk.parameters()}
    assert {id(p) for p in model.classifier.parameters()} <= set(ids_decoder)
    assert model.aux is not None
    assert {id(p) for p in model.aux.parameters()} <= set(ids_decoder)


def test_count_parameters() -> None:
    layer = nn.Conv2d(3, 4, 3)
    layer.bias.requires_grad_(False)
    assert count_parameters(layer) == 3 * 4 * 9 + 4


def test_backbone_reports_timm_channels() -> None:
    trunk = Backbone(ModelConfig(backbone="resnet18", output_stride=16))
    assert trunk.channels == (64, 256, 512)
    assert trunk.reductions == (4, 16, 16)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_from_local_file(tmp_path: Path, suffix: str) -> None:
    source = timm.create_model("resnet18")
    with torch.no_grad():
        source.conv1.weight.normal_()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        safetensors_torch = pytest.importorskip("safetensors.torch")
        safetensors_torch.save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    model = _model(backbone="resnet18", pretrained=str(path))
    torch.testing.assert_close(model.backbone.trunk.conv1.weight, source.conv1.weight)
    torch.testing.assert_close(
        model.backbone.trunk.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var
    )
    assert _layer4_dilations(model) == (4, 8)


def test_pretrained_file_with_foreign_keys_is_rejected(tmp_path: Path) -> None:
    state = timm.create_model("resnet18").state_dict()
    path = tmp_path / "segmentation_checkpoint.pth"
    torch.save({f"encoder.{k}": v for k, v in state.items()}, path)
    with pytest.raises(ModelError, match="does not hold 'resnet18' weights"):
        _model(backbone="resnet18", pretrained=str(path))


def test_imagenet_offline_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hf_constants = pytest.importorskip("huggingface_hub.constants")
    # An empty cache guarantees a download is needed; offline mode makes it fail.
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelError) as info:
        _model(backbone="resnet18", pretrained="imagenet")
    assert time.monotonic() - start < 20
    message = str(info.value)
    assert "model.pretrained=" in message
    assert timm.models.get_pretrained_cfg("resnet18").hf_hub_id in message


def test_unreachable_hub_fails_before_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hf_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(backbone_module, "_reachable", lambda host, port, timeout: False)
    with pytest.raises(ModelError, match="cannot connect") as info:
        _model(backbone="resnet18", pretrained="resnet18.tv_in1k")
    assert "model.pretrained=/path/to/resnet18" in str(info.value)
    assert "timm/resnet18.tv_in1k" in str(info.value)


def test_missing_pretrained_path_is_named(tmp_path: Path) -> None:
    path = tmp_path / "no_such_weights.pth"
    with pytest.raises(ModelError, match="no_such_weights.pth"):
        _model(backbone="resnet18", pretrained=str(path))


@pytest.mark.parametrize(
    ("pretrained", "message"),
    [("resnet18.no_such_tag", "neither an existing"), ("resnet50.tv_in1k", "names weights of")],
)
def test_bad_pretrained_tag(pretrained: str, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        _model(backbone="resnet18", pretrained=pretrained)


def test_unknown_backbone() -> None:
    with pytest.raises(ModelError, match="resnet1O1s") as info:
        _model(backbone="resnet1O1s")
    assert "timm.list_models" in str(info.value)
    assert "resnet101s" in str(info.value)


def test_backbone_without_dilation_support() -> None:
    with pytest.raises(ModelError, match="densenet121"):
        _model(backbone="densenet121", output_stride=8)


def test_unknown_model_name() -> None:
    assert MODELS["deeplabv3plus"] is DeepLabV3Plus
    with pytest.raises(ModelError, match="deeplabv3plus"):
        create_model(ModelConfig(name="pspnet"), 21)


def test_model_error_is_value_error() -> None:
    assert issubclass(ModelError, ValueError)
    with pytest.raises(ValueError):
        create_model(ModelConfig(backbone="resnet18"), 0)


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("name", ["mobilenetv3_small_100", "convnext_atto"])
def test_other_timm_backbones(name: str, output_stride: int) -> None:
    model = _model(4, backbone=name, output_stride=output_stride, aux_head=True)
    assert model.backbone.reductions == (4, output_stride, output_stride)
    # No ResNet layer4 here: multi-grid is a no-op rather than an error.
    assert model.backbone.layer4_dilations is None
    model.eval()
    x = torch.randn(1, 3, 65, 97)
    with torch.no_grad():
        out = model(x)
        low = model.backbone(x)[0]
    assert out["logits"].shape == (1, 4, 65, 97)
    assert out["aux"].shape == (1, 4, 65, 97)
    assert out["features"].shape == (1, 512, *low.shape[-2:])
    assert model.low_level[0].in_channels == model.backbone.channels[0]
