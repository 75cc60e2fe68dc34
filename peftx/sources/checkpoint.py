"""A plain fine-tuned timm checkpoint, no adapter (``peftx export NAME --weights FILE``).

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
from typing import Any, ClassVar

from torch import nn

from ..adapter import fingerprint
from ..backbones import create_backbone, data_config, inspect_checkpoint
from ..errors import UsageError, WeightsError
from .base import Loaded, recorded_spec

METHOD = "checkpoint"  # the "method" a bundle of a plain checkpoint records in its provenance


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

    method: ClassVar[str | None] = METHOD

    @classmethod
    def claims(cls, path: Path) -> bool:
        return False  # a checkpoint is named as one (peftx export NAME --weights FILE), never guessed from a path

    @classmethod
    def from_path(cls, path: Path) -> CheckpointSource:
        raise UsageError(f"{path}: a plain checkpoint needs its model name", "use peftx export NAME --weights FILE")

    @classmethod
    def recorded(cls, provenance: Mapping[str, Any], file: Path) -> CheckpointSource:
        spec = recorded_spec(provenance)
        return cls(
            spec["name"],
            Path(file),
            num_classes=provenance.get("num_classes"),
            img_size=spec.get("img_size"),
            model_kwargs=dict(spec.get("model_kwargs") or {}),
        )

    def with_overrides(self, **overrides: Any) -> CheckpointSource:
        given = sorted(k for k, v in overrides.items() if v is not None)
        if given:  # the checkpoint IS the model: nothing of it can be swapped (validate checks the file's sha256)
            raise UsageError(
                f"{', '.join('--' + k.replace('_', '-') for k in given)} does not apply to a plain checkpoint",
                "pass the checkpoint itself (validate: --adapter CHECKPOINT if it moved)",
            )
        return self

    def load(self) -> Loaded:
        """The plain PyTorch model as :class:`~peftx.sources.base.Loaded`; its ``merge`` is a copy."""
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


__all__ = ["CheckpointSource", "METHOD"]
