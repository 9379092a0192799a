"""Batching that does not depend on the process layout, and the loaders built on it."""

from __future__ import annotations

from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch

from protoseg.config import DataConfig
from protoseg.data import (
    GlobalBatchSampler,
    build_dataset,
    build_eval_loader,
    build_train_loader,
    eval_transform,
    split_batch_sizes,
    train_transform,
)

Micro = list[tuple[int, int]]


def _take(sampler: GlobalBatchSampler, n: int) -> list[Micro]:
    return list(islice(iter(sampler), n))


def _layout_stream(world: int, accum: int, steps: int, **kw: int) -> list[Micro]:
    """Every rank's micro-batches, interleaved in (step, rank, accumulation) order."""
    per_rank = [
        _take(GlobalBatchSampler(accum_steps=accum, rank=r, world_size=world, **kw), steps * accum)
        for r in range(world)
    ]
    return [
        per_rank[r][s * accum + a] for s in range(steps) for r in range(world) for a in range(accum)
    ]


def test_process_layout_does_not_change_the_batches() -> None:
    kw = dict(dataset_len=37, global_batch=8, steps_per_epoch=5, seed=11)
    single = _layout_stream(1, 2, steps=12, **kw)
    assert single == _layout_stream(2, 1, steps=12, **kw)
    # Four micro-batches of 2 per step, however they are spread over ranks.
    reference = _layout_stream(1, 4, steps=12, **kw)
    assert reference == _layout_stream(2, 2, steps=12, **kw) == _layout_stream(4, 1, steps=12, **kw)
    flat = [pair for micro in single for pair in micro]
    assert flat == [pair for micro in reference for pair in micro]
    assert all(len(micro) == 4 for micro in single)


def test_epochs_are_fresh_permutations() -> None:
    sampler = GlobalBatchSampler(12, 4, 1, 0, 1, steps_per_epoch=3, seed=0)
    micro = _take(sampler, 9)
    epochs = [[i for m in micro[e * 3 : e * 3 + 3] for i, _ in m] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(12))
    assert epochs[0] != epochs[1] != epochs[2]
    other_seed = GlobalBatchSampler(12, 4, 1, 0, 1, steps_per_epoch=3, seed=1)
    assert [i for m in _take(other_seed, 3) for i, _ in m] != epochs[0]


def test_short_dataset_is_repeated_to_fill_the_epoch() -> None:
    sampler = GlobalBatchSampler(5, 4, 1, 0, 1, steps_per_epoch=6, seed=3)
    stream = [i for m in _take(sampler, 6) for i, _ in m]
    assert len(stream) == 24
    for start in range(0, 20, 5):
        assert sorted(stream[start : start + 5]) == list(range(5))
    counts = Counter(stream)
    assert set(counts) == set(range(5)) and set(counts.values()) <= {4, 5}


def test_start_step_resumes_the_exact_stream() -> None:
    kw = dict(dataset_len=23, global_batch=6, accum_steps=3, world_size=1, steps_per_epoch=4)
    full = _take(GlobalBatchSampler(rank=0, seed=5, **kw), 3 * 10)
    resumed = _take(GlobalBatchSampler(rank=0, seed=5, start_step=7, **kw), 3 * 3)
    assert resumed == full[3 * 7 :]


def test_aug_seeds_never_repeat_across_steps() -> None:
    sampler = GlobalBatchSampler(7, 6, 1, 0, 1, steps_per_epoch=3, seed=2)
    seeds = [seed for m in _take(sampler, 60) for _, seed in m]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**32 for s in seeds)
    # The same sample position gets a different seed in a run with another seed.
    other = GlobalBatchSampler(7, 6, 1, 0, 1, steps_per_epoch=3, seed=3)
    assert _take(other, 1)[0][0][1] != seeds[0]


def test_sampler_rejects_uneven_layouts() -> None:
    with pytest.raises(ValueError, match="does not split into world_size"):
        GlobalBatchSampler(10, 6, accum_steps=2, rank=0, world_size=2, steps_per_epoch=2, seed=0)
    with pytest.raises(ValueError, match="rank=2"):
        GlobalBatchSampler(10, 4, accum_steps=1, rank=2, world_size=2, steps_per_epoch=2, seed=0)


@pytest.mark.parametrize(
    ("global_batch", "world", "max_device", "expected"),
    [
        (16, 1, 0, (16, 1)),
        (16, 2, 0, (8, 1)),
        (16, 2, 8, (8, 1)),
        (16, 2, 64, (8, 1)),
        (16, 2, 3, (2, 4)),
        (12, 1, 5, (4, 3)),
        (7, 1, 2, (1, 7)),
    ],
)
def test_split_batch_sizes(
    global_batch: int, world: int, max_device: int, expected: tuple[int, int]
) -> None:
    assert split_batch_sizes(global_batch, world, max_device) == expected


def test_split_batch_sizes_errors() -> None:
    with pytest.raises(ValueError, match="batch_size=16 is not divisible by the world size 3"):
        split_batch_sizes(16, 3, 0)
    with pytest.raises(ValueError, match="train.max_device_batch"):
        split_batch_sizes(16, 2, -1)


def _synthetic_cfg(root: Path) -> DataConfig:
    return DataConfig(
        root=str(root),
        num_classes=6,
        crop_size=32,
        mask_dir="SegmentationClass",
        labeled_split="splits/8/labeled.txt",
        unlabeled_split="splits/8/unlabeled.txt",
    )


def test_train_loader_is_independent_of_workers(synthetic_root: Path) -> None:
    cfg = _synthetic_cfg(synthetic_root)
    dataset = build_dataset(cfg, "labeled", train_transform(cfg))

    def batches(workers: int) -> list[dict]:
        sampler = GlobalBatchSampler(len(dataset), 4, 2, 0, 1, steps_per_epoch=5, seed=0)
        loader = build_train_loader(dataset, sampler, workers, False, False, 2)
        return list(islice(iter(loader), 4))

    serial, parallel = batches(0), batches(2)
    for a, b in zip(serial, parallel):
        assert a["image"].shape == (2, 3, 32, 32) and a["mask"].shape == (2, 32, 32)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert a["name"] == b["name"] and isinstance(a["name"][0], str)
    unlabeled = build_dataset(cfg, "unlabeled", train_transform(cfg))
    sampler = GlobalBatchSampler(len(unlabeled), 4, 1, 0, 1, steps_per_epoch=2, seed=0)
    batch = next(iter(build_train_loader(unlabeled, sampler, 0, False, True, 2)))
    assert "mask" not in batch and batch["image"].shape == (4, 3, 32, 32)
    assert batch["valid"].shape == (4, 32, 32) and batch["valid"].dtype == torch.bool


def test_eval_loader_shards_cover_every_image_once(synthetic_root: Path) -> None:
    cfg = _synthetic_cfg(synthetic_root)
    dataset = build_dataset(cfg, "val", eval_transform(cfg))
    seen: list[str] = []
    for rank in range(5):
        for batch in build_eval_loader(dataset, rank=rank, world_size=5):
            assert batch["image"].shape[0] == 1
            (height, width) = batch["size"][0]
            assert batch["image"].shape[-2:] == (height, width)
            assert batch["mask"].shape == (1, height, width)
            seen.extend(batch["name"])
    assert sorted(seen) == sorted(s.name for s in dataset.samples)
    assert len(seen) == len(dataset) == 12
