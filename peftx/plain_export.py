"""``peftx export``: a plain fine-tuned timm checkpoint (no adapter) into the same validated bundle, through the
same path as ``merge-export`` (the source itself is :class:`peftx.sources.CheckpointSource`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._util import first_line
from .deploy import merge_export
from .errors import DataError, UsageError
from .sources.checkpoint import CheckpointSource

BUNDLE_SUFFIX = "-bundle"


def read_class_names(path: str | Path) -> list[str]:
    """One class name per line, in the head's order (trailing blank lines ignored; blank or repeated names refused)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise DataError(
            first_line(f"cannot read the class-names file {path}: {reason}"),
            "pass a UTF-8 text file with one class name per line",
        ) from None
    while lines and not lines[-1].strip():
        lines.pop()
    names: list[str] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        name = line.strip()
        if not name:
            raise DataError(f"{path}:{number}: empty class name", "one class name per line, no blank lines")
        if name in seen:
            raise DataError(
                f"{path}:{number}: class name {name!r} repeats line {seen[name]}", "every class needs its own name"
            )
        seen[name] = number
        names.append(name)
    if not names:
        raise DataError(f"the class-names file {path} is empty", "one class name per line")
    return names


def default_output(weights: str | Path) -> Path:
    """``DIR/NAME-bundle`` beside the checkpoint ``DIR/NAME.safetensors``."""
    weights = Path(weights)
    return weights.with_name(weights.stem + BUNDLE_SUFFIX)


def export_checkpoint(
    name: str,
    *,
    weights: str | Path | None,
    num_classes: int | None = None,
    class_names_file: str | Path | None = None,
    img_size: int | None = None,
    output: str | Path | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    **bundle_options: Any,
):
    """Export a plain fine-tuned checkpoint: the same bundle, options and checks as ``merge-export``.

    ``bundle_options`` go to :func:`peftx.deploy.merge_export` unchanged (batch, precision, tensorrt, force, simplify,
    images_dir, progress, and whatever it takes later), so every bundle option applies here without a change.
    """
    if weights is None:
        raise UsageError("peftx export needs the fine-tuned checkpoint", "pass --weights FILE")
    if num_classes is not None and num_classes < 1:
        raise UsageError(f"--num-classes {num_classes} must be >= 1", "or drop it: it is read from the checkpoint")
    names = tuple(read_class_names(class_names_file)) if class_names_file else None
    source = CheckpointSource(name, Path(weights), num_classes, names, img_size, dict(model_kwargs or {}))
    return merge_export(source, output=output or default_output(weights), **bundle_options)
