"""The data side of a run: datasets of the three splits, the schedule they imply, loaders."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from protoseg.config import Config
from protoseg.data import (
    GlobalBatchSampler,
    SegmentationDataset,
    build_dataset,
    build_eval_loader,
    build_train_loader,
    eval_transform,
    split_batch_sizes,
    train_transform,
)
from protoseg.distributed import DistInfo


def steps_per_epoch(num_epoch_samples: int, batch_size: int) -> int:
    """Optimiser steps in one pass over the epoch set (the last partial batch counts)."""
    return max(1, math.ceil(num_epoch_samples / batch_size))


class TrainingData:
    """Datasets, step counts and loaders of one run, for this process."""

    def __init__(self, cfg: Config, dist: DistInfo, device: torch.device) -> None:
        self.cfg, self.dist, self.device = cfg, dist, device
        data = cfg.data
        self.labeled = build_dataset(data, "labeled", train_transform(data))
        self.unlabeled: SegmentationDataset | None = (
            build_dataset(data, "unlabeled", train_transform(data))
            if data.unlabeled_split
            else None
        )
        self.val = build_dataset(data, "val", eval_transform(data))
        epoch_set = self.labeled
        if data.epoch_over == "unlabeled" and self.unlabeled is not None:
            epoch_set = self.unlabeled
        self.steps_per_epoch = steps_per_epoch(len(epoch_set), cfg.train.batch_size)
        self.total_steps = cfg.train.total_steps(self.steps_per_epoch)
        self.micro_batch, self.accum_steps = split_batch_sizes(
            cfg.train.batch_size, dist.world_size, cfg.train.max_device_batch
        )

    def require_unlabeled(self, uses_unlabeled: bool, method: str) -> None:
        """A clear error when a semi-supervised method has no unlabelled split."""
        if uses_unlabeled and self.unlabeled is None:
            raise ValueError(
                f"method {method!r} learns from unlabelled images: set "
                "data.unlabeled_split to a split file of unlabelled images"
            )

    def _train_loader(self, dataset: SegmentationDataset, start_step: int, salt: int) -> DataLoader:
        cfg = self.cfg
        sampler = GlobalBatchSampler(
            len(dataset),
            cfg.train.batch_size,
            self.accum_steps,
            self.dist.rank,
            self.dist.world_size,
            self.steps_per_epoch,
            cfg.train.seed + salt,
            start_step,
        )
        return build_train_loader(
            dataset,
            sampler,
            cfg.data.workers,
            cfg.data.pin_memory and self.device.type == "cuda",
            cfg.data.persistent_workers,
            cfg.data.prefetch_factor,
        )

    def train_iterators(
        self, start_step: int, uses_unlabeled: bool
    ) -> tuple[Iterator[Any], Iterator[Any] | None]:
        """Labelled (and unlabelled) micro-batch iterators that continue at ``start_step``."""
        # Starting a DataLoader iterator draws from torch's global generator; isolating it
        # keeps the method's random stream identical between a resumed and a straight run.
        with torch.random.fork_rng(devices=[]):
            labeled = iter(self._train_loader(self.labeled, start_step, salt=0))
            unlabeled = (
                iter(self._train_loader(self.unlabeled, start_step, salt=1))
                if self.unlabeled is not None and uses_unlabeled
                else None
            )
        return labeled, unlabeled

    def val_loader(self) -> DataLoader:
        """This rank's shard of the validation set, one image per batch."""
        return build_eval_loader(
            self.val, self.dist.rank, self.dist.world_size, workers=min(self.cfg.data.workers, 2)
        )

    def labeled_eval_loader(self) -> DataLoader:
        """The labelled set at original size with eval transforms (prototype initialisation)."""
        dataset = build_dataset(self.cfg.data, "labeled", eval_transform(self.cfg.data))
        return build_eval_loader(dataset, workers=min(self.cfg.data.workers, 2))

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Move a batch's tensors (images channels-last on CUDA when configured)."""
        device = self.device
        moved = {}
        for key, value in batch.items():
            if torch.is_tensor(value):
                value = value.to(device, non_blocking=True)
                if key == "image" and device.type == "cuda" and self.cfg.train.channels_last:
                    value = value.contiguous(memory_format=torch.channels_last)
            moved[key] = value
        return moved
