"""A ViT encoder with UniMatch V2's DPT decoder, registered as ``vit_dpt``.

The decoder follows UniMatch V2's ``model/semseg/dpt.py`` and ``model/util/blocks.py``:
four encoder maps at stride p (the patch size) are projected by 1x1 convs, brought to
strides p/4, p/2, p and 2p (4x4/s4 and 2x2/s2 transposed convs, identity, 3x3/s2 conv),
mapped to ``features`` channels by bias-free 3x3 convs, and fused deep to shallow by four
refine blocks of residual conv units (no BatchNorm); the last one doubles the size, so the
logits come out at 8x the patch grid (stride p/8: 1.75 px for DINOv2) and are upsampled
bilinearly (align_corners=True) to the input.

The prototype branch reads ``features``, the last refine block's output (``features``
channels, 8x the patch grid); ``classify`` is the output conv that turns it into logits,
so ``classify(features)`` upsampled is ``logits``, as with DeepLabv3+.

UniMatch V2's deepest refine block also holds a residual unit it never runs (the block
has one input, so only its second unit is used); it is left out here, so each head has
``2 * (9 * features**2 + features)`` parameters fewer than UniMatch V2 counts for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protoseg.config import ViTConfig
from protoseg.models.errors import ModelError
from protoseg.models.registry import register_model
from protoseg.models.vit import ViTEncoder

__all__ = ["DPT_WIDTHS", "DPTHead", "FeatureMapTransform", "ViTDPT", "dpt_widths"]

# UniMatch V2's (features, out_channels) by encoder width (unimatch_v2.py, model_configs):
# DINOv2 S 384, B 768, L 1024, g 1536 (DINOv3 S/B/L have the same widths).
DPT_WIDTHS: dict[int, tuple[int, tuple[int, int, int, int]]] = {
    384: (64, (48, 96, 192, 384)),
    768: (128, (96, 192, 384, 768)),
    1024: (256, (256, 512, 1024, 1024)),
    1536: (384, (1536, 1536, 1536, 1536)),
}

#: A function of the four encoder maps that returns four maps of the same shapes
#: (e.g. UniMatch V2's complementary channel dropout on the strong views).
FeatureMapTransform = Callable[[list[Tensor]], list[Tensor]]


def dpt_widths(
    embed_dim: int, features: int = 0, out_channels: Sequence[int] = ()
) -> tuple[int, tuple[int, ...]]:
    """The DPT's (features, out_channels): the given ones, else UniMatch V2's for the width."""
    if features and out_channels:
        return features, tuple(out_channels)
    if embed_dim not in DPT_WIDTHS:
        raise ModelError(
            f"UniMatch V2 gives no DPT widths for an encoder of width {embed_dim} (it has "
            f"{', '.join(map(str, DPT_WIDTHS))}); set model.vit.features and "
            "model.vit.out_channels (four widths)"
        )
    default_features, default_out = DPT_WIDTHS[embed_dim]
    return features or default_features, tuple(out_channels) or default_out


def _resize(x: Tensor, size: torch.Size | tuple[int, int]) -> Tensor:
    """Bilinear resize with align_corners=True, UniMatch V2's convention throughout."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class ResidualConvUnit(nn.Module):
    """x + conv(relu(conv(relu(x)))), 3x3 convs with bias, no normalisation."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """The unit's output; ``x`` itself is not modified (it is also the skip)."""
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class RefineBlock(nn.Module):
    """DPT fusion: add a refined skip map, refine, resize, then a 1x1 conv."""

    def __init__(self, channels: int, with_skip: bool) -> None:
        super().__init__()
        # The deepest block has no skip input and so no unit for it.
        self.skip_unit = ResidualConvUnit(channels) if with_skip else None
        self.unit = ResidualConvUnit(channels)
        self.out_conv = nn.Conv2d(channels, channels, 1)

    def forward(
        self, x: Tensor, skip: Tensor | None = None, size: torch.Size | None = None
    ) -> Tensor:
        """Fuse ``x`` with ``skip`` and resize to ``size`` (twice the size when None)."""
        if self.skip_unit is not None:
            if skip is None:
                raise ValueError("this refine block fuses a skip map; pass one")
            x = x + self.skip_unit(skip)
        x = self.unit(x)
        target = size if size is not None else (x.shape[-2] * 2, x.shape[-1] * 2)
        return self.out_conv(_resize(x, target))


class DPTHead(nn.Module):
    """UniMatch V2's DPT decoder over four stride-p encoder maps.

    Args:
        embed_dim: channels of the encoder maps.
        num_classes: output channels of the classifier.
        features: width of the fused maps (and of ``features``).
        out_channels: widths of the four projected levels, shallow to deep.
    """

    def __init__(
        self, embed_dim: int, num_classes: int, features: int, out_channels: Sequence[int]
    ) -> None:
        super().__init__()
        if len(out_channels) != 4:
            raise ModelError(f"the DPT has four levels; got out_channels={list(out_channels)}")
        c1, c2, c3, c4 = out_channels
        self.features = features
        self.projects = nn.ModuleList([nn.Conv2d(embed_dim, c, 1) for c in out_channels])
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(c1, c1, 4, stride=4),
                nn.ConvTranspose2d(c2, c2, 2, stride=2),
                nn.Identity(),
                nn.Conv2d(c4, c4, 3, stride=2, padding=1),
            ]
        )
        self.level_convs = nn.ModuleList(
            [nn.Conv2d(c, features, 3, padding=1, bias=False) for c in out_channels]
        )
        # refine[0] fuses into the shallowest level; refine[3] starts from the deepest.
        self.refine = nn.ModuleList([RefineBlock(features, with_skip=i < 3) for i in range(4)])
        self.classifier = nn.Sequential(
            nn.Conv2d(features, features, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(features, num_classes, 1),
        )

    def decode(self, maps: Sequence[Tensor]) -> Tensor:
        """The fused feature map at 8x the patch grid (``features`` channels)."""
        levels = [
            conv(resize(project(m)))
            for m, project, resize, conv in zip(
                maps, self.projects, self.resize_layers, self.level_convs
            )
        ]
        l1, l2, l3, l4 = levels
        path = self.refine[3](l4, size=l3.shape[-2:])
        path = self.refine[2](path, l3, size=l2.shape[-2:])
        path = self.refine[1](path, l2, size=l1.shape[-2:])
        return self.refine[0](path, l1)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        """Logits at 8x the patch grid."""
        return self.classifier(self.decode(maps))


@register_model("vit_dpt")
class ViTDPT(nn.Module):
    """A timm ViT (DINOv2, DINOv3) with UniMatch V2's DPT: ``logits`` and ``features``.

    Args:
        num_classes: output channels of the classifier.
        backbone: the timm ViT name (``vit_{small,base,large,giant}_patch14[_reg4]_dinov2``,
            ``vit_*_patch16_dinov3``, or any ViT of timm's vision_transformer/eva modules).
        pretrained: the encoder's initial weights: "", "imagenet" (the default hub tag),
            a tag such as "lvd142m", or a local .safetensors/.pth (timm's or Meta's names).
        vit: the encoder blocks, DPT widths and one-GPU switches (:class:`ViTConfig`).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        backbone: str,
        pretrained: str = "",
        vit: ViTConfig | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ModelError(f"num_classes must be positive, got {num_classes}")
        settings = vit if vit is not None else ViTConfig()
        self.num_classes = num_classes
        self.backbone = ViTEncoder(
            backbone,
            pretrained,
            blocks=settings.blocks,
            checkpointing=settings.checkpointing,
            fused_attention=settings.fused_attention,
            position_resize=settings.position_resize,
            encoder_args=settings.encoder_args,
        )
        features, out_channels = dpt_widths(
            self.backbone.embed_dim, settings.features, settings.out_channels
        )
        self.head = DPTHead(self.backbone.embed_dim, num_classes, features, out_channels)
        self.feature_dim = features
        self.patch_size = self.backbone.patch_size

    def forward(
        self,
        x: Tensor,
        perturb: Callable[[Tensor], Tensor] | None = None,
        feature_transform: FeatureMapTransform | None = None,
    ) -> dict[str, Tensor]:
        """Return ``logits`` at the input size and the DPT ``features`` (8x the patch grid).

        An input whose sides are not multiples of the patch size is zero-padded at the
        bottom and right (zero is the dataset mean after normalisation) and the logits are
        cropped back.

        ``feature_transform`` replaces the four encoder maps before the decoder (UniMatch
        V2's complementary dropout multiplies them by one (B, C) mask). ``perturb`` keeps
        DeepLabv3+'s contract (UniMatch V1's feature-perturbation stream): the decoder also
        runs on ``perturb`` of each encoder map, in the same batch, and the output gains
        ``perturbed_logits``.
        """
        h, w = x.shape[-2:]
        n = x.shape[0]
        p = self.patch_size
        pad_h, pad_w = -h % p, -w % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        maps = self.backbone(x)
        if feature_transform is not None:
            maps = _checked_transform(feature_transform, maps)
        if perturb is not None:
            maps = [torch.cat([m, perturb(m)]) for m in maps]
        features = self.head.decode(maps)
        logits = _resize(self.head.classifier(features), x.shape[-2:])[:, :, :h, :w]
        out = {"logits": logits[:n], "features": features[:n]}
        if perturb is not None:
            out["perturbed_logits"] = logits[n:]
        return out

    def classify(self, features: Tensor) -> Tensor:
        """Apply the output convs to a feature map, without upsampling."""
        return self.head.classifier(features)

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Return (encoder parameters, decoder parameters)."""
        return list(self.backbone.parameters()), list(self.head.parameters())


def _checked_transform(transform: FeatureMapTransform, maps: list[Tensor]) -> list[Tensor]:
    """Apply a feature-map transform and check it kept the four maps' shapes."""
    out = list(transform(maps))
    if len(out) != len(maps) or any(a.shape != b.shape for a, b in zip(out, maps)):
        raise ValueError(
            "feature_transform must return the four encoder maps with their shapes "
            f"{[tuple(m.shape) for m in maps]}; got {[tuple(m.shape) for m in out]}"
        )
    return out
