"""Evaluation: the accuracy / loss of a saved run, rebuilt from its adapter file, on a split of a dataset.

The loop itself (and the device / AMP helpers) is :mod:`peftx.runtime`'s, shared with training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import AdapterFileError, UsageError
from .runtime import eval_loader, evaluate_model, resolve_amp, resolve_device, use_fused_attention
from .train.distributed import DistInfo

SPLITS = ("train", "val", "test")


# -- saved runs -------------------------------------------------------------------------------------------------------


def _recorded_int(record: dict[str, Any], key: str, default: int | None = None) -> int | None:
    """An integer field of the adapter's JSON record; a damaged value is a damaged adapter file, not a crash."""
    value = record.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise AdapterFileError(
            f"the adapter record's {key} is {value!r}, not an integer",
            "the adapter JSON was edited or damaged: restore it from the run directory",
        )
    return value


def _required_int(record: dict[str, Any], key: str, default: int | None = None) -> int:
    """:func:`_recorded_int` for a field the model cannot be rebuilt without (absent and no default: damaged)."""
    value = _recorded_int(record, key, default)
    if value is None:
        raise AdapterFileError(
            f"the adapter record's {key} is missing",
            "the adapter JSON was edited or damaged: restore it from the run directory",
        )
    return value


def rebuild_model(config: dict[str, Any], *, weights: str | Path | None = None) -> nn.Module:
    """The plain backbone an adapter file's ``spec`` describes (``weights`` overrides the recorded file)."""
    from .backbones import create_backbone

    spec = dict(config.get("spec") or {})
    if not spec.get("name"):
        raise UsageError(
            "the adapter does not record its backbone (no spec.name)",
            "it was not written by peftx train; load it with load_adapter onto your own model",
        )
    pretrained = bool(spec.get("pretrained", True))
    init_seed = _recorded_int(spec, "init_seed")
    if not pretrained and init_seed is not None:
        torch.manual_seed(init_seed)  # a random-init backbone is rebuilt from the seed it was made with
    return create_backbone(
        spec["name"],
        num_classes=_required_int(config, "num_classes"),
        weights=weights or (spec.get("weights") if pretrained else None),
        pretrained=pretrained,
        img_size=spec.get("img_size"),
        **(spec.get("model_kwargs") or {}),
    )


def run_val_files(config: dict[str, Any], adapter_path: Path, data: Any) -> list[str] | None:
    """The validation files the run drew from train/ (its val_split.json), when ``data`` is the data it trained on;
    None otherwise (a dataset with its own val/, or other data)."""
    from .data import read_val_split

    if not config.get("val_split") or data is None or config.get("data") is None:
        return None
    if _same_data(data, config["data"]):
        return read_val_split(adapter_path.parent)
    return None


def _same_data(a: Any, b: Any) -> bool:
    return str(a) == str(b) or Path(str(a)).expanduser().absolute() == Path(str(b)).expanduser().absolute()


def evaluate(
    run_dir: str | Path,
    data: str | Path | None = None,
    split: str = "test",
    weights: str | Path | None = None,
    *,
    batch_size: int = 64,
    device: str = "auto",
    amp: str = "off",
    num_workers: int = 0,
    confusion_png: str | Path | None = None,
) -> dict[str, Any]:
    """Accuracy, per-class accuracy and confusion matrix of a trained run on ``split`` of ``data`` (default: the
    data it was trained on; also a folder holding only that split, see :func:`~peftx.data.load_eval_split`).

    Rebuilds the backbone from the adapter's recorded spec, loads the adapter (fingerprint-checked), and uses the
    preprocessing recorded at training time; a validation split the run drew from train/ is rebuilt from its
    val_split.json. ``confusion_png``: also write the matrix as a PNG there. Returns {accuracy, loss, n, split, data,
    source, skipped_files, adapter, preprocessing, per_class, confusion_matrix[, confusion_png]}.
    """
    from .adapter_io import ADAPTER_FILE, load_adapter, read_adapter
    from .data import load_eval_split
    from .metrics import class_report

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
    names = config.get("class_names") or [str(i) for i in range(_recorded_int(config, "num_classes") or 0)]
    chosen = load_eval_split(
        data,
        data_cfg,
        split,
        config.get("class_names"),
        seed=_required_int(config, "seed", 42),
        val_files=run_val_files(config, path, data),
    )
    load_adapter(model, path)
    use_fused_attention(model)
    model.to(dev).eval()
    loader = eval_loader(
        chosen.dataset, batch_size, info=DistInfo(), num_workers=num_workers, pin_memory=dev.type == "cuda"
    )
    result = evaluate_model(model, loader, device=dev, amp_dtype=resolve_amp(amp, dev), num_classes=len(names))
    from .preprocess import describe

    report = class_report(result.pop("confusion"), names)
    out = {
        **result,
        "split": split,
        "data": str(data),
        "source": chosen.source,
        "skipped_files": len(chosen.skipped),
        "adapter": str(path),
        "preprocessing": describe(data_cfg),  # the run's contract: what the bundle's infer.py applies too
        **report,
    }
    if confusion_png is not None:
        from .plotting import plot_confusion

        title = f"{split}: {100 * result['accuracy']:.1f} % of {result['n']:,} images"
        out["confusion_png"] = str(
            plot_confusion(report["confusion_matrix"]["counts"], names, confusion_png, title=title)
        )
    return out
