"""Segmentation networks: the release's DeepLabv3+ on a timm CNN, and a timm ViT (DINOv2,
DINOv3) with UniMatch V2's DPT decoder.

Networks take keyword arguments (``DeepLabV3Plus(21, backbone="resnet50")``) and register
themselves in ``MODELS`` with ``@register_model``; :func:`create_model` builds one from the
config's ``ModelConfig``, passing each field the network's constructor names.
"""

from __future__ import annotations

import dataclasses
import inspect

from torch import nn

from protoseg.config import ModelConfig
from protoseg.models.backbone import Backbone
from protoseg.models.deeplabv3plus import ASPP, DeepLabV3Plus
from protoseg.models.dpt import DPTHead, ViTDPT
from protoseg.models.errors import ModelError
from protoseg.models.registry import (
    HEADS,
    MODELS,
    HasParamGroups,
    ParamGroups,
    build_head,
    lock_backbone,
    param_groups,
    register_head,
    register_model,
)

__all__ = [
    "lock_backbone",
    "ASPP",
    "CONFIG_ONLY_FIELDS",
    "HEADS",
    "MODELS",
    "Backbone",
    "DPTHead",
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
    "ViTDPT",
]

# ModelConfig fields that are no network argument: the registry key, and an option the
# trainer applies to the built network (SyncBatchNorm conversion).
CONFIG_ONLY_FIELDS = frozenset({"name", "sync_bn"})


def create_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Build the network ``cfg.name`` names for ``num_classes`` classes from ``cfg``'s fields.

    Each field the network's constructor takes is passed to it; a field it does not take
    (e.g. ``aspp_channels`` for ``vit_dpt``, ``vit`` for ``deeplabv3plus``) must keep its
    default, so that no setting is silently ignored.
    """
    try:
        cls = MODELS[cfg.name]
    except KeyError:
        choices = ", ".join(sorted(MODELS))
        raise ModelError(f"unknown model.name {cfg.name!r}; choices: {choices}") from None
    params = inspect.signature(cls).parameters
    # A constructor with **kwargs takes every field.
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    takes = set(params)
    defaults = ModelConfig()
    kwargs = {}
    for f in dataclasses.fields(cfg):
        if f.name in CONFIG_ONLY_FIELDS:
            continue
        value = getattr(cfg, f.name)
        if takes_all or f.name in takes:
            kwargs[f.name] = value
        elif value != getattr(defaults, f.name):
            raise ModelError(
                f"model.{f.name} has no effect on model.name={cfg.name!r}; remove it "
                f"(the settings {cfg.name} takes: {', '.join(sorted(takes - {'num_classes'}))})"
            )
    return cls(num_classes, **kwargs)


def count_parameters(module: nn.Module) -> int:
    """Count every parameter element of ``module``, trainable or not."""
    return sum(p.numel() for p in module.parameters())
