"""Encoder: any timm CNN with ``features_only`` support, dilated to an output stride.

The release's encoder is timm's ``resnet101s`` (deep stem of width 64) at output stride 8,
with layer4 multi-grid dilations (4, 8, 16); ``Backbone`` rebuilds it and also accepts any
other timm CNN that exposes stride-4/16/32 feature levels. Initial weights are resolved and
loaded by :mod:`protoseg.models.weights`.
"""

from __future__ import annotations

import difflib
import logging
from typing import Any

import timm
from timm.models import split_model_name_tag
from torch import Tensor, nn

from protoseg.models.errors import ModelError
from protoseg.models.weights import create_with_weights, resolve_weights

__all__ = ["MULTI_GRID", "OUTPUT_STRIDES", "OUT_INDICES", "Backbone", "ModelError"]

_log = logging.getLogger(__name__)

# Negative indices pick (stride 4, stride 16, last) on nets with 5 feature levels (ResNets,
# EfficientNets: same as (1, 3, 4)) and on nets with 4 levels (ConvNeXt) alike.
OUT_INDICES = (-4, -2, -1)
# DeepLab's multi-grid unit rates for the blocks of layer4, scaled by layer4's base dilation.
MULTI_GRID = (1, 2, 4)
# The strides timm's dilation support can give.
OUTPUT_STRIDES = (8, 16, 32)


class Backbone(nn.Module):
    """A timm feature trunk returning (stride-4, stride-16 or less, last) feature maps.

    Args:
        name: a timm model name, e.g. ``"resnet101s"``.
        pretrained: "" (random init), "imagenet" (timm's default weights of ``name``), a
            timm pretrained tag, or a local weights file (see :mod:`protoseg.models.weights`).
        output_stride: stride of the last feature map; 8 and 16 dilate the last stages.
        multi_grid: on ResNet-like trunks, scale layer4's dilations by (1, 2, 4).
    """

    def __init__(
        self,
        name: str,
        pretrained: str = "",
        output_stride: int = 8,
        multi_grid: bool = True,
    ) -> None:
        super().__init__()
        if output_stride not in OUTPUT_STRIDES:
            raise ModelError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
        self.name = name
        self.output_stride = output_stride
        self.trunk = _build_trunk(name, pretrained, output_stride)
        info: Any = self.trunk.feature_info
        self.channels: tuple[int, int, int] = tuple(info.channels())
        self.reductions: tuple[int, int, int] = tuple(info.reduction())
        if self.reductions[0] != 4 or self.reductions[-1] != output_stride:
            raise ModelError(
                f"backbone {name!r} gives feature strides {self.reductions}; DeepLabv3+ "
                f"needs stride 4 low-level features and output stride {output_stride} "
                "(the net may not support dilation: try model.output_stride=32)"
            )
        self.layer4_dilations: tuple[int, ...] | None = (
            _apply_multi_grid(self.trunk) if multi_grid else None
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return the low-level, layer3 (aux head) and last feature maps."""
        low, mid, high = self.trunk(x)
        return low, mid, high


def _build_trunk(name: str, pretrained: str, output_stride: int) -> nn.Module:
    """Create the timm features_only trunk with the initial weights ``pretrained`` names."""
    arch = split_model_name_tag(name)[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise ModelError(
            f"unknown model.backbone {name!r}.{hint} List timm's CNNs with "
            f"timm.list_models('*{arch[:6]}*')."
        )
    source = resolve_weights(name, pretrained)
    kwargs: dict[str, Any] = {"features_only": True, "out_indices": OUT_INDICES}
    # Nets without dilation support reject the argument even at its default value.
    if output_stride != 32:
        kwargs["output_stride"] = output_stride
    return create_with_weights(source, **kwargs)


def _apply_multi_grid(trunk: nn.Module) -> tuple[int, ...] | None:
    """Set layer4's 3x3 dilations to base * (1, 2, 4) on ResNet-like trunks; return them."""
    layer4 = getattr(trunk, "layer4", None)
    blocks = list(layer4.children()) if isinstance(layer4, nn.Module) else []
    found = [getattr(block, "conv2", None) for block in blocks]
    convs = [c for c in found if isinstance(c, nn.Conv2d)]
    if not convs or len(convs) != len(found) or not all(_is_square_odd_conv(c) for c in convs):
        _log.info("multi_grid skipped: backbone has no ResNet-style layer4 with 3x3 conv2")
        return None
    # timm gives every block after the first the layer's dilation (the first keeps the
    # previous layer's); 1 means layer4 is strided (output stride 32) and stays as it is.
    base = convs[-1].dilation[0]
    if base == 1:
        return None
    dilations = []
    for i, conv in enumerate(convs):
        # Layers deeper than three blocks repeat the grid.
        d = base * MULTI_GRID[i % len(MULTI_GRID)]
        conv.dilation = (d, d)
        conv.padding = (d * (conv.kernel_size[0] // 2),) * 2
        dilations.append(d)
    return tuple(dilations)


def _is_square_odd_conv(module: object) -> bool:
    """Whether ``module`` is a Conv2d with a square, odd kernel > 1 and zero padding."""
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size[0] == module.kernel_size[1]
        and module.kernel_size[0] % 2 == 1
        and module.kernel_size[0] > 1
        and module.padding_mode == "zeros"
    )
