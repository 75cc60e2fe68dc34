"""Residual dropout, as in the official RLRR / SSF code: element-wise dropout on each residual-branch output.

timm blocks compute ``x + drop_path1(ls1(attn(norm1(x))))`` and ``x + drop_path2(ls2(mlp(norm2(x))))``; wrapping
``drop_path1`` / ``drop_path2`` therefore drops elements of exactly the residual-branch outputs. The rate grows
linearly with depth, ``linspace(0, p, depth)`` (the first block gets 0), like timm's stochastic-depth schedule, but
drops single elements instead of whole samples. The wrapper keeps the original module (Identity or DropPath) inside,
and :func:`remove_residual_dropout` puts it back, so saved, merged and exported models never contain it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError

SLOTS = ("drop_path1", "drop_path2")


class ResidualDropout(nn.Module):
    """``dropout(inner(x), p)`` in training mode, ``inner(x)`` in eval mode."""

    def __init__(self, inner: nn.Module, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise UsageError(f"dropout: rate {p} is outside [0, 1)", "use a residual dropout rate such as 0.1")
        self.inner = inner
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inner(x)
        return F.dropout(x, self.p, self.training) if self.p > 0 else x

    def extra_repr(self) -> str:
        return f"p={self.p:.4g}"


def depth_rates(p: float, depth: int) -> list[float]:
    """linspace(0, p, depth): the official per-block rates (block 0 never drops)."""
    return [float(v) for v in torch.linspace(0.0, float(p), depth)] if depth > 0 else []


def add_residual_dropout(model: nn.Module, p: float, blocks: Sequence[str]) -> list[float]:
    """Wrap both residual branches of every block in ``blocks`` (module paths, in depth order); returns the rates.

    ``p`` = 0 leaves the model untouched. Refuses a model that already carries the wrappers.
    """
    if p == 0:
        return [0.0] * len(blocks)
    if has_residual_dropout(model):
        raise UsageError("the model already carries residual dropout", "call remove_residual_dropout first")
    rates = depth_rates(p, len(blocks))
    for path, rate in zip(blocks, rates, strict=True):
        block = model.get_submodule(path)
        for slot in SLOTS:
            if not hasattr(block, slot):
                raise UsageError(f"block {path} has no {slot}: residual dropout needs timm ViT / Swin blocks")
            setattr(block, slot, ResidualDropout(getattr(block, slot), rate))
    return rates


def remove_residual_dropout(model: nn.Module) -> int:
    """Restore every wrapped ``drop_path`` module; returns how many wrappers were removed."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, ResidualDropout)]
    for name, m in found:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, m.inner)
    return len(found)


@contextmanager
def residual_dropout_removed(model: nn.Module) -> Iterator[nn.Module]:
    """The model without its wrappers inside the block (to save or merge it), with the same wrappers after."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, ResidualDropout)]
    remove_residual_dropout(model)
    try:
        yield model
    finally:
        for name, m in found:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, m)


def has_residual_dropout(model: nn.Module) -> bool:
    return any(isinstance(m, ResidualDropout) for m in model.modules())


def residual_dropout_rates(model: nn.Module) -> list[float]:
    """The rates of the wrappers, in module order (two per block)."""
    return [m.p for m in model.modules() if isinstance(m, ResidualDropout)]
