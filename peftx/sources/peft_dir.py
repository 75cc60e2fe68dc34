"""A Hugging Face peft adapter directory for a timm model (``adapter_config.json`` + ``adapter_model.safetensors``).

The unmerged model is peft's own ``PeftModel`` around the plain timm backbone; it merges with peft's
``merge_and_unload``, checked to give the plain timm model back. Reading and checking the files is
:mod:`peftx.peft_adapter`'s.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..adapter import fingerprint
from ..backbones import create_backbone, data_config, inspect_checkpoint
from ..errors import AdapterFileError, AdapterMismatchError, UsageError
from ..peft_adapter import (
    KEY_PREFIX,
    METHOD,
    PEFT_CONFIG_FILE,
    SOURCE_FILE,
    PeftDir,
    adapter_dir,
    check_recorded_class,
    check_supported,
    classifier_path,
    import_peft,
    inject_and_load,
    is_peft_dir,
    merge_peft,
    read_peft_dir,
    resolve_name,
)
from .base import Loaded, recorded_spec
from .spec import rebuild_model


@dataclass(frozen=True)
class PeftSource:
    """A peft adapter directory and the timm backbone to load it onto (what ``merge-export PEFT_DIR`` needs).

    ``model_name`` / ``weights`` / ``img_size`` default to what the adapter records (peftx_source.json, peft's
    base_model_name_or_path). ``expected_fingerprint`` and ``expected_config`` are what a bundle recorded, so that
    ``validate`` refuses base weights or an adapter config that changed since.
    """

    path: Path
    model_name: str | None = None
    weights: Path | str | None = None
    img_size: int | None = None
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    class_names: tuple[str, ...] | None = None
    expected_fingerprint: str | None = None
    expected_config: Mapping[str, Any] | None = None

    method: ClassVar[str | None] = METHOD

    @classmethod
    def claims(cls, path: Path) -> bool:
        return is_peft_dir(path)

    @classmethod
    def from_path(cls, path: Path) -> PeftSource:
        return cls(Path(path))

    @classmethod
    def recorded(cls, provenance: Mapping[str, Any], file: Path) -> PeftSource:
        spec = recorded_spec(provenance)
        return cls(
            adapter_dir(file),
            model_name=spec["name"],
            weights=spec.get("weights"),
            img_size=spec.get("img_size"),
            model_kwargs=dict(spec.get("model_kwargs") or {}),
            expected_fingerprint=provenance.get("base_fingerprint"),
            expected_config=provenance.get("adapter_config"),
        )

    def with_overrides(self, **overrides: Any) -> PeftSource:
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def load(self) -> Loaded:
        """The UNMERGED model inside peft, as :class:`~peftx.sources.base.Loaded` (its ``merge`` is peft's
        merge_and_unload, checked to give the plain timm model)."""
        pd = read_peft_dir(self.path)
        check_supported(pd.config, pd.path / PEFT_CONFIG_FILE)
        if self.expected_config is not None and dict(self.expected_config) != pd.config:
            raise AdapterMismatchError(
                f"{pd.path / PEFT_CONFIG_FILE} changed since the bundle was made",
                "pass --adapter with the adapter the bundle was made from, or re-export",
            )
        peft = import_peft()
        name = resolve_name(pd, self.model_name)
        spec = self._spec(pd, name)
        head, num_classes = self._head_and_classes(pd, spec)
        plain = rebuild_model({"spec": spec, "num_classes": num_classes}).eval()
        fp = fingerprint(plain, head)
        self._check_fingerprint(pd, fp, spec)
        plain_shapes = {k: tuple(v.shape) for k, v in plain.state_dict().items()}
        reference = inject_and_load(peft, pd, plain, name)
        record = {
            "method": METHOD,
            "config": pd.config,
            "base_model": name,
            "spec": spec,
            "base_fingerprint": fp,
            "num_classes": num_classes,
            "trainable_params": sum(t.numel() for t in pd.tensors.values()),
            "data": (pd.source or {}).get("data"),
        }
        data_cfg = dict((pd.source or {}).get("data_config") or data_config(plain))
        merge = functools.partial(merge_peft, plain_class=type(plain), plain_shapes=plain_shapes)
        return Loaded(reference, pd.weights_file, record, data_cfg, self._class_names(pd, num_classes), merge)

    # -- steps --------------------------------------------------------------------------------------------------
    def _spec(self, pd: PeftDir, name: str) -> dict[str, Any]:
        recorded = dict((pd.source or {}).get("spec") or {})
        spec = {**recorded, "name": name}
        spec.setdefault("pretrained", True)
        if self.weights is not None:
            spec["weights"], spec["pretrained"] = str(self.weights), True
        if self.img_size is not None:
            spec["img_size"] = self.img_size
        if self.model_kwargs:
            spec["model_kwargs"] = dict(self.model_kwargs)
        return spec

    def _head_and_classes(self, pd: PeftDir, spec: dict[str, Any]) -> tuple[str, int]:
        """The classifier's module path, and the class count: the adapter's saved head, else the weights' head."""
        kwargs = dict(spec.get("model_kwargs") or {})
        with torch.device("meta"):  # structure only: no weights, no memory
            meta = create_backbone(
                spec["name"], num_classes=1, pretrained=False, img_size=spec.get("img_size"), **kwargs
            )
        check_recorded_class(pd, meta, spec["name"])
        head = classifier_path(meta, spec["name"])
        saved = pd.tensors.get(f"{KEY_PREFIX}{head}.weight")
        if saved is not None:
            return head, int(saved.shape[0])
        if spec.get("weights") and spec.get("pretrained", True):
            n = inspect_checkpoint(spec["name"], spec["weights"], img_size=spec.get("img_size"), **kwargs).num_classes
        else:
            n = int((pd.source or {}).get("num_classes") or 0)
        if n < 1:
            raise AdapterFileError(
                f"{pd.path}: the adapter saves no classifier ({head} is not in modules_to_save) "
                f"and the base weights have none",
                f"train the head with modules_to_save=['{head}'], or pass --weights with the fine-tuned head",
            )
        return head, n

    def _check_fingerprint(self, pd: PeftDir, fp: str, spec: dict[str, Any]) -> None:
        for recorded, where in (
            (self.expected_fingerprint, "the bundle"),
            ((pd.source or {}).get("base_fingerprint"), pd.path / SOURCE_FILE),
        ):
            if recorded and recorded != fp:
                raise AdapterMismatchError(
                    f"{pd.path} was trained on other base weights (fingerprint {str(recorded)[:12]} in {where}, "
                    f"this backbone {fp[:12]})",
                    f"load it onto {spec['name']} with the weights it was trained on",
                )

    def _class_names(self, pd: PeftDir, num_classes: int) -> list[str]:
        names = list(self.class_names or (pd.source or {}).get("class_names") or [])
        if names and len(names) != num_classes:
            raise UsageError(
                f"{len(names)} class names for the {num_classes} classes of {pd.path}'s head",
                "pass one name per class, in the head's order",
            )
        return names or [str(i) for i in range(num_classes)]


__all__ = ["PeftSource"]
