"""A peftx run: its directory, or its adapter file (``adapter.safetensors`` + ``adapter_config.json``).

The unmerged model is the recorded backbone with the adapter loaded onto it; it merges with peftx's own fold.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..adapter_io import ADAPTER_FILE, load_adapter, read_adapter
from ..backbones import data_config
from ..errors import AdapterMismatchError, UsageError
from .base import Loaded
from .spec import rebuild_model


def adapter_path(source: str | Path) -> Path:
    """The adapter file of a run directory, or the adapter file itself."""
    source = Path(source)
    return source / ADAPTER_FILE if source.is_dir() else source


@dataclass(frozen=True)
class RunSource:
    """A peftx run directory or adapter file; ``model_name`` / ``weights`` override its recorded backbone."""

    method: ClassVar[str | None] = None  # the adapter's own (rlrr, lora, ...)
    path: Path
    model_name: str | None = None
    weights: str | Path | None = None

    @classmethod
    def claims(cls, path: Path) -> bool:
        return True  # the last kind asked: whatever no other kind claims is read as a run

    @classmethod
    def from_path(cls, path: Path) -> RunSource:
        return cls(Path(path))

    @classmethod
    def recorded(cls, provenance: Mapping[str, Any], file: Path) -> RunSource:
        return cls(Path(file))

    def with_overrides(self, **overrides: Any) -> RunSource:
        if overrides.get("img_size") is not None:
            raise UsageError("--img-size is for peft adapters and checkpoints", "a peftx run records its image size")
        given = {k: v for k, v in overrides.items() if k in ("model_name", "weights") and v is not None}
        return dataclasses.replace(self, **given)

    def load(self) -> Loaded:
        path = adapter_path(self.path)
        config, _ = read_adapter(path)
        if self.model_name:  # an adapter file used with a backbone named on the command line
            _check_same_backbone(config, self.model_name, path)
            config = {**config, "spec": {**(config.get("spec") or {}), "name": self.model_name}}
        model = rebuild_model(config, weights=self.weights)
        load_adapter(model, path)
        model.eval()
        data_cfg = config.get("data_config") or data_config(model)  # the run's recorded preprocessing
        names = config.get("class_names") or [str(i) for i in range(config["num_classes"])]
        return Loaded(model, path, config, data_cfg, list(names))


def _check_same_backbone(config: dict[str, Any], model_name: str, path: Path) -> None:
    """``--model`` renames the backbone of an adapter that records none; an adapter trained on another
    architecture cannot be loaded onto this one (building it would fail later on a size or a tensor shape, with a
    message about that instead of about the adapter)."""
    recorded = (config.get("spec") or {}).get("name")
    if recorded and recorded.partition(".")[0] != model_name.partition(".")[0]:
        raise AdapterMismatchError(
            f"the adapter {path} belongs to backbone {recorded} (recorded in its "
            f"adapter_config.json), not {model_name}",
            "drop --model: merge-export rebuilds the recorded backbone; for "
            f"{model_name}, train an adapter on it (peftx train --model {model_name})",
        )


__all__ = ["RunSource", "adapter_path"]
