"""AOFT — Approximately Orthogonal Fine-Tuning (Yang, ..., Dong et al., ICCV 2025, arXiv 2507.13260), mergeable form.

For W [out, in]::

    ΔW = scale · AO(q_up, d) · diag(λ) · AO(q_down, d)^T      q_up ∈ R^out, q_down ∈ R^in, λ ∈ R^d

AO(q, d) (orthogonal.py) gives d approximately orthonormal columns from ONE vector, so each projection costs D
parameters whatever the rank. No official code is public; choices that are OURS, not the paper's:
- λ ("AOFT*") is always present and initialised to zeros, so ΔW = 0 at start; q_up / q_down start as random unit
  vectors with q0 > 0 (far from the 1 + q0 = 0 pole; see orthogonal.DENOM_EPS for the guard).
- ``scale`` is a fixed multiplier (default 1): AO columns have unit norm, so λ directly carries the magnitude.
- Default targets q and v (row slices of timm's fused qkv), one (q_up, q_down, λ) triple per slice: matches the
  paper's 0.22 M trainable on FGVC for ViT-B with the head. Default rank 8.
- Only the LoRA-form update is implemented: the paper's AOFT-on-Adapter/VPT forms do not merge into dense weights.

Newer layer kinds (the rule is per linear map, W + ΔW, so every site merges exactly and no bias is ever needed):
separate q / k / v projections (Eva qkv_fused=False) are adapted whole when their slice (q, k, v) or "qkv" is a
target: the defaults q, v reach q_proj and v_proj, never the bias-free k_proj; a fused qkv whose biases are the
attention's q_bias / v_bias (Eva, BEiT, Swin V2) gets ΔW through the wrapper's ``weight``, which timm's attention
reads itself; a gated MLP: target fc1 adapts SwiGLU's fc1_x and fc1_g, and gives a packed fc1 ([x; gate] rows)
one (q_up, q_down, λ) triple per half, the same parameters. Norms (LayerNorm, RMSNorm) are not touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import UsageError
from .base import LowRankLinear, TargetedConfig, TargetedMethod, row_slices
from .orthogonal import ao_basis, random_unit_vector
from .registry import Note


@dataclass
class AOFTConfig(TargetedConfig):
    """AOFT hyper-parameters. rank: d, columns taken from each generator; scale: fixed multiplier of ΔW."""

    method: ClassVar[str] = "aoft"
    default_targets: ClassVar[tuple[str, ...]] = ("q", "v")

    rank: int = 8
    scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise UsageError(f"aoft rank: must be a positive integer, got {self.rank!r}")
        if not math.isfinite(self.scale) or self.scale == 0:
            raise UsageError(f"aoft scale: must be finite and non-zero, got {self.scale!r}")


class AOFTLinear(LowRankLinear):
    def __init__(self, base_layer: nn.Linear, name: str, groups: int, slices: tuple[int, ...], rank: int, scale: float):
        super().__init__(base_layer, name, groups, slices)
        if rank > min(self.slice_out, self.in_features):
            raise UsageError(
                f"aoft rank={rank} exceeds the size of {name} ({self.slice_out}x{self.in_features})",
                f"use a smaller rank (--rank; at most {min(self.slice_out, self.in_features)} for this layer)",
            )
        self.rank = rank
        self.scale = scale
        s = len(self.slices)
        self.q_up = nn.Parameter(torch.stack([random_unit_vector(self.slice_out) for _ in range(s)]))
        self.q_down = nn.Parameter(torch.stack([random_unit_vector(self.in_features) for _ in range(s)]))
        self.lam = nn.Parameter(torch.zeros(s, rank))

    def slice_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        # All slices in one batched generator call each for the up and down bases.
        up = ao_basis(self.q_up, self.rank) * (self.scale * self.lam).unsqueeze(-2)  # [S, slice_out, d]
        return up, ao_basis(self.q_down, self.rank).transpose(-1, -2)  # [S, d, in]


class AOFT(TargetedMethod[AOFTConfig]):
    """AOFT on row slices (q, v by default) or whole layers; merges as W + ΔW, so any site merges exactly."""

    name = "aoft"
    config_class = AOFTConfig
    description = "approximately orthogonal low-rank update from one generator vector per side (ICCV 2025)"
    cli_options = {"rank": "rank", "scale": "scale", "targets": "targets"}
    # Generator vectors and the per-rank scales λ: decay would pull q off the unit sphere (the AO columns' norm).
    no_decay = frozenset({"q_up", "q_down", "lam"})

    def wrap_linear(self, site, base: nn.Linear, config: AOFTConfig, targets: set[str], note: Note):
        rows = row_slices(site, targets)
        if rows is None:
            return None
        return AOFTLinear(base, site.path, rows[0], rows[1], rank=config.rank, scale=config.scale)
