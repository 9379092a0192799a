"""Segmentation networks: a timm backbone wrapper and the release's DeepLabv3+."""

from __future__ import annotations

from torch import nn

from protoseg.config import ModelConfig
from protoseg.models.backbone import Backbone, ModelError
from protoseg.models.deeplabv3plus import ASPP, DeepLabV3Plus

__all__ = [
    "ASPP",
    "MODELS",
    "Backbone",
    "DeepLabV3Plus",
    "ModelError",
    "count_parameters",
    "create_model",
]

MODELS: dict[str, type[nn.Module]] = {"deeplabv3plus": DeepLabV3Plus}


def create_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Build the network ``cfg.name`` names for ``num_classes`` classes."""
    try:
        cls = MODELS[cfg.name]
    except KeyError:
        choices = ", ".join(sorted(MODELS))
        raise ModelError(f"unknown model.name {cfg.name!r}; choices: {choices}") from None
    return cls(cfg, num_classes)


def count_parameters(module: nn.Module) -> int:
    """Count every parameter element of ``module``, trainable or not."""
    return sum(p.numel() for p in module.parameters())
