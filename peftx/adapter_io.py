"""Adapter files: ``adapter.safetensors`` (tensors + the config in its metadata) and ``adapter_config.json``.

Nothing is unpickled: safetensors only. Loading checks, before touching the model: the file parses, it is not a
pickle, the base-weight fingerprint and class count match the backbone, the tensor names / shapes / dtypes are
exactly what the adapter needs, and every value is finite.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import __version__
from ._util import first_line
from .adapter import adapt, adapter_modules, adapter_state_dict, count_parameters, fingerprint, state_of
from .checks import all_finite, is_pickle_file
from .errors import AdapterFileError, AdapterMismatchError, NonFiniteError
from .fsutil import atomic_path, write_text_atomic
from .layout import describe
from .methods import config_from_dict
from .preprocess import CROP_MODES, INTERPOLATIONS

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT = "peftx-adapter"
FORMAT_VERSION = 1
_META_KEY = "peftx_config"


def adapter_config(model: nn.Module, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    st = state_of(model)
    trainable, total = count_parameters(model)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "peftx_version": __version__,
        "method": st.config.method,
        "config": st.config.to_dict(),
        "base_model": st.spec.get("name"),
        "spec": st.spec,
        "family": st.layout.family,
        "num_classes": st.num_classes,
        "base_fingerprint": st.base_fingerprint,
        "trainable_params": trainable,
        "total_params": total,
        "notes": list(st.notes),
        **(extra or {}),
    }


def save_adapter(
    model: nn.Module, directory: str | Path, *, extra: dict[str, Any] | None = None, filename: str = ADAPTER_FILE
) -> Path:
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
        raise AdapterFileError(
            f"adapter file not found: {path}", "pass a run directory or an adapter .safetensors file written by peftx"
        )
    return path


def _sniff_pickle(path: Path) -> None:
    if is_pickle_file(path):  # torch.save zip or raw pickle: refused, never unpickled
        raise AdapterFileError(
            f"{path} is a pickle/torch file, not safetensors",
            "peftx loads adapters only from .safetensors files (no code runs on load)",
        )


def read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, tensors) of an adapter file, validated for format but not yet against a model."""
    path = _resolve(path)
    _sniff_pickle(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt / truncated headers and data
        raise AdapterFileError(
            first_line(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})"),
            "the file is corrupt or truncated: use another checkpoint or retrain",
        ) from None
    if _META_KEY not in meta:
        raise AdapterFileError(f"{path} has no peftx metadata", "it was not written by `peftx train` / save_adapter")
    try:
        config = json.loads(meta[_META_KEY])
    except json.JSONDecodeError:
        raise AdapterFileError(f"{path}: its peftx metadata is not valid JSON", "the file is corrupt") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{path}: its peftx metadata is not a JSON object", "the file is corrupt")
    if (
        config.get("format") != FORMAT
        or not isinstance(config.get("format_version", 0), int)
        or config.get("format_version", 0) > FORMAT_VERSION
    ):
        raise AdapterFileError(
            f"{path}: unsupported adapter format {config.get('format')!r} v{config.get('format_version')}",
            "upgrade peftx",
        )
    problem = _record_problem(config)
    if problem:
        raise AdapterFileError(
            f"{path}: its peftx record is damaged: {problem}",
            "the file is damaged or was not written by peftx: use another checkpoint or retrain",
        )
    return config, tensors


def _record_problem(config: dict[str, Any]) -> str | None:
    """What is missing or mistyped among the fields loaders rely on (None when the record is usable)."""
    n = config.get("num_classes")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return f"num_classes is {n!r}, expected a positive integer"
    method_cfg = config.get("config")
    if not isinstance(method_cfg, dict) or not isinstance(method_cfg.get("method"), str):
        return f"config is {method_cfg!r}, expected the method's settings"
    spec = config.get("spec")
    if spec is not None and not (isinstance(spec, dict) and isinstance(spec.get("model_kwargs") or {}, dict)):
        return f"spec is {spec!r}, expected the backbone's description"
    for key, kind in (("data_config", dict), ("class_names", list)):
        if config.get(key) is not None and not isinstance(config[key], kind):
            return f"{key} is {config[key]!r}, expected a {kind.__name__}"
    data_cfg = config.get("data_config")
    if data_cfg:  # the preprocessing evaluation and the bundle use as recorded

        def numbers(v, positive=False):
            return (
                isinstance(v, list)
                and len(v) >= 1
                and all(
                    isinstance(x, (int, float))
                    and not isinstance(x, bool)
                    and math.isfinite(x)
                    and (x > 0 or not positive)
                    for x in v
                )
            )

        size = data_cfg.get("input_size")
        if not (numbers(size, positive=True) and len(size) == 3 and all(isinstance(x, int) for x in size)):
            return f"data_config.input_size is {size!r}, expected [channels, height, width]"
        for key in ("mean", "std"):
            if not numbers(data_cfg.get(key), positive=key == "std"):
                return f"data_config.{key} is {data_cfg.get(key)!r}, expected one finite number per channel"
        crop = data_cfg.get("crop_pct")
        if crop is not None and (isinstance(crop, bool) or not isinstance(crop, (int, float)) or not 0 < crop <= 1):
            return f"data_config.crop_pct is {crop!r}, expected a number in (0, 1]"
        for key, known in (("crop_mode", CROP_MODES), ("interpolation", INTERPOLATIONS)):
            if key in data_cfg and data_cfg[key] not in known:
                return f"data_config.{key} is {data_cfg[key]!r}, expected one of {', '.join(known)}"
    return None


def check_tensors(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], where: str) -> None:
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        raise AdapterFileError(
            f"{where}: {len(missing)} missing and {len(extra)} unexpected tensors "
            f"(e.g. missing {missing[:3]}, unexpected {extra[:3]})",
            "the file does not belong to this method / model configuration",
        )
    for k, v in got.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise AdapterFileError(
                f"{where}: tensor {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}",
                "the file was made for another model size",
            )
        if not v.is_floating_point():
            raise AdapterFileError(
                f"{where}: tensor {k} has dtype {v.dtype}, expected a floating dtype",
                "the file is damaged or was not written by peftx: use another checkpoint",
            )
        if not all_finite(v):
            raise NonFiniteError(f"{where}: tensor {k} holds NaN or Inf", "use an earlier, finite checkpoint")


def load_adapter(model: nn.Module, path: str | Path, *, check_fingerprint: bool = True) -> nn.Module:
    """Adapt the plain ``model`` as the file describes and load its tensors. Returns ``model`` (in place)."""
    path = _resolve(path)
    config, tensors = read_adapter(path)
    get_classifier = getattr(model, "get_classifier", None)  # timm's; a plain nn.Module has none
    classifier = get_classifier() if get_classifier is not None else None
    if isinstance(classifier, tuple):  # DeiT distilled: (head, head_dist), the same class count
        classifier = classifier[0]
    head_out = getattr(classifier, "out_features", None)
    if head_out != config.get("num_classes"):
        raise AdapterMismatchError(
            f"{path} is for {config.get('num_classes')} classes, the model has {head_out}",
            "create the backbone with the adapter's num_classes",
        )
    try:
        cfg = config_from_dict(config["config"])
    except (TypeError, ValueError) as e:  # a mistyped field (alpha="x", targets=5) in a damaged record
        raise AdapterFileError(
            first_line(f"{path}: its method settings are malformed ({type(e).__name__}: {e})"),
            "the file is damaged: use another checkpoint or retrain",
        ) from None
    heads = describe(model).heads
    fp = fingerprint(model, heads)  # checked before the model is touched
    if check_fingerprint and fp != config.get("base_fingerprint"):
        raise AdapterMismatchError(
            f"{path} was trained on other base weights (fingerprint {str(config.get('base_fingerprint'))[:12]}, "
            f"this backbone {fp[:12]})",
            f"load it onto {config.get('base_model')} with the weights it was trained on",
        )
    # The expected tensor names and shapes exist only once the model is adapted: if the file's tensors then turn out
    # wrong, undo the adaptation, so a refused file leaves the model exactly as it was handed in.
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    head_state = {h: {k: v.detach().clone() for k, v in model.get_submodule(h).state_dict().items()} for h in heads}
    try:
        adapt(model, cfg, spec=config.get("spec"), base_fingerprint=fp)
        expected = adapter_state_dict(model)
        check_tensors(expected, tensors, str(path))
    except BaseException:
        _undo_adapt(model, head_state, requires_grad)
        raise
    with torch.no_grad():
        for k, v in tensors.items():
            expected[k].copy_(v)
    return model


def _undo_adapt(
    model: nn.Module, head_state: dict[str, dict[str, torch.Tensor]], requires_grad: dict[str, bool]
) -> None:
    """Unwrap what adapt() wrapped (the frozen layers inside are untouched) and restore the head it zero-initialised."""
    for name, module in reversed(adapter_modules(model)):
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, module.inner)
    if getattr(model, "peftx_state", None) is not None:
        del model.peftx_state
    for head, state in head_state.items():
        model.get_submodule(head).load_state_dict(state)
    for n, p in model.named_parameters():
        p.requires_grad_(requires_grad.get(n, p.requires_grad))
