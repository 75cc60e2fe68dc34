"""Runtime helpers training and evaluation share, so the two can never measure differently: the device, AMP
(autocast dtype), timm's fused attention switch, moving batches, and the evaluation loop (accuracy / loss over a
loader, summed over every DDP rank's shard).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sized
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .distributed import DistInfo, ShardSampler, all_reduce_sum
from .errors import BackendUnavailableError, UsageError

AMP_MODES = ("auto", "bf16", "fp16", "off")


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"device: {name!r} is not a device", "use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(
            f"device {name!r} requested but CUDA is not available",
            "use --device cpu (or auto), or run on a machine with an NVIDIA GPU",
        )
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


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
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
            m.fused_attn = enabled  # type: ignore[assignment]  # torch types Module attributes as Tensor | Module
            n += 1
    return n


def eval_loader(
    dataset: Dataset, batch_size: int, *, info: DistInfo, num_workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    """In-order loader over this rank's shard (no padding, so reduced counts are exact)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(cast(Sized, dataset)), info.rank, info.world_size),
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),
    )


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    loader: DataLoader,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    info: DistInfo | None = None,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """{accuracy, loss, n} over ``loader``, summed over every rank's shard; with ``num_classes`` also
    ``confusion``: the [true][predicted] counts as nested lists (what per-class accuracy is computed from)."""
    info = info or DistInfo()
    was_training = model.training
    model.eval()
    correct = loss_sum = count = 0.0
    k = num_classes or 0
    confusion = torch.zeros(k * k, dtype=torch.int64, device=device) if k else None
    try:
        for x, y in loader:
            x, y = to_device(x, device, channels_last), y.to(device, non_blocking=True)
            with autocast(device, amp_dtype):
                logits = model(x)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            pred = logits.argmax(dim=1)
            correct += (pred == y).sum().item()
            count += y.numel()
            if confusion is not None:
                confusion += torch.bincount(y * k + pred, minlength=k * k)
    finally:
        model.train(was_training)
    correct, loss_sum, count = all_reduce_sum([correct, loss_sum, count], device, info)
    n = int(round(count))
    out: dict[str, Any] = {
        "accuracy": correct / n if n else float("nan"),
        "loss": loss_sum / n if n else float("nan"),
        "n": n,
    }
    if confusion is not None and num_classes:
        flat = [int(round(v)) for v in all_reduce_sum(confusion.double().tolist(), device, info)]
        out["confusion"] = [flat[i * num_classes : (i + 1) * num_classes] for i in range(num_classes)]
    return out
