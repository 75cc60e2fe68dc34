"""Adapter files: ``adapter.safetensors`` (tensors + the config in its metadata) and ``adapter_config.json``.

Nothing is unpickled: safetensors only. Loading checks, before touching the model: the file parses, it is not a
pickle, the base-weight fingerprint and class count match the backbone, the tensor names / shapes / dtypes are
exactly what the adapter needs, and every value is finite.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .adapter import adapt, adapter_state_dict, count_parameters, fingerprint, state_of
from .checks import all_finite
from .errors import AdapterFileError, AdapterMismatchError, NonFiniteError
from .fsutil import atomic_path, write_text_atomic
from .methods import config_from_dict
from .targets import describe

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT = "peftx-adapter"
FORMAT_VERSION = 1
_META_KEY = "peftx_config"


def adapter_config(model: nn.Module, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    st = state_of(model)
    trainable, total = count_parameters(model)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "peftx_version": __version__,
        "method": st.config.method, "config": st.config.to_dict(),
        "base_model": st.spec.get("name"), "spec": st.spec, "family": st.layout.family,
        "num_classes": st.num_classes, "base_fingerprint": st.base_fingerprint,
        "trainable_params": trainable, "total_params": total, **(extra or {}),
    }


def save_adapter(model: nn.Module, directory: str | Path, *, extra: dict[str, Any] | None = None,
                 filename: str = ADAPTER_FILE) -> Path:
    """Write the adapter (atomically) into ``directory``; returns the .safetensors path."""
    directory = Path(directory)
    meta = adapter_config(model, extra)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapter_state_dict(model).items()}
    target = directory / filename
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta)})
    write_text_atomic(directory / CONFIG_FILE, json.dumps(meta, indent=2) + "\n")
    return target


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.exists():
        raise AdapterFileError(f"adapter file not found: {path}",
                               "pass a run directory or an adapter .safetensors file written by peftx")
    return path


def _sniff_pickle(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(8)
    # torch.save writes a zip (PK..) or a raw pickle (protocol marker 0x80): refuse both, never unpickle.
    if head.startswith(b"PK") or head[:1] == b"\x80":
        raise AdapterFileError(f"{path} is a pickle/torch file, not safetensors",
                               "peftx loads adapters only from .safetensors files (no code runs on load)")


def read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, tensors) of an adapter file, validated for format but not yet against a model."""
    path = _resolve(path)
    _sniff_pickle(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt / truncated headers and data
        raise AdapterFileError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})".split("\n")[0],
                               "the file is corrupt or truncated: use another checkpoint or retrain") from None
    if _META_KEY not in meta:
        raise AdapterFileError(f"{path} has no peftx metadata", "it was not written by `peftx train` / save_adapter")
    try:
        config = json.loads(meta[_META_KEY])
    except json.JSONDecodeError:
        raise AdapterFileError(f"{path}: its peftx metadata is not valid JSON", "the file is corrupt") from None
    if config.get("format") != FORMAT or config.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterFileError(f"{path}: unsupported adapter format {config.get('format')!r} "
                               f"v{config.get('format_version')}", "upgrade peftx")
    return config, tensors


def check_tensors(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], where: str) -> None:
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        raise AdapterFileError(f"{where}: {len(missing)} missing and {len(extra)} unexpected tensors "
                               f"(e.g. missing {missing[:3]}, unexpected {extra[:3]})",
                               "the file does not belong to this method / model configuration")
    for k, v in got.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise AdapterFileError(f"{where}: tensor {k} has shape {tuple(v.shape)}, expected "
                                   f"{tuple(expected[k].shape)}", "the file was made for another model size")
        if not v.is_floating_point():
            raise AdapterFileError(f"{where}: tensor {k} has dtype {v.dtype}, expected a floating dtype")
        if not all_finite(v):
            raise NonFiniteError(f"{where}: tensor {k} holds NaN or Inf", "use an earlier, finite checkpoint")


def load_adapter(model: nn.Module, path: str | Path, *, check_fingerprint: bool = True) -> nn.Module:
    """Adapt the plain ``model`` as the file describes and load its tensors. Returns ``model`` (in place)."""
    path = _resolve(path)
    config, tensors = read_adapter(path)
    head_out = model.get_classifier().out_features if hasattr(model, "get_classifier") else None
    if head_out != config.get("num_classes"):
        raise AdapterMismatchError(f"{path} is for {config.get('num_classes')} classes, the model has {head_out}",
                                   "create the backbone with the adapter's num_classes")
    cfg = config_from_dict(config["config"])
    fp = fingerprint(model, describe(model).head)  # checked before the model is touched
    if check_fingerprint and fp != config.get("base_fingerprint"):
        raise AdapterMismatchError(
            f"{path} was trained on other base weights (fingerprint {str(config.get('base_fingerprint'))[:12]}, "
            f"this backbone {fp[:12]})",
            f"load it onto {config.get('base_model')} with the weights it was trained on")
    adapt(model, cfg, spec=config.get("spec"), base_fingerprint=fp)
    expected = adapter_state_dict(model)
    check_tensors(expected, tensors, str(path))
    with torch.no_grad():
        for k, v in tensors.items():
            expected[k].copy_(v)
    return model
