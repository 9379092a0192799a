"""A tiny ViT-shaped network with the ``feature_transform`` interface, for method tests.

Registered as ``model.name=feature_transform_stand_in``: a 4 x 4 patch embedding, four
residual token blocks whose outputs (B, N, C) all feed a small decoder, as DINOv2's four
taken blocks feed the DPT head. It accepts and ignores ModelConfig's DeepLab fields.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from protoseg.components import FeatureTransform
from protoseg.models import register_model

STAND_IN = "feature_transform_stand_in"
PATCH = 4


@register_model(STAND_IN)
class FeatureTransformStandIn(nn.Module):
    """Tokens of four blocks -> sum of per-level 1x1 projections -> features -> logits."""

    def __init__(self, num_classes: int, width: int = 8, decoder_width: int = 6, **_: object):
        super().__init__()
        self.embed = nn.Conv2d(3, width, PATCH, stride=PATCH)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU()) for _ in range(4)
        )
        self.projects = nn.ModuleList(nn.Conv2d(width, decoder_width, 1) for _ in range(4))
        self.feature_dim = decoder_width
        self.classifier = nn.Conv2d(decoder_width, num_classes, 1)

    def encode(self, images: Tensor) -> tuple[list[Tensor], tuple[int, int]]:
        """The four blocks' tokens (B, N, C) and the patch grid (h, w)."""
        grid = self.embed(images)
        h, w = grid.shape[-2:]
        tokens = grid.flatten(2).transpose(1, 2)
        maps = []
        for block in self.blocks:
            tokens = tokens + block(tokens)
            maps.append(tokens)
        return maps, (h, w)

    def forward(
        self, images: Tensor, feature_transform: FeatureTransform | None = None
    ) -> dict[str, Tensor]:
        """``logits`` at the input size and ``features`` at the patch grid."""
        maps, (h, w) = self.encode(images)
        if feature_transform is not None:
            maps = feature_transform(maps)
        grids = [m.transpose(1, 2).reshape(m.shape[0], -1, h, w) for m in maps]
        features = F.relu(sum(p(g) for p, g in zip(self.projects, grids)))  # type: ignore[arg-type]
        logits = F.interpolate(
            self.classify(features), images.shape[-2:], mode="bilinear", align_corners=False
        )
        return {"logits": logits, "features": features}

    def classify(self, features: Tensor) -> Tensor:
        """The classifier on a feature map, without upsampling."""
        return self.classifier(features)

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(encoder parameters, decoder parameters)."""
        encoder = [*self.embed.parameters(), *self.blocks.parameters()]
        return encoder, [*self.projects.parameters(), *self.classifier.parameters()]
