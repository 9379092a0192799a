"""Evidence that protoseg's ``vit_dpt`` computes what UniMatch V2's DINOv2 + DPT computes.

Not run by CI: it needs a checkout of UniMatch V2's code (LiheYoung/UniMatch-V2), which
protoseg does not copy. For each encoder size the script

1. builds UniMatch V2's own ``model.semseg.dpt.DPT`` from ``--src`` with the per-size
   widths of its ``unimatch_v2.py`` and 21 classes, then refills every tensor with seeded
   random values (LayerScale and norms included, so that swapped names would show). The
   network is built from code alone: ``DPT`` never downloads anything (its training script
   loads ``./pretrained/*.pth``, which is not called), and without xFormers its attention
   is the explicit softmax(q k^T) v;
2. saves the encoder part as Meta's original DINOv2 file (``backbone.*`` without the
   prefix, ``mask_token`` included) and builds protoseg's ``vit_dpt`` with
   ``pretrained=<that file>``, so the encoder goes through protoseg's loader and timm's
   checkpoint conversion; the decoder is mapped by
   ``protoseg.convert.unimatch_v2.convert_unimatch_v2_state`` (which must reproduce the
   file-loaded encoder tensor for tensor);
3. runs the same random images through both networks in eval mode and prints the max abs
   difference of the logits next to the largest reference value and the argmax agreement,
   with protoseg's fused (SDPA) and explicit attention and both ``model.vit.position_resize``
   settings, at 518 x 518 (UniMatch V2's crop, the native 37 x 37 position grid) and at
   364 x 518, where timm's resampling of the position embeddings (bicubic to the grid,
   antialiased) differs from DINOv2's (bicubic by the factor (g + 0.1) / 37, no antialias),
   which ``position_resize=dinov2`` reproduces.

It also writes UniMatch V2's tensor names and shapes (``tests/data/unimatch_v2_names_*.txt``).

Usage (CPU, a few minutes for S and B)::

    git clone https://github.com/LiheYoung/UniMatch-V2 /tmp/src/unimatch-v2
    git -C /tmp/src/unimatch-v2 checkout f6afb4d
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 PYTHONPATH=$PWD python tools/unimatch_v2_parity.py \\
        --src /tmp/src/unimatch-v2 --work /tmp/um2-parity --names-dir tests/data
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

# unimatch_v2.py, model_configs: features and out_channels per encoder size.
SIZES: dict[str, tuple[int, list[int]]] = {
    "small": (64, [48, 96, 192, 384]),
    "base": (128, [96, 192, 384, 768]),
    "large": (256, [256, 512, 1024, 1024]),
}
TIMM_NAMES = {
    "small": "vit_small_patch14_dinov2",
    "base": "vit_base_patch14_dinov2",
    "large": "vit_large_patch14_dinov2",
}
NUM_CLASSES = 21
NAMES_HEADER = (
    "# Tensor names and shapes of UniMatch V2's DPT with a DINOv2-{size} encoder and\n"
    "# {classes} classes as its model/semseg/dpt.py builds it (widths of unimatch_v2.py).\n"
    "# Written by tools/unimatch_v2_parity.py from LiheYoung/UniMatch-V2 at {commit}.\n"
)


def build_reference(src: Path, size: str, seed: int) -> nn.Module:
    """UniMatch V2's DPT from its own code, every tensor refilled from ``seed``."""
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))
    from model.semseg.dpt import DPT  # type: ignore[import-not-found]

    features, out_channels = SIZES[size]
    torch.manual_seed(seed)
    model = DPT(encoder_size=size, nclass=NUM_CLASSES, features=features, out_channels=out_channels)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "gamma" or (leaf == "weight" and p.dim() == 1):
                # LayerScale and LayerNorm scales: around 1, not 1, so a mix-up shows.
                value = 1.0 + 0.2 * torch.randn(p.shape, generator=gen)
            elif leaf == "weight":
                fan_in = math.prod(p.shape[1:])
                value = torch.randn(p.shape, generator=gen) / math.sqrt(fan_in)
            else:
                value = 0.05 * torch.randn(p.shape, generator=gen)
            p.copy_(value)
    return model.eval()


def build_protoseg(
    reference: nn.Module, size: str, work: Path, fused: bool, position_resize: str
) -> nn.Module:
    """protoseg's vit_dpt with the reference's encoder file and its converted decoder."""
    from protoseg.config import ViTConfig
    from protoseg.convert.unimatch_v2 import convert_unimatch_v2_state
    from protoseg.models import ViTDPT

    encoder_file = work / f"dinov2_{size}_random_original_names.pth"
    torch.save(reference.backbone.state_dict(), encoder_file)
    model = ViTDPT(
        NUM_CLASSES,
        backbone=TIMM_NAMES[size],
        pretrained=str(encoder_file),
        vit=ViTConfig(fused_attention=fused, position_resize=position_resize),
    )
    state = convert_unimatch_v2_state(reference.state_dict(), model.backbone.trunk)
    own = model.state_dict()
    for key, value in own.items():
        if key.startswith("backbone.") and not torch.equal(value, state[key]):
            raise SystemExit(f"the loader and the converter disagree on {key}")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise SystemExit(f"mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def compare(reference: nn.Module, ours: nn.Module, x: Tensor) -> dict[str, Any]:
    """Max abs logit difference, largest reference logit and argmax agreement."""
    with torch.no_grad():
        ref = reference(x)
        got = ours(x)["logits"]
    return {
        "max_abs_diff": float((ref - got).abs().max()),
        "max_abs_ref": float(ref.abs().max()),
        "argmax_agree": float((ref.argmax(1) == got.argmax(1)).float().mean()),
    }


def write_names(reference: nn.Module, size: str, path: Path, commit: str) -> None:
    """UniMatch V2's tensor names and shapes, one per line."""
    lines = [NAMES_HEADER.format(size=size, classes=NUM_CLASSES, commit=commit)]
    for name, tensor in reference.state_dict().items():
        lines.append(f"{name} {','.join(str(d) for d in tensor.shape)}\n")
    path.write_text("".join(lines))


def _commit(src: Path) -> str:
    head = src / ".git" / "HEAD"
    if not head.is_file():
        return os.environ.get("UNIMATCH_V2_COMMIT", "an unrecorded commit")
    ref = head.read_text().strip()
    if ref.startswith("ref: "):
        target = src / ".git" / ref[5:]
        return target.read_text().strip()[:7] if target.is_file() else ref[5:]
    return ref[:7]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True, type=Path, help="UniMatch V2 checkout")
    parser.add_argument("--work", default=Path("/tmp/um2-parity"), type=Path)
    parser.add_argument("--sizes", nargs="+", default=["small", "base"], choices=list(SIZES))
    parser.add_argument("--names-dir", default=None, type=Path, help="write the name lists")
    parser.add_argument("--seed", default=0, type=int)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    commit = _commit(args.src)
    gen = torch.Generator().manual_seed(args.seed)
    inputs = {
        "518x518": torch.randn(1, 3, 518, 518, generator=gen),
        "364x518": torch.randn(1, 3, 364, 518, generator=gen),
    }
    rows = []
    for size in args.sizes:
        reference = build_reference(args.src, size, args.seed)
        if args.names_dir is not None:
            write_names(reference, size, args.names_dir / f"unimatch_v2_names_{size}.txt", commit)
        for fused in (True, False):
            for resize in ("timm", "dinov2"):
                ours = build_protoseg(reference, size, args.work, fused, resize)
                for label, x in inputs.items():
                    start = time.perf_counter()
                    row = {"encoder": f"DINOv2-{size[0].upper()}", "input": label}
                    row["attention"] = "fused (SDPA)" if fused else "explicit"
                    row["position_resize"] = resize
                    row.update(compare(reference, ours, x))
                    row["seconds"] = round(time.perf_counter() - start, 1)
                    rows.append(row)
                    print(
                        f"{row['encoder']:10} {label:8} {row['attention']:13} {resize:7} "
                        f"max|diff| {row['max_abs_diff']:.2e}  "
                        f"max|ref| {row['max_abs_ref']:.2f}  "
                        f"argmax agree {row['argmax_agree']:.6f}  ({row['seconds']} s)",
                        flush=True,
                    )
    report = {"unimatch_v2_commit": commit, "torch": torch.__version__, "rows": rows}
    (args.work / "unimatch_v2_parity.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
