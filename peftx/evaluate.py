"""Evaluation: the accuracy / loss of a saved run, rebuilt from its adapter file, on a split of a dataset.

The loop itself (and the device / AMP helpers) is :mod:`peftx.runtime`'s, shared with training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .adapter_io import ADAPTER_FILE, load_adapter, read_adapter
from .backbones import data_config
from .data import load_eval_split, read_val_split
from .distributed import DistInfo
from .errors import UsageError
from .metrics import class_report
from .plotting import plot_confusion
from .preprocess import describe
from .runtime import eval_loader, evaluate_model, resolve_amp, resolve_device, use_fused_attention
from .sources.spec import rebuild_model, recorded_int, required_int

SPLITS = ("train", "val", "test")


# -- saved runs -------------------------------------------------------------------------------------------------------


def run_val_files(config: dict[str, Any], adapter_path: Path, data: Any) -> list[str] | None:
    """The validation files the run drew from train/ (its val_split.json), when ``data`` is the data it trained on;
    None otherwise (a dataset with its own val/, or other data)."""
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
        data_cfg = data_config(model)
    names = config.get("class_names") or [str(i) for i in range(recorded_int(config, "num_classes") or 0)]
    chosen = load_eval_split(
        data,
        data_cfg,
        split,
        config.get("class_names"),
        seed=required_int(config, "seed", 42),
        val_files=run_val_files(config, path, data),
    )
    load_adapter(model, path)
    use_fused_attention(model)
    model.to(dev).eval()
    loader = eval_loader(
        chosen.dataset, batch_size, info=DistInfo(), num_workers=num_workers, pin_memory=dev.type == "cuda"
    )
    result = evaluate_model(model, loader, device=dev, amp_dtype=resolve_amp(amp, dev), num_classes=len(names))

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
        title = f"{split}: {100 * result['accuracy']:.1f} % of {result['n']:,} images"
        out["confusion_png"] = str(
            plot_confusion(report["confusion_matrix"]["counts"], names, confusion_png, title=title)
        )
    return out
