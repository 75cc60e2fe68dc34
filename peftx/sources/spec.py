"""The plain backbone a recorded spec describes (an adapter record's ``spec``: timm name, weights file, image size,
model kwargs, and the seed of a random-init backbone)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backbones import create_backbone
from ..errors import AdapterFileError, UsageError


def recorded_int(record: dict[str, Any], key: str, default: int | None = None) -> int | None:
    """An integer field of the adapter's JSON record; a damaged value is a damaged adapter file, not a crash."""
    value = record.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise AdapterFileError(
            f"the adapter record's {key} is {value!r}, not an integer",
            "the adapter JSON was edited or damaged: restore it from the run directory",
        )
    return value


def required_int(record: dict[str, Any], key: str, default: int | None = None) -> int:
    """:func:`recorded_int` for a field the model cannot be rebuilt without (absent and no default: damaged)."""
    value = recorded_int(record, key, default)
    if value is None:
        raise AdapterFileError(
            f"the adapter record's {key} is missing",
            "the adapter JSON was edited or damaged: restore it from the run directory",
        )
    return value


def rebuild_model(config: dict[str, Any], *, weights: str | Path | None = None) -> nn.Module:
    """The plain backbone an adapter file's ``spec`` describes (``weights`` overrides the recorded file)."""
    spec = dict(config.get("spec") or {})
    if not spec.get("name"):
        raise UsageError(
            "the adapter does not record its backbone (no spec.name)",
            "it was not written by peftx train; load it with load_adapter onto your own model",
        )
    pretrained = bool(spec.get("pretrained", True))
    init_seed = recorded_int(spec, "init_seed")
    if not pretrained and init_seed is not None:
        torch.manual_seed(init_seed)  # a random-init backbone is rebuilt from the seed it was made with
    return create_backbone(
        spec["name"],
        num_classes=required_int(config, "num_classes"),
        weights=weights or (spec.get("weights") if pretrained else None),
        pretrained=pretrained,
        img_size=spec.get("img_size"),
        **(spec.get("model_kwargs") or {}),
    )


__all__ = ["rebuild_model", "recorded_int", "required_int"]
