"""Shared fixtures: tiny real timm models (random weights, built with timm kwargs) and real images."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

# Keep the suite deterministic and within 2 cores.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Tiny members of each supported family: plain ViT, DINOv2-style ViT (LayerScale + register tokens), Swin v1.
TINY_MODELS = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, depth=2)),
    "vit_ls_reg": (
        "vit_small_patch14_reg4_dinov2",
        dict(img_size=28, depth=2, embed_dim=64, num_heads=2, init_values=0.1),
    ),
    "swin": (
        "swin_tiny_patch4_window7_224",
        dict(img_size=64, window_size=4, embed_dim=24, depths=(1, 1, 1), num_heads=(1, 2, 2)),
    ),
}
NUM_CLASSES = 5

# Sites a method may not be able to merge: bias-free Linears, a bias-free patch conv (CLIP-style pre-norm), global
# pooling with fc_norm, DeiT, a Swin without qkv bias. Tiny configs of the real timm classes.
_V = dict(img_size=32, depth=2, embed_dim=64, num_heads=2)
EDGE_MODELS = {
    "vit_no_qkv_bias": ("vit_base_patch16_224_miil", dict(_V)),  # qkv_bias=False in timm's own config
    "vit_no_proj_bias": ("vit_tiny_patch16_224", dict(_V, proj_bias=False)),  # proj, fc1, fc2 without bias
    "vit_norms_no_proj_bias": (
        "vit_tiny_patch16_224",
        dict(_V, proj_bias=False, scale_attn_norm=True, scale_mlp_norm=True),
    ),  # attn.norm / mlp.norm feed them
    "vit_pre_norm": ("vit_tiny_patch16_224", dict(_V, pre_norm=True)),  # norm_pre, patch conv without bias
    "vit_pre_norm_reg": ("vit_tiny_patch16_224", dict(_V, pre_norm=True, reg_tokens=2, no_embed_class=True)),
    "vit_gap_fc_norm": ("vit_tiny_patch16_224", dict(_V, global_pool="avg", fc_norm=True, class_token=False)),
    "vit_gap_240": ("vit_medium_patch16_gap_240", dict(_V, init_values=1.0)),  # no cls token, avg pool, no qkv bias
    "deit": ("deit_tiny_patch16_224", dict(_V)),
    "swin_no_qkv_bias": (
        "swin_tiny_patch4_window7_224",
        dict(img_size=64, window_size=4, embed_dim=24, depths=(1, 1, 1), num_heads=(1, 2, 2), qkv_bias=False),
    ),
}

# The backbones of 2026 (docs/backbones.md): tiny configs of every other timm class peftx adapts, one per variant
# whose layers differ. init_values=1.0: timm's layer-scale init (1e-5 in DINOv3 / RoPE ViTs) would make every adapter
# invisible in random weights.
_F = dict(img_size=32, depth=2, embed_dim=64, num_heads=2)
FAMILY_MODELS = {
    # Eva, fused qkv without any bias, 4 register tokens, RoPE (DINOv3's), no absolute position embedding
    "dinov3": ("vit_small_patch16_dinov3", dict(_F, init_values=1.0)),
    # Eva, qkv with the attention's q_bias / v_bias (k none), split SwiGLU (fc1_g, fc1_x)
    "dinov3_qkvb_swiglu": ("vit_small_plus_patch16_dinov3_qkvb", dict(_F, init_values=1.0)),
    # Eva, q_bias / v_bias, packed SwiGLU (fc1 = [x; gate]), absolute position embedding + RoPE
    "eva02": ("eva02_tiny_patch14_224", dict(_F, img_size=28)),
    # Eva, separate q_proj / k_proj (no bias) / v_proj, split SwiGLU with mlp.norm before fc2
    "eva02_qkv_split": ("eva02_base_patch14_224", dict(_F, img_size=28)),
    # Eva, bias-free patch conv, norm_pre, attention pooling (map)
    "pe_core": ("vit_pe_core_tiny_patch16_384", dict(_F)),
    # Eva with timm's AttentionRope (fused qkv with its own bias), axial RoPE; and mixed (learned) RoPE
    "rope_vit": ("vit_small_patch16_rope_224", dict(_F, init_values=1.0)),
    "rope_vit_mixed": ("vit_small_patch16_rope_mixed_224", dict(_F, init_values=1.0)),
    # the same with RMSNorm everywhere (no beta)
    "rope_vit_rmsnorm": ("vit_small_patch16_rope_224", dict(_F, init_values=1.0, norm_layer="rmsnorm")),
    # Beit: q_bias / v_bias, relative position bias, global pooling with fc_norm
    "beit": ("beitv2_base_patch16_224", dict(_F, init_values=1.0)),
    # SwinTransformerV2: cosine attention, cpb_mlp, post-norm, q_bias / v_bias, PatchMerging reduction then norm
    "swinv2": (
        "swinv2_tiny_window8_256",
        dict(img_size=64, window_size=4, embed_dim=24, depths=(1, 1), num_heads=(1, 2)),
    ),
    # VisionTransformerDistilled: cls + dist tokens, head + head_dist
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(_F)),
}


def tiny_spec(family: str) -> tuple[str, dict]:
    """(timm name, kwargs as timm takes them) of a tiny test model."""
    from functools import partial

    from timm.layers import RmsNorm

    for table in (TINY_MODELS, EDGE_MODELS, FAMILY_MODELS):
        if family in table:
            name, kw = table[family]
            kw = dict(kw)
            if kw.get("norm_layer") == "rmsnorm":
                kw["norm_layer"] = partial(RmsNorm, eps=1e-6)
            return name, kw
    raise KeyError(family)


def make_tiny(family: str, seed: int = 0, num_classes: int = NUM_CLASSES):
    """A tiny random-init timm model. Swin V2's post-norm weights start at 1, not timm's 0 (which zeroes every
    block's branches, so no adapter inside them could change the output)."""
    import timm

    name, kw = tiny_spec(family)
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, exportable=True, **kw).eval()
    if name.startswith("swinv2"):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".norm1.weight" in n or ".norm2.weight" in n:
                    p.fill_(1.0)
    return model


# The bundles built from real photo files: a 32 px center crop (crop_pct 0.9) with ImageNet's mean and std.
CROP_DATA_CONFIG = {
    "input_size": (3, 32, 32),
    "interpolation": "bicubic",
    "crop_pct": 0.9,
    "crop_mode": "center",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
}


def tiny_data_cfg(family: str) -> dict:
    s = tiny_spec(family)[1]["img_size"]
    return {
        "input_size": (3, s, s),
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "crop_pct": 1.0,
    }


def real_batch(family: str, n: int = 6, seed: int = 0) -> torch.Tensor:
    """n REAL images (the registry-shipped photos and digits) preprocessed for the tiny model."""
    from peftx.data import real_images

    return real_images(n, tiny_data_cfg(family), seed=seed)


# A test bundle's usual settings: the tiny model's 5 classes, 8 real images, batch 1:4:8, no TensorRT, no onnxslim.
TINY_BUNDLE = dict(
    class_names=[f"c{i}" for i in range(NUM_CLASSES)],
    provenance={"method": "test"},
    batch=(1, 4, 8),
    precision="fp32",
    tensorrt="off",
    simplify=False,
)


def write_tiny_bundle(out: Path, model, *, family: str = "vit", merged=None, **options: Any):
    """``write_bundle`` of ``model`` (its merged twin: a copy unless given) into ``out`` with :data:`TINY_BUNDLE`'s
    settings and the family's tiny data config and real images; ``options`` override any of them."""
    import copy

    from peftx.exports.bundle import write_bundle

    cfg = options.pop("data_config", None) or tiny_data_cfg(family)
    options = {"input_size": cfg["input_size"], "data_config": cfg, **TINY_BUNDLE, **options}
    if "images" not in options:
        options["images"] = real_batch(family, n=8)
    return write_bundle(model, copy.deepcopy(model) if merged is None else merged, out, **options)


def photo_crops(transform) -> torch.Tensor:
    """8 REAL images: overlapping crops of sklearn's two sample photos, each through ``transform``."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    crops = []
    for photo in load_sample_images().images:
        h, w, _ = photo.shape
        crops += [
            transform(Image.fromarray(photo[i * h // 8 : i * h // 8 + h // 2, i * w // 8 : i * w // 8 + w // 2]))
            for i in range(4)
        ]
    return torch.stack(crops)


def perturb_adapter(model, std: float = 0.2, seed: int = 1) -> None:
    """Make every trainable tensor non-trivial (zero-initialised λ / LoRA B / head would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def plain_reference(plain, model):
    """What ``model`` computes without its adapter: ``plain`` with the adapted model's (trained) head, so a test
    sees the adapter's effect alone. When the head is all the method trains (linear probing) the head IS the adapter,
    and ``plain`` keeps its own."""
    import copy

    from peftx.adapter import state_of, trainable_names

    heads = state_of(model).layout.heads
    ref = copy.deepcopy(plain)
    if any(not n.startswith(tuple(h + "." for h in heads)) for n in trainable_names(model)):
        for head in heads:
            ref.get_submodule(head).load_state_dict(model.get_submodule(head).state_dict())
    return ref


# -- training fixtures: a real, rebuildable tiny-ViT weights file and a real PNG ImageFolder of sklearn digits --------

TINY_ARCH = "vit_tiny_patch16_224"
TINY_KW = dict(depth=2, embed_dim=64, num_heads=2)
TINY_IMG = 32


def write_tiny_weights(path: Path, seed: int = 0) -> Path:
    """A random-init tiny ViT saved as a headless safetensors state dict."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(TINY_ARCH, pretrained=False, num_classes=0, img_size=TINY_IMG, **TINY_KW)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def write_digit_folder(
    root: Path, classes: int | list[str] = 4, per_split: dict[str, int] | None = None, seed: int = 0
) -> Path:
    """ROOT/{train,val,test}/<class>/<i>.png from sklearn's REAL digit images, disjoint across splits.

    ``classes``: a count (folders "0".."N-1") or folder names; class c holds images of digit c % 10.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    names = [str(c) for c in range(classes)] if isinstance(classes, int) else list(classes)
    per_split = per_split or {"train": 12, "val": 6, "test": 6}
    digits = load_digits()
    rng = np.random.default_rng(seed)
    for c, name in enumerate(names):
        idx = rng.permutation(np.flatnonzero(digits.target == c % 10))
        start = 0
        for split, n in per_split.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for j, i in enumerate(idx[start : start + n]):
                pixels = np.clip(np.rint(digits.images[i] * (255 / 16)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).convert("RGB").save(root / split / name / f"{j}.png")
            start += n
    return root


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny_vit.safetensors")


@pytest.fixture(scope="session")
def digit_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digit_folder(tmp_path_factory.mktemp("digits_png"))


def tiny_training() -> dict[str, Any]:
    """TrainConfig fields of a short, seeded CPU run of the tiny ViT (2 epochs, batch 8, no warm-up, no dropout)."""
    return dict(
        model=TINY_ARCH,
        model_kwargs=dict(TINY_KW),
        img_size=TINY_IMG,
        epochs=2,
        batch_size=8,
        lr=1e-2,
        warmup_epochs=0,
        min_lr=1e-5,
        dropout=0.0,
        device="cpu",
        amp="off",
        seed=7,
    )


def tiny_config(weights: Path, output: Path, **kw: Any):
    from peftx.train import TrainConfig

    return TrainConfig(**{**tiny_training(), "weights": str(weights), "output": str(output), **kw})
