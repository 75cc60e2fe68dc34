"""Shared fixtures: tiny real timm models (random weights, built with timm kwargs) and real images."""

from __future__ import annotations

import os

import pytest
import torch

# Keep the suite deterministic and within 2 cores.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Tiny members of each supported family: plain ViT, DINOv2-style ViT (LayerScale + register tokens), Swin v1.
TINY_MODELS = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, depth=2)),
    "vit_ls_reg": ("vit_small_patch14_reg4_dinov2", dict(img_size=28, depth=2, embed_dim=64, num_heads=2,
                                                          init_values=0.1)),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=64, window_size=4, embed_dim=24, depths=(1, 1, 1),
                                                  num_heads=(1, 2, 2))),
}
NUM_CLASSES = 5


def make_tiny(family: str, seed: int = 0, num_classes: int = NUM_CLASSES):
    import timm

    name, kw = TINY_MODELS[family]
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, exportable=True, **kw).eval()


def tiny_data_cfg(family: str) -> dict:
    s = TINY_MODELS[family][1]["img_size"]
    return {"input_size": (3, s, s), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225), "crop_pct": 1.0}


def real_batch(family: str, n: int = 6, seed: int = 0) -> torch.Tensor:
    """n REAL images (the registry-shipped photos and digits) preprocessed for the tiny model."""
    from peftx.data import real_images

    return real_images(n, tiny_data_cfg(family), seed=seed)


def perturb_adapter(model, std: float = 0.2, seed: int = 1) -> None:
    """Make every trainable tensor non-trivial (zero-initialised λ / LoRA B / head would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)
