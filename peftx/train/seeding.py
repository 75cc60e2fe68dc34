"""Seeds that are pure functions of (seed, epoch, index) or (seed, step, rank): nothing random is carried from one
step to the next, so a run resumed anywhere draws exactly the random numbers the uninterrupted run draws."""

from __future__ import annotations

import hashlib
import random
import struct
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


def seed_for(*keys: int) -> int:
    """A 63-bit seed that is a pure function of ``keys`` (same in every process, unlike ``hash``)."""
    digest = hashlib.blake2b(struct.pack(f"<{len(keys)}q", *keys), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


class SeededSamples(Dataset):
    """A view whose item ``i`` draws its augmentation randomness from seed_for(seed, epoch, i).

    So augmentation does not depend on worker count, process count or where a run was resumed. Only the CPU
    generator and Python's ``random`` are touched (what torchvision / timm transforms use), and both are restored.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        cpu_state, py_state = torch.get_rng_state(), random.getstate()
        s = seed_for(self.seed, self.epoch, index)
        torch.default_generator.manual_seed(s)
        random.seed(s)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(cpu_state)
            random.setstate(py_state)
