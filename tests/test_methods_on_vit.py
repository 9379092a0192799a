"""Every registered method trains on vit_dpt as it does on DeepLabv3+: one step on a tiny
DINOv2-shaped encoder reaches the encoder with finite gradients (PCR's prototype branch
reads the DPT's ``features`` and ``feature_dim``)."""

from __future__ import annotations

import pytest
import torch
from method_contract import NUM_CLASSES, batches

from protoseg.config import load_config
from protoseg.lifecycle import InitContext
from protoseg.methods import create_method
from protoseg.methods.registry import METHOD_CONFIGS
from protoseg.models import create_model

TINY_VIT = [
    "model.name=vit_dpt",
    "model.backbone=vit_small_patch14_dinov2",
    "model.vit.features=16",
    "model.vit.out_channels=[8,16,16,32]",
    "model.vit.encoder_args.embed_dim=32",
    "model.vit.encoder_args.depth=4",
    "model.vit.encoder_args.num_heads=2",
    "model.vit.encoder_args.img_size=42",
]


def _method_names() -> list[str]:
    import protoseg.methods  # noqa: F401  (registers the methods)

    return sorted(METHOD_CONFIGS)


@pytest.mark.parametrize("name", _method_names())
def test_one_training_step_on_a_tiny_vit(name: str) -> None:
    torch.manual_seed(0)
    cfg = load_config(
        None,
        [
            "data.root=unused",
            f"data.num_classes={NUM_CLASSES}",
            "data.crop_size=42",
            "train.loss=ce",
            f"method.name={name}",
            *TINY_VIT,
        ],
    )
    method = create_method(create_model(cfg.model, cfg.data.num_classes), cfg)
    method.setup(steps_per_epoch=10)
    init_batch, _ = batches(seed=7)
    method.before_step(0, lambda: InitContext([init_batch], torch.device("cpu"), seed=0))
    method.train()
    labeled, unlabeled = batches()
    out = method.training_step(labeled, unlabeled, step=0)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    encoder = [p for n, p in method.student.named_parameters() if "backbone" in n]
    assert encoder and any(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder)
