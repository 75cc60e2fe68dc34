"""Evaluation: accuracy / loss of an adapted model on a split, and of a saved run rebuilt from its adapter file.

Also home of the small runtime helpers training shares with evaluation (device, autocast, the eval loop), so the
two can never measure differently.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ContextManager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .distributed import DistInfo, ShardSampler, all_reduce_sum
from .errors import AdapterFileError, BackendUnavailableError, DataError, UsageError

AMP_MODES = ("auto", "bf16", "fp16", "off")
SPLITS = ("train", "val", "test")


# -- runtime ----------------------------------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"device: {name!r} is not a device", "use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(f"device {name!r} requested but CUDA is not available",
                                      "use --device cpu (or auto), or run on a machine with an NVIDIA GPU")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"device: {name!r} is not supported", "use auto, cpu or cuda")
    return device


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``mode`` on ``device`` (None = full fp32).

    auto: bf16 on a GPU that supports it, else fp16 (with a grad scaler); off on CPU, where bf16 autocast is only
    faster on CPUs with bf16 matrix units. bf16 is allowed on CPU (explicitly); fp16 autocast is CUDA-only here.
    """
    if mode not in AMP_MODES:
        raise UsageError(f"amp: {mode!r} is not an AMP mode", f"choose from {', '.join(AMP_MODES)}")
    if mode == "off":
        return None
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if mode == "auto":
            return torch.bfloat16 if bf16_ok else torch.float16
        if mode == "bf16" and not bf16_ok:
            raise UsageError("amp: this GPU does not support bf16", "use --amp fp16 or --amp auto")
        return torch.bfloat16 if mode == "bf16" else torch.float16
    if mode == "auto":
        return None
    if mode == "fp16":
        raise UsageError("amp: fp16 autocast needs a CUDA device", "use --amp bf16 or --amp off on CPU")
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> ContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def use_fused_attention(model: nn.Module, enabled: bool = True) -> int:
    """Toggle timm's fused (SDPA) attention on every attention module; returns how many were switched.

    peftx builds backbones ``exportable=True``, which turns SDPA off for ONNX export. Training and evaluation get the
    same function from the fused kernel (to float rounding) much faster, so they switch it back on at run time; the
    flag is a plain attribute, not part of any saved tensor.
    """
    n = 0
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = enabled
            n += 1
    return n


def eval_loader(dataset: Dataset, batch_size: int, *, info: DistInfo, num_workers: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """In-order loader over this rank's shard (no padding, so reduced counts are exact)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), info.rank, info.world_size),
                      num_workers=num_workers, pin_memory=pin_memory, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def evaluate_model(model: nn.Module, loader: DataLoader, *, device: torch.device, amp_dtype: torch.dtype | None = None,
                   channels_last: bool = False, info: DistInfo | None = None) -> dict[str, float]:
    """{accuracy, loss, n} over ``loader``, summed over every rank's shard."""
    info = info or DistInfo()
    was_training = model.training
    model.eval()
    correct = loss_sum = count = 0.0
    try:
        for x, y in loader:
            x, y = to_device(x, device, channels_last), y.to(device, non_blocking=True)
            with autocast(device, amp_dtype):
                logits = model(x)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(dim=1) == y).sum().item()
            count += y.numel()
    finally:
        model.train(was_training)
    correct, loss_sum, count = all_reduce_sum([correct, loss_sum, count], device, info)
    n = int(round(count))
    return {"accuracy": correct / n if n else float("nan"), "loss": loss_sum / n if n else float("nan"), "n": n}


# -- saved runs -------------------------------------------------------------------------------------------------------

def _recorded_int(record: dict[str, Any], key: str, default: int | None = None) -> int | None:
    """An integer field of the adapter's JSON record; a damaged value is a damaged adapter file, not a crash."""
    value = record.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise AdapterFileError(f"the adapter record's {key} is {value!r}, not an integer",
                               "the adapter JSON was edited or damaged: restore it from the run directory")
    return value


def rebuild_model(config: dict[str, Any], *, weights: str | Path | None = None) -> nn.Module:
    """The plain backbone an adapter file's ``spec`` describes (``weights`` overrides the recorded file)."""
    from .backbones import create_backbone

    spec = dict(config.get("spec") or {})
    if not spec.get("name"):
        raise UsageError("the adapter does not record its backbone (no spec.name)",
                         "it was not written by peftx train; load it with load_adapter onto your own model")
    pretrained = bool(spec.get("pretrained", True))
    init_seed = _recorded_int(spec, "init_seed")
    if not pretrained and init_seed is not None:
        torch.manual_seed(init_seed)  # a random-init backbone is rebuilt from the seed it was made with
    return create_backbone(spec["name"], num_classes=_recorded_int(config, "num_classes"),
                           weights=weights or (spec.get("weights") if pretrained else None), pretrained=pretrained,
                           img_size=spec.get("img_size"), **(spec.get("model_kwargs") or {}))


def evaluate(run_dir: str | Path, data: str | Path | None = None, split: str = "test",
             weights: str | Path | None = None, *, batch_size: int = 64, device: str = "auto", amp: str = "off",
             num_workers: int = 0) -> dict[str, Any]:
    """Accuracy of a trained run on ``split`` of ``data`` (default: the data it was trained on).

    Rebuilds the backbone from the adapter's recorded spec, loads the adapter (fingerprint-checked), and uses the
    preprocessing recorded at training time. Returns {accuracy, loss, n, split, data, adapter}.
    """
    from .adapter_io import ADAPTER_FILE, load_adapter, read_adapter
    from .data import load_splits

    if split not in SPLITS:
        raise UsageError(f"split: {split!r} is not a split", f"choose from {', '.join(SPLITS)}")
    if batch_size < 1:
        raise UsageError(f"batch_size: {batch_size} must be >= 1")
    path = Path(run_dir)
    path = path / ADAPTER_FILE if path.is_dir() else path
    config, _ = read_adapter(path)
    data = data if data is not None else config.get("data")
    if data is None:
        raise UsageError(f"{path} does not record its training data", "pass the dataset to evaluate on")
    dev = resolve_device(device)
    model = rebuild_model(config, weights=weights)
    data_cfg = config.get("data_config")
    if not data_cfg:
        from .backbones import data_config
        data_cfg = data_config(model)
    splits = load_splits(data, data_cfg, hflip=False, seed=_recorded_int(config, "seed", 42))
    trained_names = config.get("class_names")
    if trained_names is not None and list(trained_names) != list(splits.class_names):
        raise DataError(f"{data} has classes {splits.class_names[:5]}..., the adapter was trained on "
                        f"{list(trained_names)[:5]}...", "evaluate on data with the training classes, in order")
    dataset = getattr(splits, split)
    if dataset is None or len(dataset) == 0:
        raise DataError(f"{data} has no {split} split", "choose another --split")
    load_adapter(model, path)
    use_fused_attention(model)
    model.to(dev).eval()
    loader = eval_loader(dataset, batch_size, info=DistInfo(), num_workers=num_workers,
                         pin_memory=dev.type == "cuda")
    result = evaluate_model(model, loader, device=dev, amp_dtype=resolve_amp(amp, dev))
    return {**result, "split": split, "data": str(data), "adapter": str(path)}
