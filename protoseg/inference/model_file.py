"""What a model file holds, written from a method's ``deploy()`` and read back for inference.

A model file (``model.pt``, ``best.pt``) is plain data: the config, the deployed network's
weights, the extra heads' specs (``kind``, ``options``, ``state``), class names, palette and
normalisation. A training checkpoint carries the method's whole state plus the prefix of
the deployed network inside it, so inference can read either without knowing the method.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from protoseg import __version__
from protoseg.config import Config, from_dict, to_dict
from protoseg.data import voc_palette
from protoseg.files import (
    LEGACY_MODEL_FORMAT,
    MODEL_FORMAT,
    TRAINING_FORMAT,
    CheckpointError,
    load_file,
    refuse_non_finite,
)


def _plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}


def class_names_of(cfg: Config) -> list[str]:
    """The config's class names, or class_<i> when it gives none."""
    return list(cfg.data.class_names) or [f"class_{i}" for i in range(cfg.data.num_classes)]


def model_payload(cfg: Config, network: nn.Module, heads: dict[str, dict[str, Any]]) -> dict:
    """A self-contained inference file: the deployed weights plus what predict needs."""
    return {
        "format": MODEL_FORMAT,
        "version": __version__,
        "config": to_dict(cfg),
        "state_dict": _plain(network.state_dict()),
        "heads": heads,
        "class_names": class_names_of(cfg),
        "palette": [list(c) for c in voc_palette(256)],
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
    }


def deployment_index(method: Any, network: nn.Module, heads: dict[str, Any]) -> dict:
    """Where the deployed network sits inside a method's state dict (for checkpoints).

    ``method`` is any module tree (a training method) that holds ``network``.
    """
    for name, module in method.named_modules():
        if module is network:
            return {"network_prefix": f"{name}." if name else "", "heads": heads}
    raise ValueError("the deployed network is not a sub-module of the method")


@dataclass
class ModelFile:
    """A model file or training checkpoint, read for inference."""

    path: Path
    config: Config
    state_dict: dict[str, torch.Tensor]
    heads: dict[str, dict[str, Any]]
    class_names: list[str]
    palette: list[tuple[int, int, int]]


def _legacy_heads(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """protoseg 0.1 model files kept PCR's bank under "prototypes"."""
    bank = data.get("prototypes")
    if not bank:
        return {}
    method = data["config"].get("method", {})
    per_class, dim = bank["prototypes"].shape[1:]
    return {
        "prototype": {
            "kind": "prototype",
            "options": {
                "num_classes": bank["prototypes"].shape[0],
                "per_class": per_class,
                "dim": dim,
                "temperature": method.get("temperature", 0.1),
            },
            "state": bank,
        }
    }


def read_model_file(path: str | Path) -> ModelFile:
    """Read a model file or a training checkpoint (never running code from it)."""
    path = Path(path)
    data = load_file(path, map_location="cpu")
    try:
        cfg = from_dict(data["config"], with_method=False)
    except ValueError as exc:
        raise CheckpointError(f"{path}: its stored config is not valid: {exc}") from None
    fmt = data["format"]
    if fmt == TRAINING_FORMAT:
        index = data.get("deployment") or {}
        prefix = index.get("network_prefix")
        if prefix is None:
            raise CheckpointError(f"{path}: a training checkpoint without a deployment index")
        state = {k[len(prefix) :]: v for k, v in data["method"].items() if k.startswith(prefix)}
        heads = index.get("heads") or {}
    elif fmt in (MODEL_FORMAT, LEGACY_MODEL_FORMAT):
        state = data["state_dict"]
        heads = data.get("heads") or _legacy_heads(data)
    else:
        raise CheckpointError(
            f"{path}: a training checkpoint of an older protoseg version; use its model.pt"
        )
    # A diverged run's weights predict one class everywhere; never serve them silently.
    refuse_non_finite(state, path)
    head_states = {name: spec.get("state") or {} for name, spec in heads.items()}
    refuse_non_finite(head_states, path, "heads")
    names = data.get("class_names") or class_names_of(cfg)
    palette = [tuple(int(v) for v in c) for c in data.get("palette") or voc_palette(256)]
    return ModelFile(path, cfg, state, heads, list(names), palette)  # type: ignore[arg-type]
