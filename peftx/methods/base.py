"""Shared pieces of every adapter method: the config base class and the wrapped-linear base classes.

An adapter layer WRAPS the frozen ``base_layer`` (never copies it). Each method defines its weight delta in exactly
one function; forward, merge and unmerge all go through it, so they cannot disagree.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import all_finite
from ..errors import NonFiniteError, UsageError

# Logical targets a user can name. q/k/v are row slices of timm's fused qkv Linear.
QKV_SLICES = ("q", "k", "v")
ALL_TARGETS = ("q", "k", "v", "qkv", "proj", "fc1", "fc2", "reduction")


@dataclass
class AdapterConfig:
    """Base of every method's config. Subclasses set ``method`` and add their hyper-parameters."""

    method: ClassVar[str] = ""
    default_targets: ClassVar[tuple[str, ...]] = ()

    # None means the method's default targets, restricted to the layers the model has.
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.targets is not None:
            self.targets = tuple(self.targets)
            bad = [t for t in self.targets if t not in ALL_TARGETS]
            if bad:
                raise UsageError(f"targets: unknown target(s) {bad}", f"choose from {', '.join(ALL_TARGETS)}")
            if not self.targets:
                raise UsageError("targets: empty list", "name at least one layer role or leave the default")
            if "qkv" in self.targets and set(self.targets) & set(QKV_SLICES):
                raise UsageError("targets: 'qkv' together with q/k/v slices",
                                 "name either the fused 'qkv' or its slices q, k, v")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets) if self.targets is not None else None
        return {"method": self.method, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AdapterConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields - {"method"}
        if unknown:
            raise UsageError(f"{cls.method} config: unknown field(s) {sorted(unknown)}",
                             f"valid fields: {', '.join(sorted(fields))}")
        return cls(**{k: v for k, v in d.items() if k in fields})


def _check_finite(name: str, *tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is not None and not all_finite(t):
            raise NonFiniteError(f"merging {name} gives non-finite weights; no weight was changed",
                                 "the adapter holds NaN/Inf or extreme values: retrain or load a clean checkpoint")


class AdapterLinear(nn.Module):
    """An ``nn.Linear`` wrapped with a trainable weight update.

    ``groups`` splits the output rows into equal blocks (3 for timm's fused qkv: q, k, v).
    Subclasses implement :meth:`merge_weight` / :meth:`unmerge_weight` from their single delta function, and may
    override :meth:`bias_delta` (an additive bias update).
    """

    def __init__(self, base_layer: nn.Linear, name: str):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"{name}: expected nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.layer_name = name
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    # -- the method's delta (one place) ------------------------------------------------------------------------------
    def merge_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W -> W + ΔW(W). Differentiable; used by forward (unmerged) and by merge."""
        raise NotImplementedError

    def unmerge_weight(self, merged: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`merge_weight`."""
        raise NotImplementedError

    def bias_delta(self) -> torch.Tensor | None:
        return None

    # -- forward / merge --------------------------------------------------------------------------------------------
    def effective_bias(self) -> torch.Tensor | None:
        b, db = self.base_layer.bias, self.bias_delta()
        if db is None:
            return b
        return db if b is None else b + db

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self._merged_forward(x)
        return F.linear(x, self.merge_weight(self.base_layer.weight), self.effective_bias())

    def _merged_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        # A bias delta on a bias-free base layer (Swin's PatchMerging reduction) cannot live in base_layer.
        db = self.bias_delta()
        if db is not None and self.base_layer.bias is None:
            out = out + db.to(out.dtype)
        return out

    @torch.no_grad()
    def merged_tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W_m, b_m) computed without touching the base layer; float64 math, base dtype out. Refuses NaN/Inf."""
        w = self.base_layer.weight
        wm = self.merge_weight(w.double()).to(w.dtype)
        b, db = self.base_layer.bias, self.bias_delta()
        bm = None if b is None else (b if db is None else (b.double() + db.double()).to(b.dtype))
        _check_finite(self.layer_name, wm, bm)
        return wm, bm

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        wm, bm = self.merged_tensors()
        self.base_layer.weight.copy_(wm)
        if bm is not None:
            self.base_layer.bias.copy_(bm)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base_layer.weight
        wu = self.unmerge_weight(w.double()).to(w.dtype)
        b, db = self.base_layer.bias, self.bias_delta()
        bu = None if (b is None or db is None) else (b.double() - db.double()).to(b.dtype)
        _check_finite(self.layer_name, wu, bu)
        w.copy_(wu)
        if bu is not None:
            b.copy_(bu)
        self.merged = False

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("base_layer.")]


class LowRankLinear(AdapterLinear):
    """Additive low-rank update ΔW = U V on selected row blocks ("slices") of the weight.

    ``slices`` lists which of ``groups`` equal row blocks are adapted (e.g. q and v of a fused qkv: groups=3,
    slices=(0, 2)); a plain target is groups=1, slices=(0,). Subclasses implement :meth:`slice_factors`, the ONE
    function that defines the method's delta.
    """

    def __init__(self, base_layer: nn.Linear, name: str, groups: int, slices: tuple[int, ...]):
        super().__init__(base_layer, name)
        if base_layer.out_features % groups:
            raise ValueError(f"{name}: out_features {base_layer.out_features} not divisible by {groups} groups")
        self.groups = groups
        self.slices = tuple(slices)
        self.slice_out = base_layer.out_features // groups

    def slice_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """U [S, slice_out, r] and V [S, r, in] with ΔW_slice_s = U[s] @ V[s]."""
        raise NotImplementedError

    def factors(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-size factors U [out, S*r], V [S*r, in] with ΔW = U @ V (zeros on rows of un-adapted slices)."""
        u, v = self.slice_factors()
        if dtype is not None:
            u, v = u.to(dtype), v.to(dtype)
        s_count, _, r = u.shape
        if self.groups == 1:
            return u[0], v[0]
        full = u.new_zeros(self.out_features, s_count * r)
        for i, g in enumerate(self.slices):
            full[g * self.slice_out:(g + 1) * self.slice_out, i * r:(i + 1) * r] = u[i]
        return full, v.reshape(s_count * r, self.in_features)

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        u, v = self.factors(dtype)
        return u @ v

    def merge_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta_weight(weight.dtype)

    def unmerge_weight(self, merged: torch.Tensor) -> torch.Tensor:
        return merged - self.delta_weight(merged.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self._merged_forward(x)
        # Low-rank path: never materialises ΔW, and skips the dense weight gradient a full update would need.
        # The update is accumulated into the frozen layer's output by the GEMM itself (addmm_, beta = 1): a separate
        # `base + update` would allocate and fill one more [tokens, out] buffer per layer, forward and backward.
        # 2-D throughout so the in-place op is not on a view (autograd would add a CopySlices node).
        u, v = self.factors()
        x2 = x.reshape(-1, self.in_features)
        out = self.base_layer(x2)
        out.addmm_(F.linear(x2, v), u.to(out.dtype).t())
        return out.view(*x.shape[:-1], self.out_features)
