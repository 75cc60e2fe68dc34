"""SSF scale/shift (Lian et al. 2022), used by RLRR on the patch embedding and LayerNorm outputs.

y = base(x) * γ + β over the channel (last) dimension. ``base`` is a LayerNorm (folds into its affine) or an Identity
sitting in timm's ``patch_embed.norm`` slot, i.e. on the patch tokens before the cls token and position embedding
(folds into the patch conv, done by the model-level merge because the conv is not owned here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import _check_finite


class SSF(nn.Module):
    def __init__(self, base: nn.Module, dim: int, name: str, init_std: float = 0.02):
        super().__init__()
        if not isinstance(base, (nn.LayerNorm, nn.Identity)):
            raise TypeError(f"{name}: SSF wraps a LayerNorm or Identity, got {type(base).__name__}")
        if isinstance(base, nn.LayerNorm) and (base.weight is None or base.bias is None):
            # Folding needs an affine to fold into; adding one would change the timm state dict.
            raise TypeError(f"{name}: LayerNorm without affine weight and bias cannot absorb SSF")
        self.base = base
        self.layer_name = name
        # Official init: γ ~ N(1, 0.02), β ~ N(0, 0.02).
        self.ssf_scale = nn.Parameter(torch.empty(dim).normal_(1.0, init_std))
        self.ssf_shift = nn.Parameter(torch.empty(dim).normal_(0.0, init_std))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        if self.merged:
            return base(x)
        if isinstance(base, nn.LayerNorm):
            # LayerNorm with the folded affine (the merge's own fold): the same y*γ+β without two extra
            # elementwise passes over the activations, forward and backward.
            w, b = fold_affine(base.weight, base.bias, self.ssf_scale, self.ssf_shift)
            return F.layer_norm(x, base.normalized_shape, w, b, base.eps)
        return torch.addcmul(self.ssf_shift, base(x), self.ssf_scale)

    @torch.no_grad()
    def folded_affine(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold γ, β into a per-output-channel affine (w, b) in float64. Leading dim = channel."""
        w, b = fold_affine(weight.double(), bias.double(), self.ssf_scale.double(), self.ssf_shift.double())
        w, b = w.to(weight.dtype), b.to(bias.dtype)
        _check_finite(self.layer_name, w, b)
        return w, b

    @torch.no_grad()
    def unfolded_affine(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g, s = self.ssf_scale.double(), self.ssf_shift.double()
        if (g.abs() < 1e-12).any():
            raise ZeroDivisionError(f"{self.layer_name}: an SSF scale is zero, the fold cannot be undone")
        shape = (-1,) + (1,) * (weight.dim() - 1)
        w = (weight.double() / g.view(shape)).to(weight.dtype)
        b = ((bias.double() - s) / g).to(bias.dtype)
        return w, b


def fold_affine(weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor,
                shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """THE one place SSF is defined: (x*w + b)*γ + β = x*(w γ) + (b γ + β), γ/β over ``weight``'s leading dim.

    Used by the training forward (LayerNorm case) and by the merge, so they cannot disagree.
    """
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return weight * scale.view(shape), torch.addcmul(shift, bias, scale)
