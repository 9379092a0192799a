"""UniMatch V2's DPT tensor names map onto vit_dpt one to one.

The name lists (tests/data/unimatch_v2_names_*.txt) were written by
tools/unimatch_v2_parity.py from UniMatch V2's own network, so this checks the mapping
without its source; the tool compares the logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from protoseg.config import ModelConfig
from protoseg.convert.unimatch_v2 import UNUSED_PREFIX, convert_unimatch_v2_state
from protoseg.models import ModelError, create_model

DATA = Path(__file__).parent / "data"
ENCODERS = {"small": "vit_small_patch14_dinov2", "base": "vit_base_patch14_dinov2"}


def unimatch_v2_names(size: str) -> dict[str, tuple[int, ...]]:
    """(name -> shape) of UniMatch V2's DPT with a DINOv2-``size`` encoder, 21 classes."""
    rows = {}
    for line in (DATA / f"unimatch_v2_names_{size}.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape = line.split()
        rows[name] = tuple(int(d) for d in shape.split(","))
    return rows


@pytest.mark.parametrize("size", ["small", "base"])
def test_every_tensor_maps_onto_vit_dpt_with_its_shape(size: str) -> None:
    names = unimatch_v2_names(size)
    with torch.device("meta"):
        model = create_model(ModelConfig(name="vit_dpt", backbone=ENCODERS[size]), 21)
        state = {n: torch.empty(s) for n, s in names.items()}
    # DDP's prefix, as in UniMatch V2's saved checkpoints.
    converted = convert_unimatch_v2_state(
        {f"module.{k}": v for k, v in state.items()}, model.backbone.trunk
    )
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == own
    # Dropped: the unit UniMatch V2 never runs and DINOv2's mask token.
    dropped = {n for n in names if n.startswith(UNUSED_PREFIX)} | {"backbone.mask_token"}
    assert len(names) - len(dropped) == len(own)
    assert len(dropped) == 5


def test_values_follow_their_names() -> None:
    names = unimatch_v2_names("small")
    with torch.device("meta"):
        model = create_model(ModelConfig(name="vit_dpt", backbone=ENCODERS["small"]), 21)
    # Each tensor filled with its own index: a swapped pair shows as a wrong value.
    state = {n: torch.full(s, float(i)) for i, (n, s) in enumerate(names.items()) if len(s) < 3}
    index = {n: i for i, n in enumerate(names)}
    state.update({n: torch.empty(s, device="meta") for n, s in names.items() if n not in state})
    converted = convert_unimatch_v2_state(state, model.backbone.trunk)
    expected = {
        "head.refine.3.unit.conv1.bias": "head.scratch.refinenet4.resConfUnit2.conv1.bias",
        "head.refine.0.skip_unit.conv2.bias": "head.scratch.refinenet1.resConfUnit1.conv2.bias",
        "head.refine.2.out_conv.bias": "head.scratch.refinenet3.out_conv.bias",
        "head.classifier.2.bias": "head.scratch.output_conv.2.bias",
        "head.projects.3.bias": "head.projects.3.bias",
        "backbone.trunk.blocks.7.ls2.gamma": "backbone.blocks.7.ls2.gamma",
        "backbone.trunk.blocks.0.attn.qkv.weight": "backbone.blocks.0.attn.qkv.weight",
    }
    for ours, theirs in expected.items():
        assert torch.all(converted[ours] == index[theirs]), ours


def test_a_foreign_tensor_is_named() -> None:
    with torch.device("meta"):
        model = create_model(ModelConfig(name="vit_dpt", backbone=ENCODERS["small"]), 21)
    state = {"head.scratch.extra.weight": torch.zeros(1)}
    with pytest.raises(ModelError, match="head.scratch.extra.weight.*'model' or 'model_ema'"):
        convert_unimatch_v2_state(state, model.backbone.trunk)
