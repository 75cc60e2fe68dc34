"""``peftx export``: a plain fine-tuned timm checkpoint (no adapter) into the same validated bundle.

The checkpoint goes through :mod:`peftx.backbones`' checks (safetensors, or a torch file of tensors loaded with
``weights_only``; key-by-key fit; finite values). Its head and position embeddings ARE the fine-tuned model, so what
timm would otherwise adjust silently is refused instead: a class count other than the head's, an image size whose
position grid differs from the checkpoint's. The reference for validation is the PyTorch model itself; the exported
model is a copy of it (there is nothing to merge).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .errors import DataError, UsageError, WeightsError

METHOD = "checkpoint"  # the "method" a bundle of a plain checkpoint records in its provenance
BUNDLE_SUFFIX = "-bundle"


def read_class_names(path: str | Path) -> list[str]:
    """One class name per line, in the head's order (trailing blank lines ignored; blank or repeated names refused)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise DataError(
            f"cannot read the class-names file {path}: {reason}".split("\n")[0],
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


def _plain_copy(model: nn.Module) -> nn.Module:
    """Nothing to merge: the checkpoint is the plain model. A copy keeps the reference and the export apart."""
    return copy.deepcopy(model).eval()


@dataclass(frozen=True)
class CheckpointSource:
    """A plain fine-tuned timm checkpoint to export: model name, weights file, and what the user says it holds."""

    name: str
    weights: Path
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None
    img_size: int | None = None
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def with_overrides(self, **overrides: Any) -> CheckpointSource:
        given = sorted(k for k, v in overrides.items() if v is not None)
        if given:  # the checkpoint IS the model: nothing of it can be swapped (validate checks the file's sha256)
            raise UsageError(
                f"{', '.join('--' + k.replace('_', '-') for k in given)} does not apply to a plain checkpoint",
                "pass the checkpoint itself (validate: --adapter CHECKPOINT if it moved)",
            )
        return self

    def load(self):
        """The plain PyTorch model as :class:`peftx.deploy.Loaded`; its ``merge`` is a copy."""
        from .adapter import fingerprint
        from .backbones import create_backbone, data_config, inspect_checkpoint
        from .deploy import Loaded

        kwargs = dict(self.model_kwargs)
        info = inspect_checkpoint(self.name, self.weights, img_size=self.img_size, **kwargs)
        n = self._class_count(info.num_classes)
        if info.resampled:
            size = f"--img-size {info.img_size}" if info.img_size else "--img-size with the size it was fine-tuned at"
            raise UsageError(
                f"{self.weights} was fine-tuned at another image size than {self.name} is built at "
                f"({info.resampled[0]})",
                f"pass {size}",
            )
        names = list(self.class_names) if self.class_names else [str(i) for i in range(n)]
        if len(names) != n:
            raise UsageError(
                f"{len(names)} class names for the {n} classes of {self.weights}'s head",
                "pass one name per line, one line per class, in the head's order",
            )
        model = create_backbone(self.name, num_classes=n, weights=self.weights, img_size=self.img_size, **kwargs).eval()
        spec = {
            "name": self.name,
            "weights": str(Path(self.weights).absolute()),
            "img_size": self.img_size,
            "model_kwargs": kwargs,
            "pretrained": True,
        }
        record = {
            "method": METHOD,
            "config": None,
            "base_model": self.name,
            "spec": spec,
            "base_fingerprint": fingerprint(model),
            "num_classes": n,
            "trainable_params": None,
        }
        return Loaded(model, Path(self.weights), record, data_config(model), names, _plain_copy)

    def _class_count(self, in_file: int) -> int:
        if in_file < 1:
            raise WeightsError(
                f"{self.weights} has no classifier head for {self.name}",
                "peftx export deploys a fine-tuned classifier: pass the checkpoint with its head",
            )
        if self.num_classes is not None and self.num_classes != in_file:
            raise UsageError(
                f"--num-classes {self.num_classes}, but the head in {self.weights} has {in_file} classes",
                "drop --num-classes (it is read from the checkpoint), or pass the right checkpoint",
            )
        return in_file


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
    from .deploy import merge_export

    if weights is None:
        raise UsageError("peftx export needs the fine-tuned checkpoint", "pass --weights FILE")
    if num_classes is not None and num_classes < 1:
        raise UsageError(f"--num-classes {num_classes} must be >= 1", "or drop it: it is read from the checkpoint")
    names = tuple(read_class_names(class_names_file)) if class_names_file else None
    source = CheckpointSource(name, Path(weights), num_classes, names, img_size, dict(model_kwargs or {}))
    return merge_export(source, output=output or default_output(weights), **bundle_options)
