"""Resumable training checkpoints: one safetensors file, no pickle.

``<run>/checkpoint/last.safetensors`` holds

* ``param/<name>``: every trainable tensor (adapter + head), float32;
* ``optim/<name>/<key>``: the optimizer's per-parameter state tensors (AdamW: ``step``, ``exp_avg``,
  ``exp_avg_sq``), keyed by parameter NAME rather than torch's positional index, so a checkpoint cannot silently
  attach moments to the wrong tensor;
* metadata ``peftx_checkpoint``: JSON with the resolved run config, the loop position (completed epochs, batches
  done in the current epoch, global step), the best epoch so far, the metric history, the optimizer's param groups
  and non-tensor state, and the AMP grad-scaler state.

The learning-rate schedule is a pure function of the global step and the config, so the step IS its state. RNG
state is not stored because the loop never carries RNG state across steps: every step reseeds from
(seed, global step, rank) and every training sample's augmentation from (seed, epoch, index). That is what makes a
resumed run — even one resumed mid-epoch after SIGINT, or on another number of processes — draw exactly the random
numbers the uninterrupted run draws.

Written atomically (temporary file + fsync + rename): a crash or SIGKILL leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .._util import first_line
from ..checks import is_pickle_file
from ..errors import AdapterFileError
from ..fsutil import atomic_path

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "last.safetensors"
FORMAT = "peftx-train-checkpoint"
FORMAT_VERSION = 1
_META_KEY = "peftx_checkpoint"
_PARAM = "param/"
_OPTIM = "optim/"


@dataclass
class LoopState:
    """Where the loop is and what it has seen; everything JSON."""

    epoch: int = 0  # completed epochs
    batch: int = 0  # batches already trained in epoch ``epoch`` (non-zero only for a mid-epoch checkpoint)
    global_step: int = 0
    best_epoch: int | None = None  # 1-based, like the epochs in metrics.jsonl
    best_val_accuracy: float | None = None
    best_val_loss: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # the metrics.jsonl records so far
    partial: dict[str, float] = field(default_factory=dict)  # running sums of an unfinished epoch
    train_seconds: float = 0.0  # epochs' wall time, validation and saving included
    step_seconds: float = 0.0  # time in training steps only (data loading included): the img/s denominator
    train_images: int = 0
    skipped_steps: int = 0  # fp16: optimiser steps the grad scaler skipped (gradients overflowed)
    extensions: list[dict[str, Any]] = field(default_factory=list)  # --epochs on resume: {from_epochs, to_epochs, ...}

    @classmethod
    def from_dict(cls, d: Any, where: str | Path = "checkpoint") -> LoopState:
        """The state a checkpoint records; a damaged field is an :class:`AdapterFileError` naming it, not a crash."""
        if not isinstance(d, dict):
            raise _damaged(where, "state", d, "a mapping")
        known = {f.name: f for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        for name in ("epoch", "batch", "global_step", "train_images", "skipped_steps"):
            if name in values and not _is_int(values[name], minimum=0):
                raise _damaged(where, f"state.{name}", values[name], "an integer >= 0")
        if values.get("best_epoch") is not None and not _is_int(values["best_epoch"], minimum=1):
            raise _damaged(where, "state.best_epoch", values["best_epoch"], "an integer >= 1")
        for name in ("best_val_accuracy", "best_val_loss", "train_seconds", "step_seconds"):
            value = values.get(name)
            if value is not None and not _is_number(value):
                raise _damaged(where, f"state.{name}", value, "a number")
        for name, kind in (("history", list), ("partial", dict), ("extensions", list)):
            if name in values and not isinstance(values[name], kind):
                raise _damaged(where, f"state.{name}", values[name], f"a {kind.__name__}")
        if not all(isinstance(r, dict) for r in values.get("history", [])):
            raise _damaged(where, "state.history", values["history"], "a list of mappings")
        if not all(_is_number(v) for v in values.get("partial", {}).values()):
            raise _damaged(where, "state.partial", values["partial"], "a mapping of numbers")
        return cls(**values)


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _damaged(where: Any, key: str, value: Any, expected: str) -> AdapterFileError:
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    return AdapterFileError(
        f"{where}: the checkpoint's {key} is {shown}, not {expected}",
        "the checkpoint was edited or damaged: restore it, or start the run again",
    )


@dataclass
class Checkpoint:
    config: dict[str, Any]
    state: LoopState
    params: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # flattened: {"param_groups": [...], "scalars": {...}, "tensors": {name: {key: t}}}
    scaler: dict[str, Any] | None
    path: Path


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / CHECKPOINT_FILE


# -- optimizer state <-> tensors + JSON ---------------------------------------------------------------------------


def flatten_optimizer(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, json) for ``optimizer``; ``names`` are its parameters' names in param-group order."""
    sd = optimizer.state_dict()
    order = [i for g in sd["param_groups"] for i in g["params"]]
    if len(order) != len(names):
        raise ValueError(f"optimizer holds {len(order)} parameters, {len(names)} names given")
    name_of = dict(zip(order, names, strict=True))
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{_OPTIM}{name_of[idx]}/{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(name_of[idx], {})[key] = value
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [name_of[i] for i in g["params"]]}
        for g in sd["param_groups"]
    ]
    return tensors, {"param_groups": groups, "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, names: list[str], flat: dict[str, Any]) -> None:
    """Inverse of :func:`flatten_optimizer` (names must match those saved, group by group)."""
    saved = [n for g in flat["param_groups"] for n in g["params"]]
    if saved != names:
        missing, extra = sorted(set(names) - set(saved)), sorted(set(saved) - set(names))
        raise AdapterFileError(
            f"checkpoint optimizer state does not match the model (missing {missing[:3]}, unexpected {extra[:3]})",
            "resume with the same model, method and options",
        )
    index = {n: i for i, n in enumerate(names)}
    try:
        state: dict[int, dict[str, Any]] = {}
        for name, entries in (*flat["tensors"].items(), *flat["scalars"].items()):
            state.setdefault(index[name], {}).update(entries)
        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": [index[n] for n in g["params"]]}
            for g in flat["param_groups"]
        ]
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # torch's checks raise assorted types
        raise AdapterFileError(
            first_line(f"checkpoint optimizer state is damaged ({type(e).__name__}: {e})"),
            "the checkpoint was edited or damaged: restore it, or start the run again",
        ) from None


# -- file -------------------------------------------------------------------------------------------------------------


def save_checkpoint(
    path: str | Path,
    *,
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    optimizer_names: list[str],
    scaler: torch.amp.GradScaler | None,
    state: LoopState,
    config: dict[str, Any],
) -> Path:
    """Write the checkpoint atomically; returns its path."""
    path = Path(path)
    tensors = {f"{_PARAM}{k}": v.detach().to("cpu", torch.float32).contiguous() for k, v in params.items()}
    opt_tensors, opt_json = flatten_optimizer(optimizer, optimizer_names)
    tensors.update(opt_tensors)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config,
        "state": asdict(state),
        "optimizer": opt_json,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta)})
    return path


def _refuse_pickle(path: Path) -> None:
    if is_pickle_file(path):  # torch.save zip / raw pickle: never unpickled here
        raise AdapterFileError(
            f"{path} is a pickle/torch file, not a peftx checkpoint",
            "peftx resumes only from the checkpoint/last.safetensors it wrote",
        )


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and format-check a checkpoint (a run directory or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = checkpoint_path(path)
    if not path.is_file():
        raise AdapterFileError(
            f"no training checkpoint at {path}",
            "resume a run directory written by `peftx train` (it holds checkpoint/last.safetensors)",
        )
    _refuse_pickle(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        info = json.loads(meta[_META_KEY])
    except KeyError:
        raise AdapterFileError(
            f"{path} has no peftx checkpoint metadata", "it was not written by peftx train"
        ) from None
    except Exception as e:  # safetensors / json raise assorted types for one outcome: a damaged file
        raise AdapterFileError(
            first_line(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})"),
            "the file is corrupt or truncated; start the run again",
        ) from None
    if not isinstance(info, dict):
        raise _damaged(path, "metadata", info, "a mapping")
    version = info.get("format_version", 0)
    if info.get("format") != FORMAT or not _is_int(version, 0) or version > FORMAT_VERSION:
        raise AdapterFileError(
            f"{path}: unsupported checkpoint format {info.get('format')!r} v{info.get('format_version')}",
            "upgrade peftx",
        )
    for key in ("config", "optimizer"):
        if not isinstance(info.get(key), dict):
            raise _damaged(path, key, info.get(key), "a mapping")
    opt = info["optimizer"]
    groups = opt.get("param_groups")
    if not isinstance(groups, list) or not all(
        isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups
    ):
        raise _damaged(path, "optimizer.param_groups", groups, "a list of groups")
    if not isinstance(opt.get("scalars", {}), dict):
        raise _damaged(path, "optimizer.scalars", opt.get("scalars"), "a mapping")
    if info.get("scaler") is not None and not isinstance(info["scaler"], dict):
        raise _damaged(path, "scaler", info["scaler"], "a mapping")
    state = LoopState.from_dict(info.get("state"), where=path)
    params = {k[len(_PARAM) :]: v for k, v in tensors.items() if k.startswith(_PARAM)}
    opt_tensors: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith(_OPTIM):
            name, _, key = k[len(_OPTIM) :].rpartition("/")
            opt_tensors.setdefault(name, {})[key] = v
    optimizer = {"scalars": {}, **opt, "tensors": opt_tensors}
    return Checkpoint(
        config=info["config"], state=state, params=params, optimizer=optimizer, scaler=info.get("scaler"), path=path
    )
