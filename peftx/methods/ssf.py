"""SSF scale/shift (Lian et al. 2022), used by RLRR on the patch embedding and LayerNorm outputs.

y = base(x) * γ + β over the channel (last) dimension. ``base`` is a LayerNorm (folds into its affine) or the
Identity in timm's ``patch_embed.norm`` slot, i.e. on the patch tokens before the cls token and position embedding:
γ folds into the patch conv's output channels, β into the conv's bias, or, for a conv without one (CLIP-style
pre-norm ViTs), into the patch rows of the position embedding, which is added to every patch token right after the
conv. Where neither exists the shift is not created (``shift=False``): it could not be merged.

On an RMSNorm (timm ``RmsNorm``: y = x / rms(x) * w, no beta) γ folds into w; there is nothing for β to fold into
(adding a bias would change the timm class's state dict), so RLRR creates the scale only there (``shift=False``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterModule, Plan, Value, _check_finite, _same


class SSF(AdapterModule):
    inner_name = "base"
    ssf_shift: nn.Parameter | None  # registered in __init__ (None without a shift, so it stays out of the state dict)

    def __init__(
        self,
        base: nn.Module,
        dim: int,
        name: str,
        init_std: float = 0.02,
        *,
        fold_conv: str | None = None,
        pos_embed: str | None = None,
        pos_offset: int = 0,
        shift: bool = True,
    ):
        super().__init__(name)
        from timm.layers import RmsNorm

        if not isinstance(base, (nn.LayerNorm, RmsNorm, nn.Identity)):
            raise TypeError(f"{name}: SSF wraps a LayerNorm, RmsNorm or Identity, got {type(base).__name__}")
        if isinstance(base, nn.LayerNorm) and (base.weight is None or base.bias is None):
            # Folding needs an affine to fold into; adding one would change the timm state dict.
            raise TypeError(f"{name}: LayerNorm without affine weight and bias cannot absorb SSF")
        if isinstance(base, RmsNorm) and (base.weight is None or shift):
            raise TypeError(f"{name}: an RmsNorm takes the SSF scale into its weight, and no shift (it has no bias)")
        if isinstance(base, nn.Identity) and fold_conv is None:
            raise TypeError(f"{name}: SSF on an Identity needs the patch conv to fold into")
        self.base = base
        self.fold_conv = fold_conv
        self.pos_embed = pos_embed
        self.pos_offset = pos_offset
        # Official init: γ ~ N(1, 0.02), β ~ N(0, 0.02).
        self.ssf_scale = nn.Parameter(torch.empty(dim).normal_(1.0, init_std))
        self.register_parameter("ssf_shift", nn.Parameter(torch.empty(dim).normal_(0.0, init_std)) if shift else None)

    def _shift(self) -> torch.Tensor:
        return self.ssf_shift if self.ssf_shift is not None else torch.zeros_like(self.ssf_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        if self.merged:
            return base(x)
        if isinstance(base, nn.LayerNorm):
            # LayerNorm with the folded affine (the merge's own fold): the same y*γ+β without two extra
            # elementwise passes over the activations, forward and backward.
            w, b = fold_affine(base.weight, base.bias, self.ssf_scale, self._shift())
            return F.layer_norm(x, base.normalized_shape, w, b, base.eps)
        if self.ssf_shift is None:
            return base(x) * self.ssf_scale
        return torch.addcmul(self.ssf_shift, base(x), self.ssf_scale)

    @torch.no_grad()
    def folded_affine(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold γ, β into a per-output-channel affine (w, b) in float64. Leading dim = channel."""
        w, b = fold_affine(weight.double(), bias.double(), self.ssf_scale.double(), self._shift().double())
        w, b = w.to(weight.dtype), b.to(bias.dtype)
        _check_finite(self.layer_name, w, b)
        return w, b

    @torch.no_grad()
    def unfolded_affine(
        self, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        g, s = self.ssf_scale.double(), self._shift().double()
        if (g.abs() < 1e-12).any():
            raise ZeroDivisionError(f"{self.layer_name}: an SSF scale is zero, the fold cannot be undone")
        shape = (-1,) + (1,) * (weight.dim() - 1)
        w = (weight.double() / g.view(shape)).to(weight.dtype)
        b = None if bias is None else ((bias.double() - s) / g).to(bias.dtype)
        _check_finite(self.layer_name, w, b)
        return w, b

    def _targets(self, model: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(weight and bias (None: none) taking the fold, position embedding taking the shift or None)."""
        if not isinstance(self.base, nn.Identity):  # a LayerNorm, or an RmsNorm (weight only)
            weight, bias = self.base.weight, getattr(self.base, "bias", None)
            assert isinstance(weight, torch.Tensor) and (bias is None or isinstance(bias, torch.Tensor))
            return weight, bias, None
        if model is None:
            raise ValueError(f"{self.layer_name}: folding into the patch conv needs the model")
        assert self.fold_conv is not None  # __init__ requires it for an Identity base
        conv = model.get_submodule(self.fold_conv)
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"{self.layer_name}: {self.fold_conv} is {type(conv).__name__}, not the patch Conv2d")
        pos = model.get_parameter(self.pos_embed) if conv.bias is None and self.pos_embed else None
        return conv.weight, conv.bias, pos

    @torch.no_grad()
    def merge_plan(self, model: nn.Module | None, value: Value = _same) -> Plan:
        weight, bias, pos = self._targets(model)
        if bias is not None:
            w, b = self.folded_affine(value(weight), value(bias))
            return [(weight, w), (bias, b)]
        # An RmsNorm (γ scales its weight, no β), or a bias-free patch conv: γ scales its output channels; β (when
        # there is one) moves to the patch rows of the position embedding.
        w = self.folded_affine(value(weight), torch.zeros_like(self.ssf_scale))[0]
        plan = [(weight, w)]
        if self.ssf_shift is not None:
            assert pos is not None, self.layer_name  # a shift on a bias-free conv lives in the position embedding
            p = value(pos).double().clone()
            p[:, self.pos_offset :] += self.ssf_shift.double()
            p = p.to(pos.dtype)
            _check_finite(self.layer_name, p)
            plan.append((pos, p))
        return plan

    @torch.no_grad()
    def unmerge_plan(self, model: nn.Module | None, value: Value = _same) -> Plan:
        weight, bias, pos = self._targets(model)
        if bias is not None:
            w, b = self.unfolded_affine(value(weight), value(bias))
            assert b is not None  # unfolded from a bias
            return [(weight, w), (bias, b)]
        w = self.unfolded_affine(value(weight), None)[0]
        plan = [(weight, w)]
        if self.ssf_shift is not None:
            assert pos is not None, self.layer_name  # as in merge_plan
            p = value(pos).double().clone()
            p[:, self.pos_offset :] -= self.ssf_shift.double()
            plan.append((pos, p.to(pos.dtype)))
        return plan


def fold_affine(
    weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """THE one place SSF is defined: (x*w + b)*γ + β = x*(w γ) + (b γ + β), γ/β over ``weight``'s leading dim.

    Used by the training forward (LayerNorm case) and by the merge, so they cannot disagree.
    """
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return weight * scale.view(shape), torch.addcmul(shift, bias, scale)
