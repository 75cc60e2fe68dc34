"""What an adapter does to a model: adapted layers and trainable / total parameter counts (``peftx inspect``)."""

from __future__ import annotations

from typing import Any

import torch

from .adapter import adapt, adapted_layers, count_parameters, state_of
from .backbones import create_backbone
from .methods import make_config


def inspect_model(
    model_name: str,
    method: str,
    *,
    num_classes: int = 10,
    img_size: int | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build ``model_name`` (random weights: structure is all that counts) with the adapter and describe it."""
    config = make_config(method, **(options or {}))
    with torch.random.fork_rng():
        model = create_backbone(model_name, num_classes=num_classes, pretrained=False, img_size=img_size)
    adapt(model, config)
    trainable, total = count_parameters(model)
    heads = state_of(model).layout.heads
    head_params = sum(p.numel() for h in heads for p in model.get_submodule(h).parameters())
    return {
        "model": model_name,
        "family": state_of(model).layout.family,
        "method": method,
        "config": config.to_dict(),
        "num_classes": num_classes,
        "trainable_params": trainable,
        "adapter_params": trainable - head_params,
        "head_params": head_params,
        "total_params": total,
        "trainable_fraction": trainable / total,
        "adapted_layers": adapted_layers(model),
        "notes": list(state_of(model).notes),
    }
