"""Shared pieces of every adapter method: config base classes and the wrapper base classes.

An adapter layer WRAPS the frozen layer (never copies it). Each method defines its weight delta in exactly one
function; forward, merge and unmerge all go through it, so they cannot disagree.

Merging is planned before anything is written: a wrapper's ``merge_plan`` / ``unmerge_plan`` / ``unload_plan``
return (destination tensor, new value) pairs computed from ``value(t)``, the value ``t`` will hold once the earlier
entries of the plan are written, and checked finite. The model-level functions (adapter.py) collect every wrapper's
plan, check it, and only then write, so a refused merge or unload leaves the model exactly as it was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import all_finite
from ..errors import ExportError, NonFiniteError, UsageError
from ..tolerances import LSTSQ_FOLD_REL
from .registry import Method

# Logical targets a user can name. q/k/v are row slices of timm's fused qkv Linear.
QKV_SLICES = ("q", "k", "v")
ALL_TARGETS = ("q", "k", "v", "qkv", "proj", "fc1", "fc2", "reduction")

Plan = list[tuple[torch.Tensor, torch.Tensor]]
Value = Callable[[torch.Tensor], torch.Tensor]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass
class AdapterConfig:
    """Base of every method's config. Subclasses set ``method`` and add their hyper-parameters as fields."""

    method: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {"method": self.method, **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields - {"method"}
        if unknown:
            raise UsageError(
                f"{cls.method} config: unknown field(s) {sorted(unknown)}",
                f"valid fields: {', '.join(sorted(fields)) or 'none'}",
            )
        return cls(**{k: v for k, v in d.items() if k in fields})


@dataclass
class TargetedConfig(AdapterConfig):
    """A method that adapts chosen layer roles (``targets``) of every block."""

    default_targets: ClassVar[tuple[str, ...]] = ()

    # None means the method's default targets, restricted to the layers the model has.
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.targets is not None:
            if not isinstance(self.targets, (list, tuple)) or not all(isinstance(t, str) for t in self.targets):
                raise UsageError(
                    f"targets: expected a list of layer roles, got {self.targets!r}",
                    f"choose from {', '.join(ALL_TARGETS)}",
                )
            self.targets = tuple(self.targets)
            bad = [t for t in self.targets if t not in ALL_TARGETS]
            if bad:
                raise UsageError(f"targets: unknown target(s) {bad}", f"choose from {', '.join(ALL_TARGETS)}")
            if not self.targets:
                raise UsageError("targets: empty list", "name at least one layer role or leave the default")
            if "qkv" in self.targets and set(self.targets) & set(QKV_SLICES):
                raise UsageError(
                    "targets: 'qkv' together with q/k/v slices", "name either the fused 'qkv' or its slices q, k, v"
                )


def resolve_targets(config: TargetedConfig, layout: Any) -> set[str]:
    """The roles ``config`` adapts on a model with ``layout`` (named targets must exist there)."""
    if config.targets is None:
        return set(config.default_targets)
    wanted = set(config.targets)
    roles = {("qkv" if t in QKV_SLICES else t) for t in wanted}
    missing = sorted(roles - layout.roles)
    if missing:
        raise UsageError(
            f"target(s) {missing} match no layer of this {layout.family} model",
            f"this model has: {', '.join(sorted(layout.roles | set(QKV_SLICES)))}",
        )
    return wanted


TargetedConfigT = TypeVar("TargetedConfigT", bound=TargetedConfig)


class TargetedMethod(Method[TargetedConfigT]):
    """A method whose config is a :class:`TargetedConfig`: it adapts the layer roles the config names."""

    def resolve_targets(self, config: TargetedConfigT, layout: Any) -> set[str]:
        return resolve_targets(config, layout)


def row_slices(site: Any, targets: set[str]) -> tuple[int, tuple[int, ...]] | None:
    """(groups, adapted row blocks) of a layer for a slice-aware method (LoRA, AOFT), None to leave it alone.

    A fused qkv: the q / k / v row blocks the targets name, or the whole layer for target "qkv". A separate q / k / v
    projection (Eva with qkv_fused=False): the whole layer when its slice or "qkv" is a target, so a model with
    separate projections trains what the fused one would. Any other targeted layer: one factor pair per row group
    (a packed SwiGLU fc1 has two, x and gate, so it trains what the split fc1_x / fc1_g pair would).
    """
    if site.role == "qkv" and site.part is not None:
        return (1, (0,)) if "qkv" in targets or QKV_SLICES[site.part] in targets else None
    if site.role == "qkv" and "qkv" not in targets:
        slices = tuple(i for i, n in enumerate(QKV_SLICES) if n in targets)
        return (site.row_groups, slices) if slices else None
    if site.role not in targets:
        return None
    if site.role == "qkv":
        return (1, (0,))
    return (site.row_groups, tuple(range(site.row_groups)))


def _check_finite(name: str, *tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is not None and not all_finite(t):
            raise NonFiniteError(
                f"merging {name} gives non-finite weights; no weight was changed",
                "the adapter holds NaN/Inf or extreme values: retrain or load a clean checkpoint",
            )


def fold_shift_into_norm(
    norm_bias: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, where: str
) -> torch.Tensor:
    """New LayerNorm bias β' with W β' = W β + shift: moves the bias of a bias-free Linear into the LayerNorm that
    feeds it.

    Exact when W [out, in] has full row rank (out <= in; Swin's reduction is 2C x 4C). Solved in float64 with the
    min-norm least-squares solution; refused if the residual is above FP32 rounding. Solved on the CPU whatever the
    model's device: CUDA's lstsq has only the 'gels' driver, which needs a tall full-rank matrix (this one is wide).
    """
    w = weight.detach().to("cpu", torch.float64)
    s = shift.detach().to("cpu", torch.float64)
    delta = torch.linalg.lstsq(w, s.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    resid = (w @ delta - s).norm().item()
    if resid > LSTSQ_FOLD_REL * max(s.norm().item(), 1e-30):
        raise ExportError(
            f"{where}: the bias shift cannot be folded into the preceding LayerNorm "
            f"(residual {resid:.2e}); nothing was changed",
            "its merged weight lost full row rank: retrain, or adapt without this layer (--targets)",
        )
    return (norm_bias.double() + delta.to(norm_bias.device)).to(norm_bias.dtype)


def has_full_row_rank(weight: torch.Tensor) -> bool:
    """W [out, in] has rank out (W Wᵀ positive definite, float64 Cholesky): the condition for an exact norm fold."""
    w = weight.detach().double()
    return w.shape[0] <= w.shape[1] and torch.linalg.cholesky_ex(w @ w.T).info.item() == 0


class AdapterModule(nn.Module):
    """A trainable wrapper around one frozen layer, stored under the attribute :attr:`inner_name`.

    ``note``: what the wrapper leaves out because it would not merge exactly into the plain model (None: nothing).
    """

    inner_name: ClassVar[str] = "base_layer"

    def __init__(self, name: str):
        super().__init__()
        self.layer_name = name
        self.merged = False
        self.note: str | None = None

    @property
    def inner(self) -> nn.Module:
        return getattr(self, self.inner_name)

    def own_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The wrapper's own (trainable) parameters, not those of the frozen layer it wraps."""
        skip = self.inner_name + "."
        return [(n, p) for n, p in self.named_parameters() if not n.startswith(skip)]

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.own_parameters()]

    def merge_plan(self, model: nn.Module | None, value: Value = _same) -> Plan:
        """Tensors to write so the frozen tensors compute what the adapter does (the wrapper stays, merged)."""
        raise NotImplementedError

    def unmerge_plan(self, model: nn.Module | None, value: Value = _same) -> Plan:
        """Inverse of :meth:`merge_plan`."""
        raise NotImplementedError

    def unload_plan(self, model: nn.Module, value: Value = _same) -> Plan:
        """Further tensors to write when the (merged) wrapper is removed; ``value`` gives the merged tensors."""
        return []

    def _apply_plan(self, plan: Plan) -> None:
        with torch.no_grad():
            for dst, val in plan:
                dst.copy_(val)


class AdapterLinear(AdapterModule):
    """An ``nn.Linear`` wrapped with a trainable weight update.

    Subclasses implement :meth:`merge_weight` / :meth:`unmerge_weight` from their single delta function, and may
    override :meth:`bias_delta` (an additive bias update). ``fold_norm``: for a bias-free base layer with a bias
    delta, the path of the LayerNorm right before it, into whose bias the delta moves when the wrapper is unloaded.
    """

    inner_name = "base_layer"

    def __init__(self, base_layer: nn.Linear, name: str, fold_norm: str | None = None):
        super().__init__(name)
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"{name}: expected nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.fold_norm = fold_norm

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

    @property
    def weight(self) -> torch.Tensor:
        """The adapted weight W + ΔW (the frozen weight once merged), differentiable.

        For the attention modules that read ``qkv.weight`` themselves instead of calling the layer (Eva, BEiT and Swin
        V2 with separate q_bias / v_bias: ``F.linear(x, qkv.weight, cat(q_bias, 0, v_bias))``); a layer that is
        called goes through :meth:`forward`, which computes the same thing.
        """
        if self.merged:
            return self.base_layer.weight
        return self.merge_weight(self.base_layer.weight)

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
        # A bias delta on a bias-free base layer (Swin's PatchMerging reduction) cannot live in base_layer; it moves
        # into the preceding LayerNorm only when the wrapper is unloaded.
        db = self.bias_delta()
        if db is not None and self.base_layer.bias is None:
            out = out + db.to(out.dtype)
        return out

    @torch.no_grad()
    def merged_tensors(self, value: Value = _same) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W_m, b_m) computed without touching the base layer; float64 math, base dtype out. Refuses NaN/Inf."""
        w = value(self.base_layer.weight)
        wm = self.merge_weight(w.double()).to(w.dtype)
        base_bias, db = self.base_layer.bias, self.bias_delta()
        b = None if base_bias is None else value(base_bias)
        bm = None if b is None else (b if db is None else (b.double() + db.double()).to(b.dtype))
        _check_finite(self.layer_name, wm, bm)
        return wm, bm

    def merge_plan(self, model: nn.Module | None, value: Value = _same) -> Plan:
        wm, bm = self.merged_tensors(value)
        plan = [(self.base_layer.weight, wm)]
        if bm is not None:
            plan.append((self.base_layer.bias, bm))
        return plan

    @torch.no_grad()
    def unmerge_plan(self, model: nn.Module | None, value: Value = _same) -> Plan:
        w = value(self.base_layer.weight)
        wu = self.unmerge_weight(w.double()).to(w.dtype)
        b, db = self.base_layer.bias, self.bias_delta()
        bu = None if (b is None or db is None) else (value(b).double() - db.double()).to(b.dtype)
        _check_finite(self.layer_name, wu, bu)
        plan = [(self.base_layer.weight, wu)]
        if bu is not None:
            plan.append((self.base_layer.bias, bu))
        return plan

    @torch.no_grad()
    def unload_plan(self, model: nn.Module, value: Value = _same) -> Plan:
        db = self.bias_delta()
        if db is None or self.base_layer.bias is not None:
            return []
        if self.fold_norm is None:  # the method must not create a bias delta it cannot place
            raise ExportError(f"{self.layer_name} has a bias shift but neither a bias nor a LayerNorm to fold it into")
        norm = model.get_submodule(self.fold_norm)
        new_bias = fold_shift_into_norm(value(norm.bias), value(self.base_layer.weight), db, self.layer_name)
        _check_finite(self.fold_norm, new_bias)
        return [(norm.bias, new_bias)]

    @torch.no_grad()
    def merge(self) -> None:
        """Merge this layer alone (the model-level :func:`peftx.adapter.merge` is what models use)."""
        if not self.merged:
            self._apply_plan(self.merge_plan(None))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._apply_plan(self.unmerge_plan(None))
            self.merged = False


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
            full[g * self.slice_out : (g + 1) * self.slice_out, i * r : (i + 1) * r] = u[i]
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
