"""Segmentation networks: a timm backbone wrapper and the release's DeepLabv3+.

Networks take plain keyword arguments (``DeepLabV3Plus(21, backbone="resnet50")``) and
register themselves in ``MODELS`` with ``@register_model``; :func:`create_model` builds one
from the config's ``ModelConfig``.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from protoseg.config import ModelConfig
from protoseg.models.backbone import Backbone
from protoseg.models.deeplabv3plus import ASPP, DeepLabV3Plus
from protoseg.models.errors import ModelError
from protoseg.models.registry import (
    HEADS,
    MODELS,
    HasParamGroups,
    ParamGroups,
    build_head,
    param_groups,
    register_head,
    register_model,
)

__all__ = [
    "ASPP",
    "CONFIG_ONLY_FIELDS",
    "HEADS",
    "MODELS",
    "Backbone",
    "DeepLabV3Plus",
    "HasParamGroups",
    "ModelError",
    "ParamGroups",
    "build_head",
    "count_parameters",
    "create_model",
    "param_groups",
    "register_head",
    "register_model",
]

# ModelConfig fields that are no network argument: the registry key, and an option the
# trainer applies to the built network (SyncBatchNorm conversion).
CONFIG_ONLY_FIELDS = frozenset({"name", "sync_bn"})


def create_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Build the network ``cfg.name`` names for ``num_classes`` classes from ``cfg``'s fields."""
    try:
        cls = MODELS[cfg.name]
    except KeyError:
        choices = ", ".join(sorted(MODELS))
        raise ModelError(f"unknown model.name {cfg.name!r}; choices: {choices}") from None
    kwargs = {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(cfg)
        if f.name not in CONFIG_ONLY_FIELDS
    }
    return cls(num_classes, **kwargs)


def count_parameters(module: nn.Module) -> int:
    """Count every parameter element of ``module``, trainable or not."""
    return sum(p.numel() for p in module.parameters())
