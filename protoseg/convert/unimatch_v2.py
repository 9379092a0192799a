"""UniMatch V2's DINOv2 + DPT tensor names mapped onto protoseg's ``vit_dpt``.

UniMatch V2 (LiheYoung/UniMatch-V2, ``model/semseg/dpt.py``) names its encoder
``backbone.*`` with Meta's DINOv2 names and its decoder ``head.*`` after the DPT code it
derives from. :func:`convert_unimatch_v2_state` turns such a state dict (a training
checkpoint's ``model`` or ``model_ema`` entry, ``module.`` prefixes allowed) into
``ViTDPT`` names: the encoder part goes through timm's DINOv2 checkpoint conversion (which
drops ``mask_token`` and renames giant's fused SwiGLU), the decoder through the table
below. The deepest refine block's first residual unit, which UniMatch V2's forward never
runs, is dropped. Any other name is an error, so nothing is lost silently.

The names and shapes of UniMatch V2's networks are test data
(``tests/data/unimatch_v2_names_*.txt``, written by ``tools/unimatch_v2_parity.py``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from timm.models.vision_transformer import checkpoint_filter_fn
from torch import Tensor, nn

from protoseg.models.errors import ModelError

__all__ = ["UNUSED_PREFIX", "convert_unimatch_v2_state", "unimatch_v2_head_name"]

# The deepest refine block has a single input, so UniMatch V2 never runs this unit.
UNUSED_PREFIX = "head.scratch.refinenet4.resConfUnit1."
_ENCODER = "backbone."
_PARALLEL_PREFIX = "module."
# UniMatch V2 head name -> protoseg name; refinenet{k} and layer{k}_rn are 1-based.
_HEAD_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), repl)
    for pattern, repl in (
        (r"^head\.projects\.(\d)\.(weight|bias)$", r"head.projects.\1.\2"),
        (r"^head\.resize_layers\.([013])\.(weight|bias)$", r"head.resize_layers.\1.\2"),
        (r"^head\.scratch\.layer([1-4])_rn\.weight$", "level_convs"),
        (r"^head\.scratch\.refinenet([1-4])\.out_conv\.(weight|bias)$", "out_conv"),
        (
            r"^head\.scratch\.refinenet([1-3])\.resConfUnit1\.(conv[12])\.(weight|bias)$",
            "skip_unit",
        ),
        (r"^head\.scratch\.refinenet([1-4])\.resConfUnit2\.(conv[12])\.(weight|bias)$", "unit"),
        (r"^head\.scratch\.output_conv\.([02])\.(weight|bias)$", r"head.classifier.\1.\2"),
    )
)


def unimatch_v2_head_name(name: str) -> str | None:
    """The protoseg name of a UniMatch V2 ``head.*`` tensor (None if no rule matches)."""
    for pattern, repl in _HEAD_RULES:
        match = pattern.match(name)
        if match is None:
            continue
        groups = match.groups()
        if repl == "level_convs":
            return f"head.level_convs.{int(groups[0]) - 1}.weight"
        if repl == "out_conv":
            return f"head.refine.{int(groups[0]) - 1}.out_conv.{groups[1]}"
        if repl in ("skip_unit", "unit"):
            return f"head.refine.{int(groups[0]) - 1}.{repl}.{groups[1]}.{groups[2]}"
        return match.expand(repl)
    return None


def convert_unimatch_v2_state(
    state: Mapping[str, Tensor], encoder: nn.Module, source: str = "state dict"
) -> dict[str, Tensor]:
    """UniMatch V2 DPT tensors under ``ViTDPT`` names (``backbone.trunk.*``, ``head.*``).

    ``encoder`` is the timm ViT the encoder part is converted for (``model.backbone.trunk``);
    timm's filter needs it for shapes. Raises :class:`ModelError` naming tensors that match
    no rule.
    """
    encoder_part: dict[str, Tensor] = {}
    out: dict[str, Tensor] = {}
    unknown = []
    for raw, value in state.items():
        name = raw.removeprefix(_PARALLEL_PREFIX)
        if name.startswith(_ENCODER):
            encoder_part[name.removeprefix(_ENCODER)] = value
        elif name.startswith(UNUSED_PREFIX):
            continue
        elif (mapped := unimatch_v2_head_name(name)) is not None:
            out[mapped] = value
        else:
            unknown.append(name)
    if unknown:
        raise ModelError(
            f"{source}: {len(unknown)} tensors are not UniMatch V2 DPT tensors: "
            f"{', '.join(unknown[:5])}; pass the network's state dict (a checkpoint's "
            "'model' or 'model_ema' entry)"
        )
    # Meta's names carry mask_token, which routes them through timm's DINOv2 conversion.
    converted = checkpoint_filter_fn(encoder_part, encoder)  # type: ignore[arg-type]
    out.update({f"backbone.trunk.{k}": v for k, v in converted.items()})
    return out
