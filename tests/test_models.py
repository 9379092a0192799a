"""Tests of protoseg.models specific to the release's DeepLabv3+ and its timm backbones.

The checks every configuration shares live in model_contract.py (run by
test_models_contract.py); backbone weights are tested in test_models_weights.py.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from protoseg.config import ModelConfig
from protoseg.models import (
    CONFIG_ONLY_FIELDS,
    MODELS,
    Backbone,
    DeepLabV3Plus,
    ModelError,
    ViTDPT,
    count_parameters,
    create_model,
    register_model,
)
from protoseg.models.deeplabv3plus import scaled_aspp_dilations

RELEASE_TOTAL = 62_623_189
RELEASE_ENCODER = 42_623_936
RELEASE_DECODER = 19_999_253


def _layer4_dilations(backbone: Backbone) -> tuple[int, ...]:
    """The dilations of layer4's 3x3 conv2s, checking their padding keeps the size."""
    convs = [block.conv2 for block in backbone.trunk.layer4]
    assert all(c.padding == c.dilation for c in convs)
    return tuple(c.dilation[0] for c in convs)


def test_release_network_resnet101s() -> None:
    # The only test that builds resnet101s: the release's 21-class network at stride 8.
    model = create_model(ModelConfig(backbone="resnet101s"), 21).eval()
    encoder = count_parameters(model.backbone)
    assert encoder == RELEASE_ENCODER
    assert count_parameters(model) - encoder == RELEASE_DECODER
    assert count_parameters(model) == RELEASE_TOTAL
    assert model.feature_dim == 512
    assert model.aux is None
    assert _layer4_dilations(model.backbone) == (4, 8, 16)
    assert model.backbone.layer4_dilations == (4, 8, 16)
    assert model.backbone.reductions == (4, 8, 8)
    assert model.aspp_dilations == [12, 24, 36]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 33, 47))
    assert out["logits"].shape == (1, 21, 33, 47)
    # The deep stem pads, so the stride-4 map rounds up.
    assert out["features"].shape == (1, 512, 9, 12)


def test_aux_head_parameter_count() -> None:
    kwargs = {"backbone": "test_resnet", "output_stride": 16}
    plain = DeepLabV3Plus(5, **kwargs)
    with_aux = DeepLabV3Plus(5, aux_head=True, **kwargs)
    mid = with_aux.backbone.channels[1]
    # 3x3 conv mid->256 (no bias), BatchNorm, 1x1 conv 256->5 with bias. The released
    # checkpoints' auxor.aux.0 has a weight and no bias (U2PL's Aux_Module has one).
    aux = mid * 256 * 9 + 2 * 256 + 256 * 5 + 5
    assert with_aux.aux is not None
    assert with_aux.aux[0].bias is None
    assert count_parameters(with_aux.aux) == aux
    assert count_parameters(with_aux) == count_parameters(plain) + aux


@pytest.mark.parametrize(
    ("output_stride", "multi_grid", "expected"),
    [(8, True, (4, 8)), (8, False, (4, 4)), (16, True, (2, 4)), (32, True, (1, 1))],
)
def test_multi_grid_dilations(output_stride: int, multi_grid: bool, expected: tuple) -> None:
    # resnet18's layer4 has two blocks, enough to see the (1, 2, 4) grid.
    backbone = Backbone("resnet18", output_stride=output_stride, multi_grid=multi_grid)
    assert _layer4_dilations(backbone) == expected
    # Stride 32 leaves layer4 strided, so the grid has nothing to scale.
    recorded = expected if multi_grid and output_stride != 32 else None
    assert backbone.layer4_dilations == recorded


@pytest.mark.parametrize("name", ["test_efficientnet", "test_convnext"])
def test_multi_grid_is_noop_without_resnet_layer4(name: str) -> None:
    assert Backbone(name, output_stride=16, multi_grid=True).layer4_dilations is None


@pytest.mark.parametrize(("output_stride", "expected"), [(8, 12), (16, 6), (32, 3)])
def test_aspp_dilations_follow_output_stride(output_stride: int, expected: int) -> None:
    model = DeepLabV3Plus(2, backbone="test_resnet", output_stride=output_stride)
    assert model.aspp_dilations == [expected, 2 * expected, 3 * expected]
    # branches[0] is the 1x1 conv; the dilated 3x3 branches follow.
    first_dilated = model.aspp.branches[1][0]
    assert first_dilated.dilation == first_dilated.padding == (expected, expected)


def test_scaled_aspp_dilations() -> None:
    assert scaled_aspp_dilations([12, 24, 36], 8) == [12, 24, 36]
    assert scaled_aspp_dilations((12, 24, 36), 16) == [6, 12, 18]
    assert scaled_aspp_dilations([12, 24, 36], 32) == [3, 6, 9]
    assert scaled_aspp_dilations([2], 32) == [1]


def test_feature_layout_is_low_level_then_aspp() -> None:
    model = DeepLabV3Plus(3, backbone="test_resnet", low_level_channels=48, aspp_channels=64).eval()
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


def test_decoder_also_runs_on_perturbed_encoder_maps() -> None:
    model = DeepLabV3Plus(3, backbone="test_resnet", output_stride=16, aux_head=True).eval()
    x = torch.randn(2, 3, 33, 47)
    seen: list[torch.Size] = []

    def zero(features: torch.Tensor) -> torch.Tensor:
        seen.append(features.shape)
        return torch.zeros_like(features)

    with torch.no_grad():
        clean = model(x)
        same = model(x, perturb=lambda features: features)
        zeroed = model(x, perturb=zero)
        low, _, high = model.backbone(x)
    assert "perturbed_logits" not in clean
    assert set(same) == {"logits", "features", "aux", "perturbed_logits"}
    # The clean outputs are unchanged; the perturbed ones follow the perturbation of the
    # low-level and the last encoder map (not the aux head's).
    for key in ("logits", "features", "aux"):
        torch.testing.assert_close(same[key], clean[key])
        torch.testing.assert_close(zeroed[key], clean[key])
    torch.testing.assert_close(same["perturbed_logits"], clean["logits"])
    assert seen == [low.shape, high.shape]
    assert not torch.allclose(zeroed["perturbed_logits"], clean["logits"])


def test_count_parameters() -> None:
    layer = nn.Conv2d(3, 4, 3)
    layer.bias.requires_grad_(False)
    assert count_parameters(layer) == 3 * 4 * 9 + 4


def test_backbone_reports_timm_channels() -> None:
    backbone = Backbone("resnet10t", output_stride=16)
    assert backbone.channels == (64, 256, 512)
    assert backbone.reductions == (4, 16, 16)
    assert backbone.name == "resnet10t"
    assert backbone.output_stride == 16


def test_config_fields_are_the_network_arguments() -> None:
    # create_model passes each network the ModelConfig fields its constructor names; a
    # field no network takes would never reach one, an argument without a field could not
    # be configured.
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    taken: set[str] = set()
    for cls in (DeepLabV3Plus, ViTDPT):
        names = set(inspect.signature(cls).parameters) - {"num_classes"}
        assert names <= set(fields) - CONFIG_ONLY_FIELDS, cls.__name__
        taken |= names
    assert taken == set(fields) - CONFIG_ONLY_FIELDS
    params = inspect.signature(DeepLabV3Plus).parameters
    defaults = ModelConfig()
    for name in set(params) - {"num_classes"}:
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        config_default = getattr(defaults, name)
        if isinstance(config_default, list):
            config_default = tuple(config_default)
        assert params[name].default == config_default, name


def test_register_model_adds_to_models() -> None:
    @register_model("test_tiny_net")
    class TinyNet(nn.Module):
        def __init__(self, num_classes: int, **kwargs: object) -> None:
            super().__init__()
            self.num_classes = num_classes
            self.kwargs = kwargs

    try:
        assert MODELS["test_tiny_net"] is TinyNet
        built = create_model(ModelConfig(name="test_tiny_net", backbone="test_resnet"), 4)
        assert isinstance(built, TinyNet)
        assert built.num_classes == 4
        assert built.kwargs["backbone"] == "test_resnet"
        assert not set(built.kwargs) & CONFIG_ONLY_FIELDS
        with pytest.raises(ValueError, match="already registered"):
            register_model("deeplabv3plus")(TinyNet)
    finally:
        MODELS.pop("test_tiny_net")
    assert MODELS["deeplabv3plus"] is DeepLabV3Plus


def test_unknown_model_name() -> None:
    with pytest.raises(ModelError, match="deeplabv3plus"):
        create_model(ModelConfig(name="pspnet"), 21)


def test_model_error_is_value_error() -> None:
    assert issubclass(ModelError, ValueError)
    with pytest.raises(ValueError, match="num_classes"):
        create_model(ModelConfig(backbone="test_resnet"), 0)


def test_unsupported_output_stride() -> None:
    with pytest.raises(ModelError, match="output_stride"):
        Backbone("test_resnet", output_stride=4)


def test_unknown_backbone() -> None:
    with pytest.raises(ModelError, match="resnet1O1s") as info:
        DeepLabV3Plus(21, backbone="resnet1O1s")
    assert "timm.list_models" in str(info.value)
    assert "resnet101s" in str(info.value)


def test_backbone_without_dilation_support() -> None:
    with pytest.raises(ModelError, match="densenet121"):
        DeepLabV3Plus(21, backbone="densenet121", output_stride=8)
