"""DeepLabv3+ as in the PCR/U2PL release: ASPP, a 256-channel low-level branch, and a
512-channel stride-4 feature map shared by the linear classifier and the prototypes.

With 21 classes, no auxiliary head and the ``resnet101s`` encoder at output stride 8 the
network has 62,623,189 parameters, the release's count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protoseg.models.backbone import Backbone
from protoseg.models.errors import ModelError
from protoseg.models.registry import register_model

# Output stride the configured ASPP dilations are stated for (the release's 12/24/36).
ASPP_REFERENCE_STRIDE = 8
AUX_DROPOUT = 0.1


def _resize(x: Tensor, size: torch.Size | tuple[int, int]) -> Tensor:
    """Bilinearly resize ``x`` to ``size`` with align_corners=True, as the release does."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def _conv_bn_relu(
    in_ch: int, out_ch: int, kernel: int, dilation: int = 1, bias: bool = False
) -> list[nn.Module]:
    """A same-size conv followed by BatchNorm and ReLU."""
    pad = dilation * (kernel // 2)
    return [
        nn.Conv2d(in_ch, out_ch, kernel, padding=pad, dilation=dilation, bias=bias),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    ]


def scaled_aspp_dilations(dilations: Sequence[int], output_stride: int) -> list[int]:
    """Scale dilations stated for output stride 8 to ``output_stride`` (16 halves them)."""
    # The same rates then cover the same image area whatever the stride.
    return [max(1, d * ASPP_REFERENCE_STRIDE // output_stride) for d in dilations]


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: image pooling, 1x1 and dilated 3x3 branches."""

    def __init__(self, in_ch: int, out_ch: int, dilations: Sequence[int], dropout: float) -> None:
        super().__init__()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(in_ch, out_ch, 1))
        self.branches = nn.ModuleList(
            [nn.Sequential(*_conv_bn_relu(in_ch, out_ch, 1))]
            + [nn.Sequential(*_conv_bn_relu(in_ch, out_ch, 3, dilation=d)) for d in dilations]
        )
        self.project = nn.Sequential(
            *_conv_bn_relu((len(dilations) + 2) * out_ch, out_ch, 3), nn.Dropout2d(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        """Return the fused multi-rate context map at the input's resolution."""
        pooled = _resize(self.pool(x), x.shape[-2:])
        return self.project(torch.cat([pooled, *(branch(x) for branch in self.branches)], 1))


@register_model("deeplabv3plus")
class DeepLabV3Plus(nn.Module):
    """DeepLabv3+ returning logits, the 512-d stride-4 features and optional aux logits.

    Args:
        num_classes: output channels of the classifier (and of the aux head).
        backbone: a timm model name with features_only and dilation support.
        pretrained: initial backbone weights: "", "imagenet", a timm tag or a local file.
        output_stride: stride of the backbone's last feature map (8, 16 or 32).
        multi_grid: scale the dilations of a ResNet layer4 by (1, 2, 4), as the release.
        aspp_channels: width of every ASPP branch and of its projection.
        aspp_dilations: ASPP rates stated for output stride 8, rescaled for other strides.
        low_level_channels: width of the projected stride-4 backbone features.
        head_channels: width of the classifier's (and aux head's) 3x3 convolutions.
        dropout: Dropout2d rate after the ASPP projection and the classifier's convs.
        aux_head: add an auxiliary classifier on the layer3 features (output ``aux``).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        backbone: str = "resnet101s",
        pretrained: str = "",
        output_stride: int = 8,
        multi_grid: bool = True,
        aspp_channels: int = 256,
        aspp_dilations: Sequence[int] = (12, 24, 36),
        low_level_channels: int = 256,
        head_channels: int = 256,
        dropout: float = 0.1,
        aux_head: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ModelError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.backbone = Backbone(backbone, pretrained, output_stride, multi_grid)
        low_ch, mid_ch, high_ch = self.backbone.channels
        self.aspp_dilations = scaled_aspp_dilations(aspp_dilations, output_stride)
        self.aspp = ASPP(high_ch, aspp_channels, self.aspp_dilations, dropout)
        self.low_level = nn.Sequential(*_conv_bn_relu(low_ch, low_level_channels, 1, bias=True))
        self.feature_dim = low_level_channels + aspp_channels
        # The release's "linear predictor": two 3x3 convs before the 1x1 classifier.
        self.classifier = nn.Sequential(
            *_conv_bn_relu(self.feature_dim, head_channels, 3, bias=True),
            nn.Dropout2d(dropout),
            *_conv_bn_relu(head_channels, head_channels, 3, bias=True),
            nn.Dropout2d(dropout),
            nn.Conv2d(head_channels, num_classes, 1),
        )
        self.aux: nn.Module | None = None
        if aux_head:
            # No bias on the 3x3 conv, as in the released Cityscapes checkpoints, so they load
            # name for name; U2PL's Aux_Module has one, which the BatchNorm after it cancels.
            self.aux = nn.Sequential(
                *_conv_bn_relu(mid_ch, head_channels, 3),
                nn.Dropout2d(AUX_DROPOUT),
                nn.Conv2d(head_channels, num_classes, 1),
            )

    def forward(
        self, x: Tensor, perturb: Callable[[Tensor], Tensor] | None = None
    ) -> dict[str, Tensor]:
        """Return ``logits`` and ``aux`` at the input size and the stride-4 ``features``.

        With ``perturb`` (e.g. channel dropout) the decoder also runs on the perturbed
        low-level and last encoder maps, and the output gains ``perturbed_logits``. Clean
        and perturbed maps go through the decoder as one batch, so train-mode BatchNorm
        normalises them together (UniMatch's feature-perturbation stream).
        """
        size, n = x.shape[-2:], x.shape[0]
        low, mid, high = self.backbone(x)
        if perturb is not None:
            low, high = torch.cat([low, perturb(low)]), torch.cat([high, perturb(high)])
        logits, features = self._decode(low, high, size)
        out = {"logits": logits[:n], "features": features[:n]}
        if perturb is not None:
            out["perturbed_logits"] = logits[n:]
        if self.aux is not None:
            out["aux"] = _resize(self.aux(mid), size)
        return out

    def _decode(
        self, low: Tensor, high: Tensor, size: torch.Size | tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """Logits at ``size`` and the stride-4 features of encoder maps (low-level, last)."""
        low = self.low_level(low)
        context = _resize(self.aspp(high), low.shape[-2:])
        features = torch.cat([low, context], 1)
        return _resize(self.classifier(features), size), features

    def classify(self, features: Tensor) -> Tensor:
        """Apply the classifier head to a feature map, without upsampling."""
        return self.classifier(features)

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Return (backbone parameters, decoder and head parameters)."""
        backbone = list(self.backbone.parameters())
        ids = {id(p) for p in backbone}
        return backbone, [p for p in self.parameters() if id(p) not in ids]
