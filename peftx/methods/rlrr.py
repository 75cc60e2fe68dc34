"""RLRR — Residual-based Low-Rank Rescaling (Dong et al., CVPR 2024, arXiv 2403.19067).

Per adapted linear layer with frozen W [out, in] and b [out]::

    W' = W + W ⊙ (s_row s_col^T)        b' = b + f

The frozen W term is the "residual": the layer cannot drift far from the pretrained matrix. On timm ViT's fused qkv,
s_col is three separate [in] vectors (one per q/k/v row block), matching the official per-projection parameters;
Swin shares one s_col across q, k, v (official swin.py). SSF scale/shift on the patch embedding and LayerNorm outputs
is part of the method (see ssf.py and targets.py for where).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import NonFiniteError, UsageError
from .base import AdapterConfig, AdapterLinear

INITS = ("kaiming", "normal", "zeros")


@dataclass
class RLRRConfig(AdapterConfig):
    """RLRR hyper-parameters.

    init: "kaiming" (official: s_row ~ U(±√6), s_col ~ U(±√(6/in)), ||ΔW||/||W|| ≈ 0.07 at start, best in the
        paper's Table 10), "normal" (N(0, 0.02) both), "zeros" (ΔW = 0; both vectors then get zero gradient except
        through f, kept for ablations).
    ssf: train SSF scale/shift on the patch embedding and LayerNorm outputs (official: yes).
    ssf_init_std: std of the SSF init N(1, std) / N(0, std).
    """

    method: ClassVar[str] = "rlrr"
    default_targets: ClassVar[tuple[str, ...]] = ("qkv", "proj", "fc1", "fc2", "reduction")

    init: str = "kaiming"
    ssf: bool = True
    ssf_init_std: float = 0.02

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init not in INITS:
            raise UsageError(f"rlrr init: unknown value {self.init!r}", f"choose from {', '.join(INITS)}")
        if self.targets is not None and set(self.targets) & {"q", "k", "v"}:
            raise UsageError("rlrr targets: RLRR adapts the fused qkv as a whole, not its slices",
                             "use target 'qkv'")
        if not self.ssf_init_std >= 0:
            raise UsageError(f"rlrr ssf_init_std: must be >= 0, got {self.ssf_init_std}")


class RLRRLinear(AdapterLinear):
    """W ⊙ (1 + S) with S = s_row s_col^T, s_col per row group (``col_groups`` = 3 for ViT's fused qkv)."""

    def __init__(self, base_layer: nn.Linear, name: str, col_groups: int = 1, init: str = "kaiming"):
        super().__init__(base_layer, name)
        out, inp = base_layer.out_features, base_layer.in_features
        if out % col_groups:
            raise ValueError(f"{name}: out_features {out} not divisible by {col_groups}")
        self.col_groups = col_groups
        self.s_row = nn.Parameter(torch.empty(out))  # official name: scale_line
        self.s_col = nn.Parameter(torch.empty(col_groups, inp))  # official name: scale_col
        self.f = nn.Parameter(torch.zeros(out))  # official name: shift_bias
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str) -> None:
        if init == "kaiming":  # kaiming-uniform, gain √2: bound √(6 / fan_in), fan_in = 1 for s_row, in for s_col
            self.s_row.uniform_(-math.sqrt(6.0), math.sqrt(6.0))
            b = math.sqrt(6.0 / self.in_features)
            self.s_col.uniform_(-b, b)
        elif init == "normal":
            self.s_row.normal_(0.0, 0.02)
            self.s_col.normal_(0.0, 0.02)
        else:
            self.s_row.zero_()
            self.s_col.zero_()
        self.f.zero_()

    def scale_matrix(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """S = s_row s_col^T per row group, [out, in]. THE one place RLRR's update is defined: ΔW = W ⊙ S."""
        g = self.col_groups
        r = self.s_row if dtype is None else self.s_row.to(dtype)
        c = self.s_col if dtype is None else self.s_col.to(dtype)
        return (r.view(g, -1, 1) * c.view(g, 1, -1)).reshape(self.out_features, self.in_features)

    def merge_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + weight * self.scale_matrix(weight.dtype)

    def unmerge_weight(self, merged: torch.Tensor) -> torch.Tensor:
        denom = 1.0 + self.scale_matrix(merged.dtype)
        if (denom.abs() < 1e-12).any():
            raise NonFiniteError(f"{self.layer_name}: 1 + s_row s_col^T is zero somewhere, the merge cannot be undone",
                                 "reload the base weights instead of unmerging")
        return merged / denom

    def bias_delta(self) -> torch.Tensor:
        return self.f
