"""torch.distributed helpers: launch detection (torchrun's env), process-group set-up, reductions, sharding.

A single process is the degenerate case of every helper here (rank 0 of 1), so the training loop has one code path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .errors import UsageError

_ENV = ("RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # True when this module created the process group (and so must destroy it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in _ENV) and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise UsageError(
            f"environment variable {name}={value!r} is not an integer",
            "launch with torchrun, or unset RANK / WORLD_SIZE / LOCAL_RANK",
        ) from None


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU); a no-op for a single process.

    An already-initialised default group (e.g. a caller that set it up itself) is reused, not re-created.
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), owns_group=False)
    if not launched_by_torchrun():
        return DistInfo()
    if not dist.is_available():
        raise UsageError(
            "WORLD_SIZE > 1 but this torch build has no torch.distributed",
            "run a single process, or install a torch build with distributed support",
        )
    rank, world, local = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank, world, local, owns_group=True)


def shutdown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device, info: DistInfo) -> list[float]:
    """Element-wise sum of ``values`` over ranks, in float64 so counts stay exact."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def any_rank(flag: bool, device: torch.device, info: DistInfo) -> bool:
    """True on every rank if ``flag`` is True on any rank (so all ranks stop at the same step)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


class EpochSampler(Sampler[int]):
    """Training sampler: a permutation that is a pure function of (seed, epoch), cut into global batches.

    Like ``DistributedSampler(seed=...)`` with ``set_epoch``, but sharded *per global batch*: the first
    ``len // batch_size`` full global batches of the permutation are kept (the incomplete one is dropped, as timm
    does), and rank r takes positions r, r + W, r + 2W, ... of it. So each global batch holds the same samples
    whatever the world size, which is what makes a 2-process run equal a 1-process run with the same global batch,
    and ``start_batch`` skips already-trained batches exactly when resuming mid-epoch.
    """

    def __init__(
        self, length: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True
    ):
        if batch_size % world_size:
            raise UsageError(
                f"batch_size: {batch_size} is not divisible by the world size {world_size}",
                "the global batch is split evenly over processes: pick a multiple of the process count",
            )
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch, self.start_batch = 0, 0

    @property
    def batches(self) -> int:
        """Full global batches per epoch."""
        return self.length // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.length))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.length, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self._order()[self.start_batch * self.batch_size : self.batches * self.batch_size]
        return iter(order[self.rank :: self.world_size])

    def __len__(self) -> int:
        return (self.batches - self.start_batch) * (self.batch_size // self.world_size)


class ShardSampler(Sampler[int]):
    """Evaluation sampler: rank r takes indices r, r + W, ... in order; no padding, so summed counts are exact."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
