"""Small tensor checks shared by merge, adapter loading and weight loading."""

from __future__ import annotations

import torch


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` holds no NaN/Inf. max|t| propagates both, and is several times faster than
    ``isfinite(t).all()`` on CPU builds of torch (no full-size boolean temporary)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    return bool(torch.isfinite(t.detach().abs().amax()))
