"""RLRR — Residual-based Low-Rank Rescaling (Dong et al., CVPR 2024, arXiv 2403.19067).

Per adapted linear layer with frozen W [out, in] and b [out]::

    W' = W + W ⊙ (s_row s_col^T)        b' = b + f

The frozen W term is the "residual": the layer cannot drift far from the pretrained matrix. On timm ViT's fused qkv,
s_col is three separate [in] vectors (one per q/k/v row block), matching the official per-projection parameters;
Swin shares one s_col across q, k, v (official swin.py). SSF scale/shift on the patch embedding and LayerNorm outputs
is part of the method (see ssf.py, and layout.py for where).

What RLRR cannot merge, and so does not create: the shift f of a layer without a bias, unless a LayerNorm feeds that
layer alone and its W has full row rank (Swin's PatchMerging reduction: f then moves into that LayerNorm's bias,
exactly); the SSF shift on the patch tokens when the patch conv has no bias and the model no position embedding; SSF
on a LayerNorm without an affine. Each such omission is a note in the adapter's record (``peftx inspect`` shows it).

The newer layer kinds (layout.py; the paper's formulas apply per linear map, and the merged model must be the
same timm class, so a bias the class does not have is never added):

* separate q / k / v projections (Eva with qkv_fused=False, EVA-02 B/L): each is its own RLRR layer with its own
  s_row, s_col and f, the official per-projection parameters; the fused qkv of Eva and BEiT keeps one s_col per
  q / k / v block (``col_groups`` 3), Swin V2 one shared s_col (as official Swin).
* a bias-free k (k_proj without bias): no f. It has no bias to take it and norm1 feeds q and v too, so there is no
  exact fold. (Without RoPE or qk-norm a k bias changes no attention output anyway: it adds q·f to every logit of a
  row, and softmax ignores that.)
* q_bias / v_bias attention (Eva, BEiT, Swin V2 with qkv bias): timm computes F.linear(x, qkv.weight,
  cat(q_bias, 0, v_bias)) itself, so the adapted weight is served through the wrapper's ``weight`` and W' is exact,
  but f is not created (the attention would never add it); a note says so.
* a gated MLP: SwiGLU's fc1_x and fc1_g are two RLRR layers (role fc1); timm's packed SwiGLU (GluMlp: fc1 = [x;
  gate] rows) keeps one s_col per half (``col_groups`` 2), so both forms train the same parameters. fc2 as usual.
* RMSNorm (y = x / rms(x) · w, no β): SSF's scale folds into w; the shift has nothing to fold into and is not
  created (a note). Swin V2's post-norm blocks: SSF on norm1 / norm2 outputs folds into their affine as anywhere.
* Swin V2's PatchMerging applies its norm AFTER the bias-free reduction: nothing before it takes f, so no f.
* Swin V2's cpb_mlp (continuous position bias), layer scale (gamma_1 / gamma_2), attention pooling, the DeiT
  distillation token: frozen tensors of the plain model, untouched. DeiT distilled trains both heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..errors import NonFiniteError, UsageError
from .base import AdapterLinear, TargetedConfig, TargetedMethod, has_full_row_rank
from .registry import Note
from .ssf import SSF

INITS = ("kaiming", "normal", "zeros")


@dataclass
class RLRRConfig(TargetedConfig):
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
            raise UsageError("rlrr targets: RLRR adapts the fused qkv as a whole, not its slices", "use target 'qkv'")
        if not self.ssf_init_std >= 0:
            raise UsageError(f"rlrr ssf_init_std: must be >= 0, got {self.ssf_init_std}")


class RLRRLinear(AdapterLinear):
    """W ⊙ (1 + S) with S = s_row s_col^T, s_col per row group (``col_groups`` = 3 for ViT's fused qkv).

    ``bias_shift=False`` leaves f out (a bias-free layer with nowhere to fold it).
    """

    f: nn.Parameter | None  # registered in __init__ (None without bias_shift, so it stays out of the state dict)

    def __init__(
        self,
        base_layer: nn.Linear,
        name: str,
        col_groups: int = 1,
        init: str = "kaiming",
        *,
        bias_shift: bool = True,
        fold_norm: str | None = None,
    ):
        super().__init__(base_layer, name, fold_norm=fold_norm)
        out, inp = base_layer.out_features, base_layer.in_features
        if out % col_groups:
            raise ValueError(f"{name}: out_features {out} not divisible by {col_groups}")
        self.col_groups = col_groups
        self.s_row = nn.Parameter(torch.empty(out))  # official name: scale_line
        self.s_col = nn.Parameter(torch.empty(col_groups, inp))  # official name: scale_col
        # official name: shift_bias
        self.register_parameter("f", nn.Parameter(torch.zeros(out)) if bias_shift else None)
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
        if self.f is not None:
            self.f.zero_()

    def scale_matrix(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """S = s_row s_col^T per row group, [out, in] (unmerge divides by 1 + S)."""
        g = self.col_groups
        r = self.s_row if dtype is None else self.s_row.to(dtype)
        c = self.s_col if dtype is None else self.s_col.to(dtype)
        return (r.view(g, -1, 1) * c.view(g, 1, -1)).reshape(self.out_features, self.in_features)

    def merge_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W' = W + (s_row ⊙_rows W) ⊙_cols s_col. THE one place RLRR's update ΔW = W ⊙ (s_row s_col^T) is defined.

        Never builds S = s_row s_col^T itself (see _rescale).
        """
        return _rescale(weight, self.s_row.to(weight.dtype), self.s_col.to(weight.dtype), self.col_groups)

    def unmerge_weight(self, merged: torch.Tensor) -> torch.Tensor:
        denom = 1.0 + self.scale_matrix(merged.dtype)
        if (denom.abs() < 1e-12).any():
            raise NonFiniteError(
                f"{self.layer_name}: 1 + s_row s_col^T is zero somewhere, the merge cannot be undone",
                "reload the base weights instead of unmerging",
            )
        return merged / denom

    def bias_delta(self) -> torch.Tensor | None:
        return self.f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trains = torch.is_grad_enabled() and (self.s_row.requires_grad or self.s_col.requires_grad)
        if self.merged or not trains or self.base_layer.weight.requires_grad:
            return super().forward(x)
        # Training: the same W' = merge_weight(W), built without autograd, with a hand-derived backward.
        with torch.no_grad():
            w_eff = self.merge_weight(self.base_layer.weight)
        return _RescaledLinear.apply(
            x, w_eff, self.base_layer.weight, self.effective_bias(), self.s_row, self.s_col, self.col_groups
        )


def _rescale(weight: torch.Tensor, r: torch.Tensor, c: torch.Tensor, groups: int) -> torch.Tensor:
    """(W ⊙_rows r) ⊙_cols c + W, i.e. W + W ⊙ (r c^T), with c given per row group: [groups, in].

    Without autograd the one temporary is updated in place: on CPU every fresh [out, in] buffer is a new mmap that
    page-faults on first touch, and that, not the arithmetic, dominated the old W + W * (r c^T) (1 ms vs 0.08 ms for
    ViT-S's qkv; benchmarks/results/profile.md). Both branches do the same float operations in the same order.
    """
    out, inp = weight.shape
    w = weight.view(groups, out // groups, inp)
    cv = c.view(groups, 1, inp)
    rw = w * r.view(groups, -1, 1)
    if torch.is_grad_enabled() and (weight.requires_grad or r.requires_grad or c.requires_grad):
        return (rw * cv + w).view(out, inp)
    return rw.mul_(cv).add_(w).view(out, inp)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class _RescaledLinear(torch.autograd.Function):
    """y = x W'^T + b with W' = W ⊙ (1 + s_row s_col^T), W frozen.

    Autograd through :meth:`RLRRLinear.merge_weight` keeps two dense temporaries per layer alive for backward and
    allocates about six fresh [out, in] buffers per layer and step (products, their gradients, reductions). Here W'
    is built in place under no_grad, the dense weight gradient G = dy^T x is formed once (full fine-tuning forms it
    too), multiplied by W in place and reduced to the two vectors with batched matrix-vector products:
    grad s_row = (G ⊙ W) s_col, grad s_col = (G ⊙ W)^T s_row per row group. Only W' is kept for backward.
    ``tests/test_fast_paths.py`` checks these gradients against autograd through ``merge_weight``, which also
    builds the W' passed in (no_grad), so forward, merge and this path share one definition.

    Mixed precision: the matmuls run in the autocast dtype, the rescale and the reductions in the weight's dtype.
    Once differentiable: a second derivative through this path raises (compute it with the layer in eval / no-grad
    mode on W, or through ``merge_weight``, which autograd differentiates any number of times).
    """

    @staticmethod
    def forward(ctx, x, w_eff, weight, bias, s_row, s_col, groups):  # noqa: D102 (autograd.Function protocol)
        dt = _compute_dtype(x)
        w_eff = w_eff.to(dt)
        xc = x.to(dt)
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(xc, w_eff, None if bias is None else bias.to(dt))
        ctx.save_for_backward(xc, weight, w_eff, s_row, s_col)
        ctx.groups, ctx.x_dtype = groups, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @once_differentiable  # this backward is not itself differentiable: a double backward must raise, not be wrong
    def backward(ctx, gy):  # noqa: D102
        xc, weight, w_eff, s_row, s_col = ctx.saved_tensors
        g = ctx.groups
        out, inp = weight.shape
        gy = gy.to(w_eff.dtype)
        gx = gb = gr = gc = None  # W' is built under no_grad and W is frozen on this path: neither gets one
        if ctx.needs_input_grad[0]:
            gx = (gy @ w_eff).to(ctx.x_dtype)
        gy2 = gy.reshape(-1, out)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
            gb = gy2.sum(0, dtype=torch.promote_types(gy2.dtype, ctx.bias_dtype)).to(ctx.bias_dtype)
        if ctx.needs_input_grad[4] or ctx.needs_input_grad[5]:
            grad_w = (gy2.t() @ xc.reshape(-1, inp)).to(weight.dtype)  # dL/dW', the GEMM full fine-tuning does too
            gr, gc = rescale_vector_grads(grad_w, weight, s_row, s_col, g)
        return gx, None, None, gb, gr, gc, None


def rescale_vector_grads(
    grad_w: torch.Tensor, weight: torch.Tensor, s_row: torch.Tensor, s_col: torch.Tensor, groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/ds_row, dL/ds_col) from dL/dW' (overwritten): (G ⊙ W) s_col and (G ⊙ W)^T s_row per row group."""
    out, inp = weight.shape
    m = grad_w.mul_(weight).view(groups, out // groups, inp)
    r, c = s_row.to(m.dtype).view(groups, 1, -1), s_col.to(m.dtype).view(groups, -1, 1)
    return torch.bmm(m, c).view(out).to(s_row.dtype), torch.bmm(r, m).view(groups, inp).to(s_col.dtype)


class RLRR(TargetedMethod[RLRRConfig]):
    """RLRR on every qkv / proj / fc1 / fc2 / reduction Linear, SSF on the patch tokens and every LayerNorm output."""

    name = "rlrr"
    config_class = RLRRConfig
    description = "residual-based low-rank rescaling W ⊙ (1 + s_row s_colᵀ) + SSF (CVPR 2024)"
    cli_options = {"init": "init", "targets": "targets", "ssf": "ssf", "ssf-init-std": "ssf_init_std"}
    # Per-channel scales and shifts: decaying them pulls W' toward W ⊙ 1 and SSF's scale toward 0, not 1. Official
    # RLRR (timm's optimiser factory) skips every 1-d tensor; s_col is stored [groups, in], so it is named.
    no_decay = frozenset({"s_row", "s_col", "f", "ssf_scale", "ssf_shift"})

    def wrap_linear(self, site, base: nn.Linear, config: RLRRConfig, targets: set[str], note: Note):
        if site.role not in targets:
            return None
        if site.direct_weight:  # timm's attention adds its own q_bias / v_bias: it would never see f
            shift = False
            note(f"{site.path}: no bias shift f (the attention adds its own q_bias / v_bias; the k rows have none)")
        else:
            shift = base.bias is not None or (site.fold_norm is not None and has_full_row_rank(base.weight))
            if not shift:
                note(
                    f"{site.path}: no bias shift f (the layer has no bias, and no LayerNorm it could be folded into "
                    "exactly)"
                )
        return RLRRLinear(
            base,
            site.path,
            col_groups=site.col_groups,
            init=config.init,
            bias_shift=shift,
            fold_norm=site.fold_norm if base.bias is None else None,
        )

    def wrap_norm(self, site, base: nn.Module, config: RLRRConfig, model: nn.Module, note: Note):
        if not config.ssf:
            return None
        if isinstance(base, nn.LayerNorm) and (base.weight is None or base.bias is None):
            note(f"{site.path}: no SSF (a LayerNorm without affine weight and bias has nothing to fold it into)")
            return None
        shift = True
        if not isinstance(base, (nn.LayerNorm, nn.Identity)):  # an RmsNorm: y = x / rms(x) * w, no beta
            if getattr(base, "weight", None) is None:
                note(f"{site.path}: no SSF (an RMSNorm without a weight has nothing to fold it into)")
                return None
            note(f"{site.path}: SSF scale only (an RMSNorm has no bias to take the shift)")
            shift = False
        if site.fold_conv is not None and model.get_submodule(site.fold_conv).bias is None and site.pos_embed is None:
            note(
                f"{site.path}: SSF scale only (the patch conv has no bias and the model no position embedding "
                "to take the shift)"
            )
            shift = False
        return SSF(
            base,
            site.dim,
            site.path,
            init_std=config.ssf_init_std,
            fold_conv=site.fold_conv,
            pos_embed=site.pos_embed,
            pos_offset=site.pos_offset,
            shift=shift,
        )
