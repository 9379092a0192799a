"""Freezing a network's encoder (UniMatch V2's ``lock_backbone``, its ``dpt.py`` lines 137-139).

A frozen encoder gets no gradient and no optimiser group; only the decoder and heads train.
It must be frozen before DDP wraps the student, since DDP fixes at construction the
parameters whose gradients it waits for.
"""

from __future__ import annotations

from torch import nn


def backbone_parameters(network: nn.Module) -> list[nn.Parameter]:
    """The encoder's parameters, from the network's ``param_groups()`` (encoder, rest)."""
    param_groups = getattr(network, "param_groups", None)
    if not callable(param_groups):
        raise ValueError(
            f"{type(network).__name__} has no param_groups() to tell its encoder from its "
            f"decoder, so optim.lock_backbone cannot freeze it; set optim.lock_backbone=false"
        )
    backbone, _ = param_groups()
    return list(backbone)


def lock_backbone(network: nn.Module) -> int:
    """Stop the encoder of ``network`` from training; returns how many tensors it froze."""
    params = backbone_parameters(network)
    for param in params:
        param.requires_grad_(False)
    return len(params)
