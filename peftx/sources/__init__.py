"""Where a model to export comes from: one class per kind, one protocol (:class:`~.base.Source`), one registry.

- :class:`~.peft_dir.PeftSource`: a Hugging Face peft adapter directory for a timm model;
- :class:`~.checkpoint.CheckpointSource`: a plain fine-tuned timm checkpoint (no adapter);
- :class:`~.run.RunSource`: a peftx run directory or adapter file (what no other kind claims).

Adding a kind is one module and one entry in :data:`KINDS`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .base import Loaded, Source, recorded_spec
from .checkpoint import CheckpointSource
from .peft_dir import PeftSource
from .run import RunSource, adapter_path
from .spec import rebuild_model, recorded_int, required_int

# Asked in this order: the first kind that claims a path reads it (RunSource claims everything: last).
KINDS: tuple[type[Source], ...] = (PeftSource, CheckpointSource, RunSource)


def source_for(source: Source | str | os.PathLike[str]) -> Source:
    """The source object of a path given on the command line (or ``source`` itself when it is one)."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    path = Path(source)
    kind = next(k for k in KINDS if k.claims(path))
    return kind.from_path(path)


def recorded_source(provenance: Mapping[str, Any], file: str | Path) -> Source:
    """For ``validate``: the source a bundle was made from, rebuilt from its recorded provenance (``file`` is the
    file whose sha256 was checked: the adapter, or the checkpoint)."""
    method = provenance.get("method")
    kind = next((k for k in KINDS if k.method is not None and k.method == method), RunSource)
    return kind.recorded(provenance, Path(file))


def load_source(source: Source | str | os.PathLike[str], **overrides: Any) -> Loaded:
    """Load ``source`` (a path or a source object) with the command line's overrides (model_name, weights,
    img_size; None: not given). A kind refuses an override it cannot honour."""
    return source_for(source).with_overrides(**overrides).load()


__all__ = [
    "KINDS",
    "Loaded",
    "Source",
    "PeftSource",
    "CheckpointSource",
    "RunSource",
    "source_for",
    "recorded_source",
    "load_source",
    "adapter_path",
    "rebuild_model",
    "recorded_int",
    "required_int",
    "recorded_spec",
]
