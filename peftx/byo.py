"""Bring your own model: the sources ``merge-export`` / ``export`` / ``validate`` take besides a peftx run.

- a Hugging Face peft adapter directory for a timm model (:mod:`peftx.peft_adapter`);
- a plain fine-tuned timm checkpoint, no adapter (:mod:`peftx.plain_export`).

Each loads into :class:`peftx.deploy.Loaded` (the UNMERGED reference, and how it becomes the plain timm model), so
every source takes the one path through :func:`peftx.deploy.merge_export` to ``write_bundle``: whatever that path
checks or produces (targets, precisions, gates) applies to all of them alike.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import UsageError


def load_foreign(
    source: Any, *, model_name: str | None = None, weights: str | Path | None = None, img_size: int | None = None
):
    """The Loaded of a peft adapter directory or a source object; None for a peftx run (deploy loads those)."""
    from .peft_adapter import PeftSource, is_peft_dir
    from .plain_export import CheckpointSource

    overrides = {"model_name": model_name, "weights": weights, "img_size": img_size}
    if isinstance(source, (PeftSource, CheckpointSource)):
        return source.with_overrides(**overrides).load()
    if isinstance(source, (str, os.PathLike)) and is_peft_dir(Path(source)):
        return PeftSource(Path(source)).with_overrides(**overrides).load()
    return None


def recorded_source(provenance: Mapping[str, Any], source: str | Path) -> Any:
    """For ``validate``: the source a bundle was made from, rebuilt from its recorded provenance (``source`` is the
    file whose sha256 was checked: the adapter, or the checkpoint)."""
    from .peft_adapter import METHOD as PEFT_METHOD
    from .peft_adapter import PeftSource, adapter_dir
    from .plain_export import METHOD as CHECKPOINT_METHOD
    from .plain_export import CheckpointSource

    method = provenance.get("method")
    spec = dict(provenance.get("backbone_spec") or {})
    if method not in (PEFT_METHOD, CHECKPOINT_METHOD):
        return source
    if not spec.get("name"):
        raise UsageError(
            f"the bundle's provenance records no backbone for its {method} source",
            "re-create the bundle with this peftx version",
        )
    kwargs: dict[str, Any] = dict(img_size=spec.get("img_size"), model_kwargs=dict(spec.get("model_kwargs") or {}))
    if method == PEFT_METHOD:
        return PeftSource(
            adapter_dir(source),
            model_name=spec["name"],
            weights=spec.get("weights"),
            expected_fingerprint=provenance.get("base_fingerprint"),
            expected_config=provenance.get("adapter_config"),
            **kwargs,
        )
    return CheckpointSource(spec["name"], Path(source), num_classes=provenance.get("num_classes"), **kwargs)
