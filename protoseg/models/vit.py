"""Encoder: a timm Vision Transformer (DINOv2, DINOv3) returning four intermediate maps.

UniMatch V2 feeds its DPT decoder the tokens of four encoder blocks, each through the
final LayerNorm, class and register tokens dropped, laid out as ``(B, C, H/p, W/p)``
maps. timm's ``forward_intermediates(x, indices, norm=True, output_fmt="NCHW",
intermediates_only=True)`` returns exactly that for both DINOv2 (``VisionTransformer``)
and DINOv3 (``Eva`` with rotary position embeddings). The encoder is built with
``dynamic_img_size=True``, so any multiple of the patch size runs (DINOv2's absolute
position embeddings are resampled per forward; DINOv3's are rotary and need none);
inputs of other sizes are zero-padded at the bottom and right by the network.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models import is_model_in_modules, split_model_name_tag
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from protoseg.models.errors import ModelError
from protoseg.models.weights import create_with_weights, resolve_weights

__all__ = ["UNIMATCH_V2_BLOCKS", "VIT_MODULES", "ViTEncoder", "default_blocks"]

# timm modules whose models have forward_intermediates(..., norm=) over a ``blocks`` list:
# VisionTransformer (DINOv2) and Eva (DINOv3).
VIT_MODULES = ("vision_transformer", "eva")

# UniMatch V2's blocks by encoder depth (model/semseg/dpt.py, intermediate_layer_idx):
# S and B have 12 blocks, L 24, g 40.
UNIMATCH_V2_BLOCKS: dict[int, tuple[int, int, int, int]] = {
    12: (2, 5, 8, 11),
    24: (4, 11, 17, 23),
    40: (9, 19, 29, 39),
}
# The ways position embeddings follow a grid other than the native one (see ViTEncoder).
POSITION_RESIZES = ("timm", "dinov2")
# Meta's DINOv2 adds this to the target grid before dividing by the native one.
DINOV2_OFFSET = 0.1
# timm.create_model arguments the encoder sets itself.
_OWN_ARGS = ("pretrained", "num_classes", "dynamic_img_size", "dynamic_img_pad")


def default_blocks(depth: int) -> tuple[int, int, int, int]:
    """UniMatch V2's four blocks for an encoder of ``depth`` blocks.

    Depths UniMatch V2 ships (12, 24, 40) get its lists, which DINOv3's S/B (12) and L (24)
    share; other depths (DINOv3 H+ has 32) take the last block of each quarter, the rule
    its 12- and 40-block lists follow.
    """
    if depth < 4:
        raise ModelError(f"a DPT needs four encoder blocks; the encoder has {depth}")
    if depth in UNIMATCH_V2_BLOCKS:
        return UNIMATCH_V2_BLOCKS[depth]
    a, b, c, d = (depth * (i + 1) // 4 - 1 for i in range(4))
    return a, b, c, d


class ViTEncoder(nn.Module):
    """A timm ViT that returns the normed patch tokens of four blocks as NCHW maps.

    Args:
        name: a timm ViT name, e.g. ``"vit_base_patch14_dinov2"`` or
            ``"vit_small_patch16_dinov3"`` (a ``.tag`` suffix picks hub weights).
        pretrained: "" (random init), "imagenet" (the name's default timm hub tag, e.g.
            ``lvd142m``), a tag, or a local file: timm's safetensors/.pth, or the
            authors' original ``.pth``, converted by timm's checkpoint filter.
        blocks: four 0-based block indices, shallow to deep; empty = :func:`default_blocks`.
        checkpointing: recompute every block in the backward pass.
        fused_attention: attention through ``F.scaled_dot_product_attention``.
        position_resize: how absolute position embeddings follow another patch grid:
            "timm" (bicubic to the grid, antialiased) or "dinov2" (Meta's DINOv2 code, as
            UniMatch V2 runs it: bicubic by the factor (grid + 0.1) / native grid, no
            antialias). Equal on the native grid (37 x 37 for DINOv2 at 518 px).
        encoder_args: more keyword arguments for ``timm.create_model``.
    """

    def __init__(
        self,
        name: str,
        pretrained: str = "",
        blocks: Sequence[int] = (),
        checkpointing: bool = False,
        fused_attention: bool = True,
        position_resize: str = "timm",
        encoder_args: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        args = dict(encoder_args or {})
        taken = sorted(set(args) & set(_OWN_ARGS))
        if taken:
            raise ModelError(f"encoder_args may not set {', '.join(taken)}: the encoder sets them")
        self.name = name
        self.trunk = _build_vit(name, pretrained, args)
        trunk: Any = self.trunk
        self.embed_dim: int = int(trunk.embed_dim)
        self.patch_size: int = int(trunk.patch_embed.patch_size[0])
        if trunk.patch_embed.patch_size[0] != trunk.patch_embed.patch_size[1]:
            raise ModelError(f"encoder {name!r} has non-square patches; vit_dpt needs square")
        self.depth: int = len(trunk.blocks)
        chosen = tuple(blocks) or default_blocks(self.depth)
        if len(chosen) != 4 or not all(0 <= i < self.depth for i in chosen):
            raise ModelError(
                f"model.vit.blocks={list(chosen)}: {name!r} has {self.depth} blocks "
                f"(0-{self.depth - 1}); give four of them, or [] for "
                f"{list(default_blocks(self.depth))}"
            )
        self.blocks: tuple[int, ...] = chosen
        if position_resize not in POSITION_RESIZES:
            raise ModelError(
                f"model.vit.position_resize={position_resize!r}: choose one of "
                f"{', '.join(POSITION_RESIZES)}"
            )
        if position_resize == "dinov2":
            _use_dinov2_position_resize(self.trunk, name)
        self.position_resize = position_resize
        self.set_grad_checkpointing(checkpointing)
        self.set_fused_attention(fused_attention)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (timm's ``set_grad_checkpointing``)."""
        self.trunk.set_grad_checkpointing(enable)  # type: ignore[operator]
        self.checkpointing = enable

    def set_fused_attention(self, enable: bool = True) -> None:
        """Switch every attention layer between SDPA (True) and the explicit softmax path."""
        # timm fixes the choice per layer at construction from timm.layers.use_fused_attn()
        # (TIMM_FUSED_ATTN); the layers read the attribute on every forward.
        layers = [m for m in self.trunk.modules() if hasattr(m, "fused_attn")]
        if not layers:
            raise ModelError(f"encoder {self.name!r} has no timm attention layers")
        for layer in layers:
            setattr(layer, "fused_attn", enable)  # noqa: B010 (typed as a timm Final)
        self.fused_attention = enable

    def forward(self, x: Tensor) -> list[Tensor]:
        """The four chosen blocks' normed patch tokens, each ``(B, C, H/p, W/p)``.

        ``H`` and ``W`` must be multiples of the patch size (the network pads to them).
        """
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ModelError(
                f"input {h}x{w} is not a multiple of the patch size {self.patch_size}; pad it, "
                f"or resize (eval.resize_to_multiple={self.patch_size})"
            )
        maps = self.trunk.forward_intermediates(  # type: ignore[operator]
            x, indices=list(self.blocks), norm=True, output_fmt="NCHW", intermediates_only=True
        )
        return list(maps)


def _dinov2_resample(pos: Tensor, grid: tuple[int, int], native: tuple[int, int]) -> Tensor:
    """Patch position embeddings ``(1, N, C)`` on ``native`` resampled to ``grid`` as Meta's
    DINOv2 ``interpolate_pos_encoding`` does (offset 0.1 against float round-off)."""
    if tuple(grid) == tuple(native):
        return pos
    channels = pos.shape[-1]
    square = pos.float().reshape(1, native[0], native[1], channels).permute(0, 3, 1, 2)
    factor = ((grid[0] + DINOV2_OFFSET) / native[0], (grid[1] + DINOV2_OFFSET) / native[1])
    out = F.interpolate(square, scale_factor=factor, mode="bicubic", antialias=False)
    if tuple(out.shape[-2:]) != tuple(grid):
        raise RuntimeError(f"position resampling gave {tuple(out.shape[-2:])}, not {grid}")
    return out.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], channels).to(pos.dtype)


def _dinov2_pos_embed(self: Any, x: Tensor) -> Tensor:
    """timm's ``VisionTransformer._pos_embed`` (dynamic size) with DINOv2's resampling."""
    batch, height, width, channels = x.shape
    prefix = 0 if self.no_embed_class else self.num_prefix_tokens
    patch_pos = _dinov2_resample(
        self.pos_embed[:, prefix:], (height, width), tuple(self.patch_embed.grid_size)
    )
    pos = torch.cat([self.pos_embed[:, :prefix], patch_pos], dim=1)
    tokens = [t.expand(batch, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
    x = x.reshape(batch, -1, channels)
    if self.no_embed_class:
        # Registers (and the class token) carry no position: add, then prepend them.
        x = torch.cat([*tokens, x + pos], dim=1)
    else:
        x = torch.cat([*tokens, x], dim=1) + pos
    return self.pos_drop(x)


def _use_dinov2_position_resize(trunk: nn.Module, name: str) -> None:
    """Make ``trunk`` resample its position embeddings as DINOv2's own code does."""
    if not isinstance(trunk, VisionTransformer) or trunk.pos_embed is None:
        raise ModelError(
            f"model.vit.position_resize=dinov2 needs absolute position embeddings; {name!r} "
            "has none (DINOv3 uses rotary ones): use position_resize=timm"
        )
    # An instance attribute shadows the class's method; deepcopy (an EMA teacher) rebinds
    # it to the copy.
    trunk._pos_embed = types.MethodType(_dinov2_pos_embed, trunk)  # type: ignore[method-assign]


def _build_vit(name: str, pretrained: str, args: dict[str, Any]) -> nn.Module:
    """Create the timm ViT (no classifier, any multiple of the patch) with its weights."""
    arch = split_model_name_tag(name)[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models("vit_*"), n=5)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise ModelError(
            f"unknown model.backbone {name!r} for vit_dpt.{hint} List the encoders with "
            "timm.list_models('*dinov2*') or timm.list_models('*dinov3*')."
        )
    if not is_model_in_modules(arch, VIT_MODULES):
        raise ModelError(
            f"model.backbone={name!r} is not one of timm's plain Vision Transformers "
            f"(modules {', '.join(VIT_MODULES)}); vit_dpt takes e.g. vit_base_patch14_dinov2 "
            "or vit_base_patch16_dinov3 (CNNs go with model.name=deeplabv3plus)"
        )
    source = resolve_weights(name, pretrained)
    return create_with_weights(
        source, convert_checkpoint=True, num_classes=0, dynamic_img_size=True, **args
    )
