"""LoRA (Hu et al. 2021), the baseline: ΔW = (alpha / r) · B A, A [r, in] random, B [out, r] zeros.

Newer layer kinds, the same rules as AOFT's (aoft.py): W + ΔW per linear map merges exactly anywhere and needs no
bias; default targets q and v reach Eva's separate q_proj / v_proj (never the bias-free k_proj) or the q / v row
blocks of a fused qkv, including one whose biases are the attention's q_bias / v_bias (ΔW is served through the
wrapper's ``weight``, which timm's attention reads itself); target fc1 adapts SwiGLU's fc1_x and fc1_g, or each
half of a packed fc1 with its own (A, B).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import UsageError
from .base import LowRankLinear, TargetedConfig, TargetedMethod, row_slices
from .registry import Note


@dataclass
class LoRAConfig(TargetedConfig):
    """LoRA hyper-parameters. r: rank; alpha: scaling numerator (ΔW scaled by alpha / r)."""

    method: ClassVar[str] = "lora"
    default_targets: ClassVar[tuple[str, ...]] = ("q", "v")

    r: int = 8
    alpha: float = 8.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.r, int) and self.r >= 1):
            raise UsageError(f"lora r: must be a positive integer, got {self.r!r}")
        if not math.isfinite(self.alpha) or self.alpha == 0:
            raise UsageError(f"lora alpha: must be finite and non-zero, got {self.alpha!r}")


class LoRALinear(LowRankLinear):
    def __init__(self, base_layer: nn.Linear, name: str, groups: int, slices: tuple[int, ...], r: int, alpha: float):
        super().__init__(base_layer, name, groups, slices)
        if r > min(self.slice_out, self.in_features):
            raise UsageError(
                f"lora r={r} exceeds the size of {name} ({self.slice_out}x{self.in_features})",
                f"use a smaller rank (--rank; at most {min(self.slice_out, self.in_features)} for this layer)",
            )
        self.scaling = alpha / r
        s = len(self.slices)
        self.lora_A = nn.Parameter(torch.empty(s, r, self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(s, self.slice_out, r))
        # A like nn.Linear's default init (kaiming-uniform, a=√5 → bound 1/√in); B = 0 so ΔW = 0 at start.
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound)

    def slice_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_B * self.scaling, self.lora_A


class LoRA(TargetedMethod[LoRAConfig]):
    """LoRA on row slices (q, v by default) or whole layers; merges as W + ΔW, so any site merges exactly."""

    name = "lora"
    config_class = LoRAConfig
    description = "low-rank update (alpha/r) B A (Hu et al. 2021), the reference baseline"
    cli_options = {"rank": "r", "alpha": "alpha", "targets": "targets"}
    no_decay = frozenset()  # A and B are weight matrices: they decay, like the head's weight

    def wrap_linear(self, site, base: nn.Linear, config: LoRAConfig, targets: set[str], note: Note):
        rows = row_slices(site, targets)
        if rows is None:
            return None
        return LoRALinear(base, site.path, rows[0], rows[1], r=config.r, alpha=config.alpha)
