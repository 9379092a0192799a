"""UniMatch V2's evaluation as settings of the inference core: resizing each view to a
multiple of the patch size, and windows/views combined by their probabilities."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protoseg.config import EvalConfig
from protoseg.inference import infer_logits
from protoseg.inference.core import _window_starts, nearest_multiple_size

NUM_CLASSES = 3


class PatchGridNet(nn.Module):
    """A position-dependent network that, like a ViT, only takes multiples of 14."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, NUM_CLASSES, 3, padding=1)
        self.sizes: list[tuple[int, int]] = []

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h, w = x.shape[-2:]
        assert h % 14 == 0 and w % 14 == 0, (h, w)
        self.sizes.append((h, w))
        ramp = torch.linspace(-2, 2, w).expand(h, w)
        return {"logits": self.conv(x) + ramp}


def test_nearest_multiple_rounds_half_up_like_unimatch_v2() -> None:
    # int(side / 14 + 0.5) * 14: 500 -> 504, 375 -> 378, 517 -> 518, 7 -> 14 (never 0).
    assert nearest_multiple_size((500, 375), 14) == (504, 378)
    assert nearest_multiple_size((517, 510), 14) == (518, 504)
    assert nearest_multiple_size((7, 20), 14) == (14, 14)


def test_whole_image_resized_to_the_patch_multiple_and_back() -> None:
    model = PatchGridNet()
    x = torch.randn(1, 3, 50, 75)
    out = infer_logits(model, x, EvalConfig(resize_to_multiple=14), NUM_CLASSES)
    assert model.sizes == [(56, 70)]
    assert out.shape == (1, NUM_CLASSES, 50, 75)
    # UniMatch V2's supervised.py evaluate(mode="original"): resize, predict, resize back,
    # both bilinear with align_corners=True.
    up = F.interpolate(x, (56, 70), mode="bilinear", align_corners=True)
    with torch.no_grad():
        want = F.interpolate(model(up)["logits"], (50, 75), mode="bilinear", align_corners=True)
    torch.testing.assert_close(out, want)


def test_without_resize_a_patch_multiple_runs_unchanged() -> None:
    model = PatchGridNet()
    x = torch.randn(1, 3, 42, 56)
    out = infer_logits(model, x, EvalConfig(resize_to_multiple=14), NUM_CLASSES)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x)["logits"])
    assert model.sizes == [(42, 56), (42, 56)]


def test_cityscapes_window_offsets_match_unimatch_v2() -> None:
    # crop 798, stride int(798 * 2 / 3) = 532 on 1024 x 2048: 2 rows x 4 columns.
    assert _window_starts(1024, 798, 532) == [0, 226]
    assert _window_starts(2048, 798, 532) == [0, 532, 1064, 1250]


def _unimatch_v2_sliding(model: nn.Module, x: Tensor, grid: int, stride: int) -> Tensor:
    """UniMatch V2's loop: rows and columns advance by stride, the last flush with the
    border, and the softmax of every window is summed."""
    _, _, h, w = x.shape
    final = torch.zeros(x.shape[0], NUM_CLASSES, h, w)
    row = 0
    while True:
        col = 0
        while True:
            crop = x[:, :, row : row + grid, col : col + grid]
            final[:, :, row : row + grid, col : col + grid] += model(crop)["logits"].softmax(1)
            if col == w - grid:
                break
            col = min(col + stride, w - grid)
        if row == h - grid:
            break
        row = min(row + stride, h - grid)
    return final


def test_sliding_window_with_summed_probabilities_matches_unimatch_v2() -> None:
    model = PatchGridNet()
    x = torch.randn(2, 3, 70, 140)
    cfg = EvalConfig(mode="sliding", window=42, stride=28, merge="probabilities")
    out = infer_logits(model, x, cfg, NUM_CLASSES)
    with torch.no_grad():
        summed = _unimatch_v2_sliding(model, x, 42, 28)
    # Same argmax as the sum, and the softmax of the result is the per-pixel mean.
    assert torch.equal(out.argmax(1), summed.argmax(1))
    mean = summed / summed.sum(1, keepdim=True)
    torch.testing.assert_close(out.softmax(1), mean)
    # Averaging logits instead (protoseg's default) is another result where windows overlap.
    by_logits = infer_logits(model, x, EvalConfig(mode="sliding", window=42, stride=28), 3)
    assert not torch.allclose(by_logits.softmax(1), mean, atol=1e-4)


def test_probability_merge_averages_flip_views_in_probability() -> None:
    model = PatchGridNet()
    x = torch.randn(1, 3, 28, 42)
    out = infer_logits(model, x, EvalConfig(flip=True, merge="probabilities"), NUM_CLASSES)
    with torch.no_grad():
        plain = model(x)["logits"].softmax(1)
        flipped = model(x.flip(-1))["logits"].flip(-1).softmax(1)
    torch.testing.assert_close(out.softmax(1), (plain + flipped) / 2)
