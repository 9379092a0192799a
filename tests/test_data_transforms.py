"""Joint transforms keep image and mask aligned, crop exactly, and pad with 0 / ignore."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from protoseg.config import ConfigError, DataConfig, load_config
from protoseg.data import denormalize, eval_transform, train_transform
from protoseg.data.splits import DataError
from protoseg.data.transforms import RandomRescale

IGNORE = 255


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny tensors: thread hand-offs cost more than they save, badly so on a busy 2-core box.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _class_coded_pair(rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """An image whose red channel is 20 + 40 * class, and the matching mask (one cell ignore)."""
    cells = rng.integers(0, 6, size=(3, 4)).astype(np.uint8)
    mask = np.kron(cells, np.ones((24, 22), np.uint8))
    image = np.zeros((*mask.shape, 3), np.uint8)
    image[..., 0] = 20 + 40 * mask
    image[..., 1] = 255 - image[..., 0]
    image[..., 2] = 128
    mask[24:48, 22:44] = IGNORE
    return Image.fromarray(image), mask


def _decode(image: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    red = denormalize(image, cfg.mean, cfg.std)[0] * 255
    return ((red - 20) / 40).round().clamp(0, 5).long()


def _interior(mask: torch.Tensor) -> torch.Tensor:
    """Pixels whose 3x3 neighbourhood holds one label (away from label boundaries)."""
    m = mask[None, None].float()
    high = F.max_pool2d(m, 3, stride=1, padding=1)
    low = -F.max_pool2d(-m, 3, stride=1, padding=1)
    return (high == low)[0, 0]


def test_train_transform_keeps_image_and_mask_aligned() -> None:
    cfg = DataConfig(root="unused", crop_size=64, scale_range=[0.5, 2.0])
    transform = train_transform(cfg)
    rng = np.random.default_rng(0)
    agree = total = padded = 0
    for seed in range(60):
        image, mask = _class_coded_pair(rng)
        torch.manual_seed(seed)
        out_image, out_mask = transform(image, mask)
        assert out_image.shape == (3, 64, 64) and out_image.dtype == torch.float32
        assert out_mask is not None
        assert out_mask.shape == (64, 64) and out_mask.dtype == torch.int64
        pad = (out_image == 0).all(dim=0)
        # Padding: image exactly 0 after normalisation, label ignore.
        assert (out_mask[pad] == IGNORE).all()
        padded += int(pad.sum())
        keep = _interior(out_mask) & (out_mask != IGNORE)
        decoded = _decode(out_image, cfg)
        agree += int((decoded[keep] == out_mask[keep]).sum())
        total += int(keep.sum())
        assert set(out_mask.unique().tolist()) <= {0, 1, 2, 3, 4, 5, IGNORE}
    assert padded > 1000, "scale 0.5 of a 72x88 image must need padding to 64x64"
    assert total > 60 * 64 * 64 * 0.3
    assert agree / total >= 0.995, f"image/mask agreement {agree / total:.4f}"


def test_train_transform_without_mask_matches_the_masked_call() -> None:
    cfg = DataConfig(root="unused", crop_size=40)
    transform = train_transform(cfg)
    image, mask = _class_coded_pair(np.random.default_rng(1))
    torch.manual_seed(5)
    with_mask, _ = transform(image, mask)
    torch.manual_seed(5)
    alone, none = transform(image, None)
    assert none is None and alone.shape == (3, 40, 40)
    assert torch.equal(with_mask, alone)


def _valid_region(out_image: torch.Tensor, out_mask: torch.Tensor) -> torch.Tensor:
    """The un-padded part of a crop larger than the rescaled image."""
    pad = (out_image == 0).all(dim=0)
    rows, cols = (~pad).any(dim=1), (~pad).any(dim=0)
    return out_mask[rows][:, cols]


def test_train_transform_scale_and_flip_are_random() -> None:
    image, mask = _class_coded_pair(np.random.default_rng(2))
    expected = torch.from_numpy(mask).long()
    cfg = DataConfig(root="unused", crop_size=200, scale_range=[0.5, 2.0])
    heights = set()
    for seed in range(20):
        torch.manual_seed(seed)
        out_image, out_mask = train_transform(cfg)(image, mask)
        assert out_mask is not None
        heights.add(_valid_region(out_image, out_mask).shape[0])
    assert len(heights) > 5 and min(heights) >= 36 and max(heights) <= 144
    for hflip in (True, False):
        cfg = DataConfig(root="unused", crop_size=200, scale_range=[1.0, 1.0], hflip=hflip)
        flips = []
        for seed in range(20):
            torch.manual_seed(seed)
            out_image, out_mask = train_transform(cfg)(image, mask)
            assert out_mask is not None
            region = _valid_region(out_image, out_mask)
            assert torch.equal(region, expected) or torch.equal(region, expected.flip(-1))
            flips.append(not torch.equal(region, expected))
        assert (0 < sum(flips) < 20) if hflip else not any(flips)


def _rescale_step(cfg: DataConfig) -> RandomRescale:
    steps = train_transform(cfg).pipeline.transforms  # type: ignore[attr-defined]
    return next(step for step in steps if isinstance(step, RandomRescale))


@pytest.mark.parametrize(
    ("sampling", "mean", "below_one", "half_means"),
    # U2PL's RandResize: U[0.5, 1] or U[1, 2] with probability 1/2 each.
    [("split", 1.125, 0.5, (0.75, 1.5)), ("uniform", 1.25, 1 / 3, (0.75, 1.5))],
)
def test_scale_sampling_distribution(
    sampling: str, mean: float, below_one: float, half_means: tuple[float, float]
) -> None:
    cfg = DataConfig(root="unused", scale_range=[0.5, 2.0], scale_sampling=sampling)
    rescale = _rescale_step(cfg)
    torch.manual_seed(0)
    factors = torch.tensor([rescale.draw_factor() for _ in range(20000)], dtype=torch.float64)
    assert factors.min() >= 0.5 and factors.max() <= 2.0
    # Standard errors are ~0.003 at 20000 draws; the two samplings differ by 0.125 and 1/6.
    assert factors.mean().item() == pytest.approx(mean, abs=0.015)
    assert (factors < 1).double().mean().item() == pytest.approx(below_one, abs=0.015)
    below, above = factors[factors < 1], factors[factors >= 1]
    assert below.mean().item() == pytest.approx(half_means[0], abs=0.015)
    assert above.mean().item() == pytest.approx(half_means[1], abs=0.015)


def test_split_scale_sampling_needs_a_range_around_one() -> None:
    with pytest.raises(DataError, match="contains 1"):
        RandomRescale(1.2, 1.5, "split")
    with pytest.raises(ConfigError, match="scale_sampling=split"):
        overrides = ["data.scale_sampling=split", "data.scale_range=[1.2,1.5]"]
        load_config(None, ["data.root=x", *overrides])
    assert RandomRescale(1.2, 1.5, "uniform").draw_factor() >= 1.2


def test_eval_transform_is_identity_geometry() -> None:
    cfg = DataConfig(root="unused")
    image, mask = _class_coded_pair(np.random.default_rng(3))
    out_image, out_mask = eval_transform(cfg)(image, mask)
    assert out_image.shape == (3, 72, 88)
    assert out_mask is not None and torch.equal(out_mask, torch.from_numpy(mask).long())
    restored = denormalize(out_image, cfg.mean, cfg.std) * 255
    assert (restored - torch.from_numpy(np.array(image)).permute(2, 0, 1)).abs().max() < 0.01
    assert eval_transform(cfg)(image, None)[1] is None
