"""Process-group helpers for single- and multi-process (torchrun) runs.

Every helper is a no-op in a single process, so callers never branch on whether
training is distributed. The launcher is torchrun: rank, world size and local rank come
from its environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), never from a
``--local_rank`` argument.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """True on the process that logs, saves and shows progress (rank 0)."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def _is_initialized() -> bool:
    """Whether a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def _env_int(name: str, default: int) -> int:
    """An integer environment variable, with a clear error when it is malformed."""
    value = os.environ.get(name, "")
    if value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_device(device_pref: str, local_rank: int = 0) -> torch.device:
    """Turn a device preference ("auto", "cpu", "cuda", "cuda:N") into a device."""
    pref = device_pref.strip().lower()
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cpu":
        return torch.device("cpu")
    if pref == "cuda" or pref.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device {device_pref!r} was requested but CUDA is not available "
                "(use device 'cpu' or 'auto')"
            )
        if pref == "cuda":
            index = local_rank
        else:
            try:
                index = int(pref.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"device {device_pref!r}: expected 'cuda:<index>'") from None
        count = torch.cuda.device_count()
        if not 0 <= index < count:
            raise RuntimeError(
                f"device {device_pref!r} resolves to cuda:{index} but only {count} "
                "CUDA device(s) are visible"
            )
        return torch.device("cuda", index)
    raise ValueError(f"device {device_pref!r}: choose 'auto', 'cpu', 'cuda' or 'cuda:<index>'")


def init_distributed(device_pref: str = "auto") -> tuple[DistInfo, torch.device]:
    """Read torchrun's environment, pick this process's device and join the process group."""
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    # Single-node launches without LOCAL_RANK still get one device per process.
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid torchrun environment: RANK={rank} WORLD_SIZE={world_size}")
    device = resolve_device(device_pref, local_rank)
    if device.type == "cuda":
        # Later bare .cuda() calls and NCCL collectives must land on this rank's GPU.
        torch.cuda.set_device(device)
    if world_size > 1 and not _is_initialized():
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        if device.type == "cuda":
            # Binding the group to the device avoids NCCL guessing it (and warning) later.
            dist.init_process_group(
                backend="nccl",
                init_method="env://",
                rank=rank,
                world_size=world_size,
                device_id=device,
            )
        else:
            dist.init_process_group(
                backend="gloo", init_method="env://", rank=rank, world_size=world_size
            )
    if _is_initialized():
        return get_dist_info(), device
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank), device


def get_dist_info() -> DistInfo:
    """This process's rank, world size and local rank (a single process when no group exists)."""
    if not _is_initialized():
        return DistInfo(rank=0, world_size=1, local_rank=0)
    rank = dist.get_rank()
    return DistInfo(
        rank=rank, world_size=dist.get_world_size(), local_rank=_env_int("LOCAL_RANK", rank)
    )


def _needs_cuda_staging(t: Tensor) -> bool:
    """NCCL only moves CUDA tensors; CPU counters must travel through the GPU."""
    return t.device.type == "cpu" and dist.get_backend() == "nccl"


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over all processes in place and return it (unchanged in a single process)."""
    if not _is_initialized() or dist.get_world_size() == 1:
        return t
    if _needs_cuda_staging(t):
        staged = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(staged, op=dist.ReduceOp.SUM)
        t.copy_(staged)
        return t
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast(t: Tensor, src: int = 0) -> Tensor:
    """Overwrite ``t`` in place with rank ``src``'s copy and return it (no-op in one process)."""
    if not _is_initialized() or dist.get_world_size() == 1:
        return t
    if _needs_cuda_staging(t):
        staged = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.broadcast(staged, src=src)
        t.copy_(staged)
        return t
    dist.broadcast(t, src=src)
    return t


def all_gather_rows(t: Tensor) -> Tensor:
    """Rows of ``t`` from every process, concatenated in rank order (``t`` itself in one process).

    Processes may hold different numbers of rows; all other dimensions must agree. Every
    process receives the same result, so state built from it stays identical across ranks.
    """
    if not _is_initialized() or dist.get_world_size() == 1:
        return t
    staged = (
        t.to(torch.device("cuda", torch.cuda.current_device())) if _needs_cuda_staging(t) else t
    )
    world = dist.get_world_size()
    count = torch.tensor([staged.shape[0]], device=staged.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    if max(sizes) == 0:
        return t
    # all_gather needs one shape on every rank: pad to the longest, then cut each part back.
    padded = staged.new_zeros((max(sizes), *staged.shape[1:]))
    padded[: staged.shape[0]] = staged
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)]).to(t.device)


def barrier() -> None:
    """Wait until every process reaches this point (no-op in a single process)."""
    if _is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group if one was created."""
    if _is_initialized():
        dist.destroy_process_group()
