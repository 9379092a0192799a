"""Deterministic batching that does not depend on the number of processes.

The global batch of optimisation step ``s`` is fixed by (seed, s) alone; each process takes
its chunks of it, so one process with gradient accumulation sees the same samples in the same
micro-batches as several processes without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

_MASK32 = 0xFFFFFFFF


def _mix32(value: int) -> int:
    """A bijection on 32-bit integers (MurmurHash3's finaliser) that scatters nearby inputs."""
    value &= _MASK32
    value ^= value >> 16
    value = (value * 0x85EBCA6B) & _MASK32
    value ^= value >> 13
    value = (value * 0xC2B2AE35) & _MASK32
    value ^= value >> 16
    return value


def _seed_key(*values: int) -> int:
    """A 63-bit generator seed derived from a tuple of integers."""
    state = np.random.SeedSequence([v & 0xFFFFFFFFFFFFFFFF for v in values]).generate_state(2)
    return (int(state[0]) << 31 ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Infinite micro-batches of (index, aug_seed) for one rank, resumable at any step."""

    def __init__(
        self,
        dataset_len: int,
        global_batch: int,
        accum_steps: int,
        rank: int,
        world_size: int,
        steps_per_epoch: int,
        seed: int,
        start_step: int = 0,
    ) -> None:
        checks = {
            "dataset_len": dataset_len,
            "global_batch": global_batch,
            "accum_steps": accum_steps,
            "world_size": world_size,
            "steps_per_epoch": steps_per_epoch,
        }
        for key, value in checks.items():
            if value <= 0:
                raise ValueError(f"GlobalBatchSampler: {key}={value} must be > 0")
        if not 0 <= rank < world_size:
            raise ValueError(f"GlobalBatchSampler: rank={rank} must lie in [0, {world_size})")
        if start_step < 0:
            raise ValueError(f"GlobalBatchSampler: start_step={start_step} must be >= 0")
        chunks = world_size * accum_steps
        if global_batch % chunks:
            raise ValueError(
                f"global batch {global_batch} does not split into world_size*accum_steps = "
                f"{world_size}*{accum_steps} equal micro-batches; pick train.batch_size as a "
                f"multiple of {chunks} (see split_batch_sizes)"
            )
        self.dataset_len = dataset_len
        self.global_batch = global_batch
        self.accum_steps = accum_steps
        self.rank = rank
        self.world_size = world_size
        self.steps_per_epoch = steps_per_epoch
        self.seed = seed
        self.start_step = start_step
        self.micro_batch = global_batch // chunks
        # The 32-bit offset keeps runs with different seeds on different augmentation streams.
        self._seed_offset = _seed_key(seed, 0xA5) & _MASK32
        self._epoch = -1
        self._stream = torch.empty(0, dtype=torch.long)

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """The epoch's index stream: random permutations of the dataset, repeated to fill it."""
        needed = self.steps_per_epoch * self.global_batch
        generator = torch.Generator().manual_seed(_seed_key(self.seed, epoch))
        repeats = -(-needed // self.dataset_len)
        perms = [torch.randperm(self.dataset_len, generator=generator) for _ in range(repeats)]
        return torch.cat(perms)[:needed]

    def global_batch_at(self, step: int) -> list[tuple[int, int]]:
        """All (index, aug_seed) pairs of optimisation step ``step``, over every rank."""
        epoch, within = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._stream, self._epoch = self.epoch_indices(epoch), epoch
        start = within * self.global_batch
        indices = self._stream[start : start + self.global_batch].tolist()
        base = step * self.global_batch
        return [(index, self.aug_seed(base + pos)) for pos, index in enumerate(indices)]

    def aug_seed(self, sample_number: int) -> int:
        """The augmentation seed of the n-th sample drawn in the run (step * batch + position)."""
        # torch's CPU generator keeps only the low 32 bits of a seed, so the seed is a 32-bit
        # bijection of the sample number: distinct for the first 2**32 samples of a run.
        return _mix32(sample_number + self._seed_offset)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        m = self.micro_batch
        while True:
            batch = self.global_batch_at(step)
            for a in range(self.accum_steps):
                chunk = self.rank * self.accum_steps + a
                yield batch[chunk * m : (chunk + 1) * m]
            step += 1


def collate_samples(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the tensors of dataset items; 'name' stays a list of str, 'size' of (H, W) tuples."""
    batch: dict[str, Any] = {
        "image": torch.stack([item["image"] for item in items]),
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        "name": [item["name"] for item in items],
        "size": [tuple(item["size"]) for item in items],
    }
    for key in ("mask", "valid"):
        present = [key in item for item in items]
        if all(present):
            batch[key] = torch.stack([item[key] for item in items])
        elif any(present):
            raise ValueError("a batch mixes labelled and unlabelled samples; keep them apart")
    return batch


def build_train_loader(
    dataset: Dataset,
    sampler: GlobalBatchSampler,
    workers: int,
    pin_memory: bool,
    persistent_workers: bool,
    prefetch_factor: int,
) -> DataLoader:
    """A loader that yields the sampler's micro-batches (augmentation seeded per sample)."""
    extra: dict[str, Any] = {}
    if workers > 0:
        extra = {"persistent_workers": persistent_workers, "prefetch_factor": prefetch_factor}
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        # Pinning only helps host-to-GPU copies; without CUDA it merely warns.
        pin_memory=pin_memory and torch.cuda.is_available(),
        collate_fn=collate_samples,
        **extra,
    )


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world_size, ... : every index on exactly one rank, no padding."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_eval_loader(
    dataset: Dataset, rank: int = 0, world_size: int = 1, workers: int = 0
) -> DataLoader:
    """One image per batch, this rank's shard only, so per-rank counts sum to the whole set."""
    return DataLoader(
        dataset,
        batch_size=1,
        sampler=ShardSampler(len(dataset), rank, world_size),  # type: ignore[arg-type]
        num_workers=workers,
        collate_fn=collate_samples,
    )


def split_batch_sizes(global_batch: int, world_size: int, max_device_batch: int) -> tuple[int, int]:
    """(micro_batch, accum_steps) per rank: the fewest accumulation steps that fit the device."""
    if global_batch <= 0 or world_size <= 0 or max_device_batch < 0:
        raise ValueError(
            f"train.batch_size={global_batch} and the world size {world_size} must be > 0, "
            f"train.max_device_batch={max_device_batch} >= 0"
        )
    if global_batch % world_size:
        raise ValueError(
            f"train.batch_size={global_batch} is not divisible by the world size {world_size}; "
            f"set train.batch_size to a multiple of {world_size}"
        )
    per_rank = global_batch // world_size
    if max_device_batch == 0 or max_device_batch >= per_rank:
        return per_rank, 1
    fits = (a for a in range(2, per_rank + 1) if per_rank % a == 0)
    accum = next(a for a in fits if per_rank // a <= max_device_batch)
    return per_rank // accum, accum
