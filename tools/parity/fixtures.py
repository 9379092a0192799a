"""Parity fixtures: what a source computed for one step, small enough to keep in tests/data.

A fixture is a safetensors file. Its tensors are the step's inputs (``batch.*``, the fixed
random draws ``draw.*``, the initial network ``weights.*`` as int8 codes and power-of-two
scales) and the source's results (``expect.*``). Its metadata holds the method, protoseg's
overrides, the step number, the command that wrote it and the source's commit.

Results are summarised so that a fixture stays small while every element still counts:
a tensor of at most ``FULL_LIMIT`` elements is stored whole; a larger one as its
``PROJECTIONS`` projections onto fixed random +-1 vectors (derived from the tensor's name),
which move with any element that moves. The tolerance of a projection is the elementwise
tolerance times sqrt(numel), the size of a sum of independent elementwise errors.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

FULL_LIMIT = 2048
PROJECTIONS = 4
TOLERANCE = 1e-5


def signs(name: str, numel: int) -> Tensor:
    """(PROJECTIONS, numel) fixed +-1 vectors for the tensor called ``name``."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randint(0, 2, (PROJECTIONS, numel), generator=gen).float() * 2 - 1


def summary(name: str, t: Tensor) -> Tensor:
    """The stored form of result ``name``: itself if small, else its projections."""
    t = t.detach().double().flatten()
    if t.numel() <= FULL_LIMIT:
        return t.float().clone()
    return (signs(name, t.numel()).double() @ t).float()


def summaries(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every tensor's stored form under ``prefix``."""
    return {f"{prefix}{k}": summary(f"{prefix}{k}", v) for k, v in tensors.items()}


@dataclass
class Difference:
    """One compared result: its name, the max abs difference and the tolerance it must meet."""

    name: str
    max_abs: float
    tolerance: float
    projected: bool

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.tolerance


def compare(
    prefix: str, actual: dict[str, Tensor], stored: dict[str, Tensor], tolerance: float = TOLERANCE
) -> list[Difference]:
    """Differences of ``actual`` results from the stored ones (every stored key must be there)."""
    out = []
    for key in sorted(k for k in stored if k.startswith(prefix)):
        name = key[len(prefix) :]
        if name not in actual:
            raise KeyError(f"protoseg's step gave no {name!r} (stored as {key})")
        t = actual[name].detach().flatten()
        projected = t.numel() > FULL_LIMIT
        mine = summary(key, t)
        tol = tolerance * (math.sqrt(t.numel()) if projected else 1.0)
        if mine.shape != stored[key].shape:
            # A different size (e.g. another number of queued keys) is a difference too.
            out.append(Difference(name, math.inf, tol, projected))
            continue
        diff = float((mine.double() - stored[key].double()).abs().max()) if mine.numel() else 0.0
        out.append(Difference(name, diff, tol, projected))
    return out


def save(path: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Write a fixture (contiguous CPU tensors, metadata as one JSON string)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(clean, str(path), metadata={"parity": json.dumps(meta, sort_keys=True)})


def load(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, metadata) of a fixture."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["parity"])
    return load_file(str(path)), meta


def pack_weights(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A quantised state dict (see ``protoseg_side.quantized_state``) as int8 codes + scales."""
    from tools.parity.protoseg_side import quantize

    out = {}
    for k, v in state.items():
        if v.is_floating_point():
            codes, scale = quantize(v)
            out[f"weights.{k}"] = codes
            out[f"scale.{k}"] = scale.reshape(1)
        else:
            out[f"weights.{k}"] = v
    return out


def unpack_weights(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The state dict ``pack_weights`` stored."""
    out = {}
    for key, v in tensors.items():
        if not key.startswith("weights."):
            continue
        name = key[len("weights.") :]
        scale = tensors.get(f"scale.{name}")
        out[name] = v.float() * scale[0] if scale is not None else v.clone()
    return out


def section(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The tensors under ``prefix``, with it removed."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
