"""Evidence that protoseg's complementary channel dropout is UniMatch V2's, bit for bit.

Not run by CI: it needs a checkout of UniMatch V2's code (``LiheYoung/UniMatch-V2``), which
protoseg does not copy. The script builds the release's own ``DPT`` network (its
``model/semseg/dpt.py``, random initial weights) and, for several seeds and batch sizes:

1. seeds torch's global generator and runs the release's strong pass
   ``model(x, comp_drop=True)`` on a stack of two views, capturing the four token maps its
   DPT head receives (the encoder's maps after its dropout);
2. takes the release encoder's clean maps of the same images
   (``backbone.get_intermediate_layers``), seeds the generator alike and applies
   ``protoseg.components.complementary_dropout`` to them;
3. reports, per case, whether the two sets of maps are equal, and the max abs difference
   of the head's logits on them (0 when they are).

The release moves its mask to the GPU with ``.cuda()`` (``dpt.py`` line 151); the script
runs on the CPU and replaces ``Tensor.cuda`` by the identity, which changes nothing else:
the release draws the mask on the CPU too.

Usage::

    git clone https://github.com/LiheYoung/UniMatch-V2 /tmp/unimatch-v2
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python tools/unimatch_v2_dropout_parity.py \\
        --release-src /tmp/unimatch-v2

Exit status 1 when any case differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from protoseg.components import complementary_dropout

PATCH = 14


def _release_dpt(release_src: Path, size: str) -> Any:
    """The release's DPT of encoder ``size`` with its per-size head widths, in eval mode."""
    sys.path.insert(0, str(release_src))
    from model.semseg.dpt import DPT  # the release's own module

    # The release's head widths per encoder size (its unimatch_v2.py lines 54-59).
    widths = {"small": (64, [48, 96, 192, 384]), "base": (128, [96, 192, 384, 768])}
    features, out_channels = widths[size]
    torch.manual_seed(0)
    model = DPT(encoder_size=size, nclass=21, features=features, out_channels=out_channels)
    return model.eval()


def _case(model: Any, images: int, seed: int, grid: tuple[int, int]) -> dict[str, Any]:
    """One comparison on ``2 x images`` random crops of ``grid`` patches."""
    h, w = grid[0] * PATCH, grid[1] * PATCH
    x = torch.randn(2 * images, 3, h, w, generator=torch.Generator().manual_seed(seed + 100))
    captured: dict[str, Any] = {}
    head_forward = model.head.forward

    def capture(features: Any, patch_h: int, patch_w: int) -> Any:
        captured["maps"] = [f.clone() for f in features]
        return head_forward(captured["maps"], patch_h, patch_w)

    model.head.forward = capture
    try:
        with torch.no_grad():
            torch.manual_seed(seed)
            release_logits = model(x, comp_drop=True)
    finally:
        model.head.forward = head_forward
    with torch.no_grad():
        clean = model.backbone.get_intermediate_layers(
            x, model.intermediate_layer_idx[model.encoder_size]
        )
        torch.manual_seed(seed)
        ours = complementary_dropout(list(clean))
        ours_logits = model.head(ours, grid[0], grid[1])
        ours_logits = torch.nn.functional.interpolate(
            ours_logits, (h, w), mode="bilinear", align_corners=True
        )
    equal = all(torch.equal(a, b) for a, b in zip(captured["maps"], ours))
    return {
        "images": images,
        "seed": seed,
        "maps_equal": equal,
        "logits_max_abs_diff": float((release_logits - ours_logits).abs().max()),
    }


def main() -> None:
    """Run the cases and print one line each; exit 1 if any differs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--release-src", type=Path, required=True, help="UniMatch V2 checkout")
    parser.add_argument("--size", choices=["small", "base"], default="small")
    parser.add_argument("--grid", type=int, nargs=2, default=[2, 3], help="patches per side")
    args = parser.parse_args()
    if not (args.release_src / "model" / "semseg" / "dpt.py").is_file():
        parser.error(
            f"{args.release_src}/model/semseg/dpt.py not found: not a UniMatch V2 checkout"
        )
    # Everything runs on the CPU, where the release draws its mask too.
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    model = _release_dpt(args.release_src, args.size)
    failed = 0
    for images in (1, 2, 3, 4):
        for seed in (0, 1, 2):
            result = _case(model, images, seed, tuple(args.grid))
            failed += not result["maps_equal"]
            print(
                f"B={result['images']} (2B={2 * result['images']} crops) seed={result['seed']}: "
                f"maps equal={result['maps_equal']}, "
                f"logits max |diff|={result['logits_max_abs_diff']:.3g}"
            )
    print("all equal" if not failed else f"{failed} case(s) differ")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
