"""The ``vit_dpt`` network: tiny DINOv2/DINOv3 encoders through the model contract, the
real sizes' parameter counts on the meta device, weights files, and the one-GPU switches."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from model_contract import ModelTester
from safetensors.torch import save_file
from torch import Tensor, nn

from protoseg.config import (
    ConfigError,
    ModelConfig,
    ViTConfig,
    from_dict,
    load_config,
    recipe_changes,
    to_dict,
)
from protoseg.models import ModelError, ViTDPT, count_parameters, create_model, lock_backbone
from protoseg.models.vit import default_blocks

# DINOv2-shaped and DINOv3-shaped encoders small enough for a CPU test (pretrained off).
TINY_ARGS = {"embed_dim": 32, "depth": 4, "num_heads": 2}
TINY_DINOV2 = "vit_small_patch14_dinov2"
TINY_DINOV3 = "vit_small_patch16_dinov3"
NARROW = {"features": 16, "out_channels": [8, 16, 16, 32]}


def tiny_vit(**overrides: Any) -> ViTConfig:
    """Settings of a tiny patch-14 encoder (img_size 70 = 5 x 5 patches) with a narrow DPT."""
    args = {**TINY_ARGS, "img_size": 70}
    return ViTConfig(**{**NARROW, "encoder_args": args, **overrides})


class ViTTester(ModelTester):
    """ModelTester for vit_dpt: features at 8x the (padded) patch grid."""

    model_name = "vit_dpt"

    def feature_size(self, model: nn.Module, size: tuple[int, int]) -> tuple[int, int]:
        p = model.patch_size
        return 8 * math.ceil(size[0] / p), 8 * math.ceil(size[1] / p)


class TestTinyDINOv2DPT(ViTTester):
    kwargs: ClassVar[dict[str, Any]] = {"backbone": TINY_DINOV2, "vit": tiny_vit()}
    # Multiples of 14, not square, and another grid than the 5 x 5 the encoder is built for.
    size = (42, 70)


class TestTinyDINOv2Reg4DPT(ViTTester):
    kwargs: ClassVar[dict[str, Any]] = {
        "backbone": "vit_small_patch14_reg4_dinov2",
        "vit": tiny_vit(blocks=[0, 1, 2, 3]),
    }
    size = (42, 70)


class TestTinyDINOv3DPT(ViTTester):
    kwargs: ClassVar[dict[str, Any]] = {
        "backbone": TINY_DINOV3,
        "vit": ViTConfig(**NARROW, encoder_args=TINY_ARGS),
    }


def build_tiny(seed: int = 0, backbone: str = TINY_DINOV2, **vit: Any) -> ViTDPT:
    torch.manual_seed(seed)
    return ViTDPT(3, backbone=backbone, vit=tiny_vit(**vit))


def images(*size: int, batch: int = 2, seed: int = 0) -> Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


# --- the real sizes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backbone", "encoder", "head"),
    [
        # Encoders as timm counts them; heads as UniMatch V2 counts its DPTHead with 21
        # classes (its printed 2.7 / 10.9 / 31.2 M), which includes a residual unit of the
        # deepest refine block that its forward never runs and protoseg leaves out.
        ("vit_small_patch14_dinov2", 22_056_192, 2_739_061),
        ("vit_base_patch14_dinov2", 86_579_712, 10_948_309),
        ("vit_large_patch14_dinov2", 304_367_616, 31_210_517),
    ],
)
def test_parameter_counts_match_timm_and_unimatch_v2(
    backbone: str, encoder: int, head: int
) -> None:
    with torch.device("meta"):
        model = create_model(ModelConfig(name="vit_dpt", backbone=backbone), 21)
    unused_unit = 2 * (9 * model.feature_dim**2 + model.feature_dim)
    assert count_parameters(model.backbone) == encoder
    assert count_parameters(model.head) + unused_unit == head
    blocks = {12: (2, 5, 8, 11), 24: (4, 11, 17, 23)}[model.backbone.depth]
    assert model.backbone.blocks == blocks


def test_dinov3_sizes_get_unimatch_v2_widths_and_blocks() -> None:
    with torch.device("meta"):
        small = create_model(ModelConfig(name="vit_dpt", backbone=TINY_DINOV3), 21)
        large = create_model(ModelConfig(name="vit_dpt", backbone="vit_large_patch16_dinov3"), 21)
    assert (small.feature_dim, small.backbone.blocks, small.patch_size) == (64, (2, 5, 8, 11), 16)
    assert (large.feature_dim, large.backbone.blocks) == (256, (4, 11, 17, 23))


def test_default_blocks_by_depth() -> None:
    assert default_blocks(12) == (2, 5, 8, 11)
    assert default_blocks(24) == (4, 11, 17, 23)
    assert default_blocks(40) == (9, 19, 29, 39)
    # DINOv3 H+ (32 blocks): the last block of each quarter.
    assert default_blocks(32) == (7, 15, 23, 31)
    with pytest.raises(ModelError, match="four encoder blocks"):
        default_blocks(3)


# --- the encoder's maps ------------------------------------------------------------------


def test_encoder_maps_are_the_normed_patch_tokens_of_the_chosen_blocks() -> None:
    # Six blocks: the default takes the last of each quarter, 0, 2, 3 and 5.
    model = build_tiny(encoder_args={**TINY_ARGS, "depth": 6, "img_size": 70}).eval()
    assert model.backbone.blocks == (0, 2, 3, 5)
    encoder: Any = model.backbone.trunk
    x = images(28, 42)
    with torch.no_grad():
        maps = model.backbone(x)
        # The same by hand: embed, run the blocks, keep the chosen ones, final norm, drop
        # the class token, (B, N, C) -> (B, C, h, w).
        tokens = encoder.norm_pre(encoder._pos_embed(encoder.patch_embed(x)))
        taken = []
        for i, block in enumerate(encoder.blocks):
            tokens = block(tokens)
            if i in model.backbone.blocks:
                taken.append(encoder.norm(tokens)[:, encoder.num_prefix_tokens :])
    assert len(maps) == 4
    for got, want in zip(maps, taken):
        assert got.shape == (2, 32, 2, 3)
        torch.testing.assert_close(got, want.transpose(1, 2).reshape(2, 32, 2, 3))


def test_input_off_the_patch_grid_is_padded_bottom_right() -> None:
    model = build_tiny().eval()
    x = images(33, 47)
    padded = torch.nn.functional.pad(x, (0, 56 - 47, 0, 42 - 33))
    with torch.no_grad():
        out, ref = model(x), model(padded)
    assert out["logits"].shape == (2, 3, 33, 47)
    torch.testing.assert_close(out["logits"], ref["logits"][:, :, :33, :47])
    torch.testing.assert_close(out["features"], ref["features"])


def test_encoder_rejects_a_size_off_the_grid_with_the_fix() -> None:
    model = build_tiny()
    with pytest.raises(ModelError, match="multiple of the patch size 14.*resize_to_multiple=14"):
        model.backbone(images(30, 42))


def test_feature_transform_replaces_the_encoder_maps() -> None:
    model = build_tiny().eval()
    x = images(28, 42)
    with torch.no_grad():
        plain = model(x)["logits"]
        same = model(x, feature_transform=lambda maps: maps)["logits"]
        # Zero every channel of image 0 only: image 1's logits cannot change.
        mask = torch.ones(2, 32, 1, 1)
        mask[0] = 0
        dropped = model(x, feature_transform=lambda maps: [m * mask for m in maps])["logits"]
    torch.testing.assert_close(same, plain)
    torch.testing.assert_close(dropped[1], plain[1])
    assert not torch.allclose(dropped[0], plain[0])
    with pytest.raises(ValueError, match="four encoder maps"):
        model(x, feature_transform=lambda maps: maps[:3])


# --- one GPU: checkpointing, fused attention, bf16 ---------------------------------------


def _grads(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    model.zero_grad()
    model(x)["logits"].square().mean().backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    x = images(28, 42)
    plain = build_tiny().train()
    checkpointed = build_tiny(checkpointing=True).train()
    assert checkpointed.backbone.checkpointing
    ref, got = _grads(plain, x), _grads(checkpointed, x)
    assert ref.keys() == got.keys() and len(ref) == len(list(plain.parameters()))
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], msg=key)


def test_explicit_attention_matches_fused_attention() -> None:
    fused, explicit = build_tiny().eval(), build_tiny(fused_attention=False).eval()
    layers = [m for m in explicit.modules() if hasattr(m, "fused_attn")]
    assert layers and not any(m.fused_attn for m in layers)
    x = images(28, 42)
    with torch.no_grad():
        torch.testing.assert_close(explicit(x)["logits"], fused(x)["logits"])


def test_bf16_autocast_through_checkpointing_on_cpu() -> None:
    x = images(28, 42)
    model = build_tiny(checkpointing=True).train()
    with torch.no_grad():
        ref = model(x)["logits"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)["logits"]
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # bf16 keeps ~3 significant digits: close to fp32, not equal.
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)


def test_lock_backbone_freezes_the_encoder_only() -> None:
    model = build_tiny()
    assert lock_backbone(model) == len(list(model.backbone.parameters()))
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())


# --- weights -----------------------------------------------------------------------------


def _equal_encoders(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_loads_a_timm_safetensors_file(tmp_path: Path) -> None:
    source = build_tiny(seed=1)
    path = tmp_path / "encoder.safetensors"
    save_file(source.backbone.trunk.state_dict(), str(path))
    loaded = build_tiny(seed=2).backbone.trunk  # another init, to see the file win
    torch.manual_seed(2)
    model = ViTDPT(3, backbone=TINY_DINOV2, pretrained=str(path), vit=tiny_vit())
    _equal_encoders(model.backbone.trunk, source.backbone.trunk)
    assert not torch.equal(loaded.cls_token, source.backbone.trunk.cls_token)


def test_loads_metas_original_dinov2_file(tmp_path: Path) -> None:
    """Meta's dinov2_vit*14_pretrain.pth: timm's names plus mask_token (dropped on load)."""
    source = build_tiny(seed=1)
    state = dict(source.backbone.trunk.state_dict())
    state["mask_token"] = torch.zeros(1, 32)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    model = ViTDPT(3, backbone=TINY_DINOV2, pretrained=str(path), vit=tiny_vit())
    _equal_encoders(model.backbone.trunk, source.backbone.trunk)


def test_loads_metas_original_dinov2_reg4_file(tmp_path: Path) -> None:
    """With registers Meta keeps the class token's position in pos_embed and names the
    registers register_tokens; timm's filter folds and renames them."""
    reg4 = "vit_small_patch14_reg4_dinov2"
    source = build_tiny(seed=1, backbone=reg4)
    timm_state = source.backbone.trunk.state_dict()
    cls_pos = torch.randn(1, 1, 32)
    meta = {k: v for k, v in timm_state.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    meta["register_tokens"] = timm_state["reg_token"]
    meta["cls_token"] = timm_state["cls_token"] - cls_pos
    meta["pos_embed"] = torch.cat([cls_pos, timm_state["pos_embed"]], dim=1)
    meta["mask_token"] = torch.zeros(1, 32)
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(meta, path)
    model = ViTDPT(3, backbone=reg4, pretrained=str(path), vit=tiny_vit())
    x = images(28, 42)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(x), source.backbone(x))


def test_a_file_of_another_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    other = ViTDPT(
        3,
        backbone=TINY_DINOV2,
        vit=tiny_vit(encoder_args={**TINY_ARGS, "embed_dim": 48, "img_size": 70}),
    )
    save_file(other.backbone.trunk.state_dict(), str(path))
    with pytest.raises(ModelError, match="other shapes"):
        ViTDPT(3, backbone=TINY_DINOV2, pretrained=str(path), vit=tiny_vit())


def test_missing_file_fails_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "dinov2_vits14_pretrain.pth"
    with pytest.raises(ModelError, match=f"{missing}.*does not exist"):
        ViTDPT(3, backbone=TINY_DINOV2, pretrained=str(missing), vit=tiny_vit())


def test_offline_hub_weights_fail_at_once_with_the_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelError) as err:
        ViTDPT(3, backbone=TINY_DINOV2, pretrained="lvd142m", vit=tiny_vit())
    text = str(err.value)
    assert "vit_small_patch14_dinov2.lvd142m" in text
    assert "dinov2_vits14_pretrain.pth" in text  # Meta's original file
    assert "model.pretrained=/path/to/" in text


# --- settings ----------------------------------------------------------------------------


def test_a_cnn_backbone_is_refused_for_vit_dpt() -> None:
    with pytest.raises(ModelError, match="not one of timm's plain Vision Transformers"):
        create_model(ModelConfig(name="vit_dpt", backbone="resnet101s"), 3)


def test_blocks_beyond_the_depth_are_refused() -> None:
    with pytest.raises(ModelError, match=r"has 4 blocks \(0-3\)"):
        build_tiny(blocks=[0, 1, 2, 11])


def test_unknown_width_asks_for_the_dpt_widths() -> None:
    with pytest.raises(ModelError, match="model.vit.features and model.vit.out_channels"):
        build_tiny(features=0, out_channels=[])


def test_settings_of_the_other_architecture_are_refused() -> None:
    with pytest.raises(
        ModelError, match="model.aspp_channels has no effect on model.name='vit_dpt'"
    ):
        create_model(
            ModelConfig(name="vit_dpt", backbone=TINY_DINOV2, aspp_channels=128, vit=tiny_vit()),
            3,
        )
    with pytest.raises(ModelError, match="model.vit has no effect on model.name='deeplabv3plus'"):
        create_model(ModelConfig(backbone="test_resnet", vit=tiny_vit()), 3)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.vit.blocks=[2,5,8]", "four encoder blocks"),
        ("model.vit.blocks=[5,2,8,11]", "increasing"),
        ("model.vit.out_channels=[8,16]", "four positive widths"),
        ("model.vit.features=-1", "must be >= 0"),
        ("model.vit.encoder_args.num_classes=3", "sets num_classes"),
    ],
)
def test_config_checks_the_vit_block(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.root=data", "model.name=vit_dpt", override])


def test_config_reads_the_vit_block() -> None:
    cfg = load_config(
        None,
        ["data.root=data", "model.name=vit_dpt", "model.vit.checkpointing=true"],
    )
    assert cfg.model.vit.checkpointing and cfg.model.vit.blocks == []


# --- position embeddings off the native grid ---------------------------------------------


def test_dinov2_position_resize_changes_only_off_the_native_grid() -> None:
    timm_mode = build_tiny().eval()
    dinov2_mode = build_tiny(position_resize="dinov2").eval()
    native, other = images(70, 70), images(42, 98)
    with torch.no_grad():
        torch.testing.assert_close(dinov2_mode(native)["logits"], timm_mode(native)["logits"])
        a, b = dinov2_mode(other)["logits"], timm_mode(other)["logits"]
    assert a.shape == b.shape == (2, 3, 42, 98)
    assert not torch.allclose(a, b)


def test_dinov2_position_resize_survives_deepcopy() -> None:
    # An EMA teacher is a deepcopy: its resampling must stay bound to its own weights.
    model = build_tiny(position_resize="dinov2").eval()
    teacher = copy.deepcopy(model)
    assert teacher.backbone.trunk._pos_embed.__self__ is teacher.backbone.trunk
    x = images(42, 98)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x)["logits"], model(x)["logits"])
        teacher.backbone.trunk.pos_embed.mul_(0)
        assert not torch.allclose(teacher(x)["logits"], model(x)["logits"])


def test_dinov2_position_resize_needs_absolute_positions() -> None:
    with pytest.raises(ModelError, match="needs absolute position embeddings"):
        ViTDPT(
            3,
            backbone=TINY_DINOV3,
            vit=ViTConfig(**NARROW, encoder_args=TINY_ARGS, position_resize="dinov2"),
        )


def test_perturb_adds_perturbed_logits_as_deeplab_does() -> None:
    # UniMatch V1's feature-perturbation stream runs on vit_dpt unchanged.
    model = build_tiny().eval()
    x = images(28, 42)
    with torch.no_grad():
        plain = model(x)
        same = model(x, perturb=lambda m: m)
        zero = model(x, perturb=torch.zeros_like)
        dropped = model(x, feature_transform=lambda maps: [torch.zeros_like(m) for m in maps])
    assert set(same) == {"logits", "features", "perturbed_logits"}
    torch.testing.assert_close(same["logits"], plain["logits"])
    torch.testing.assert_close(same["perturbed_logits"], plain["logits"])
    torch.testing.assert_close(zero["logits"], plain["logits"])
    torch.testing.assert_close(zero["perturbed_logits"], dropped["logits"])


def test_loads_a_dinov3_safetensors_file(tmp_path: Path) -> None:
    vit = ViTConfig(**NARROW, encoder_args=TINY_ARGS)
    torch.manual_seed(1)
    source = ViTDPT(3, backbone=TINY_DINOV3, vit=vit)
    path = tmp_path / "dinov3.safetensors"
    save_file(source.backbone.trunk.state_dict(), str(path))
    torch.manual_seed(2)
    model = ViTDPT(3, backbone=TINY_DINOV3, pretrained=str(path), vit=vit)
    _equal_encoders(model.backbone.trunk, source.backbone.trunk)


def test_the_vit_block_survives_a_checkpoint_round_trip() -> None:
    cfg = load_config(
        None,
        ["data.root=data", "model.name=vit_dpt", "model.vit.blocks=[1,3,5,7]"]
        + ["model.vit.encoder_args.drop_path_rate=0.1", "model.vit.position_resize=dinov2"],
    )
    back = from_dict(to_dict(cfg))
    assert back.model.vit == cfg.model.vit
    assert back.model.vit.encoder_args == {"drop_path_rate": 0.1}
    # Memory switches may change on resume; the blocks may not.
    saved = to_dict(cfg)
    changed = to_dict(load_config(None, ["data.root=data", "model.name=vit_dpt"]))
    changed["model"]["vit"] = {**saved["model"]["vit"], "checkpointing": True}
    assert recipe_changes(saved, changed) == []
    changed["model"]["vit"]["blocks"] = [2, 5, 8, 11]
    assert recipe_changes(saved, changed) == ["model.vit.blocks: [1, 3, 5, 7] -> [2, 5, 8, 11]"]
