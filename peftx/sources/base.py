"""What every model source gives the export: :class:`Loaded`, and the :class:`Source` protocol.

A source is where a fine-tuned model comes from (a peftx run, a peft adapter directory, a plain checkpoint). Each
kind is one class in this package, registered in :data:`peftx.sources.KINDS`; ``merge-export``, ``export`` and
``validate`` take every kind through the same path (:func:`peftx.deploy.merge_export`), so whatever that path checks
or produces applies to all of them alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from torch import nn

from ..adapter import merge_and_unload
from ..errors import UsageError


@dataclass
class Loaded:
    """An unmerged reference (a peftx adapter, a peft adapter, a plain checkpoint), with what the export needs."""

    model: nn.Module
    adapter_path: Path
    config: dict[str, Any]
    data_config: dict[str, Any]
    class_names: list[str]
    # How ``model`` becomes the plain timm model that is exported: peftx's fold, peft's merge_and_unload, a copy.
    merge: Callable[[nn.Module], nn.Module] = merge_and_unload


class Source(Protocol):
    """One kind of model source.

    ``method``: what a bundle made from it records as its provenance's method (None: a peftx run, whose method is
    the adapter's own). ``claims(path)``: whether a path given on the command line is this kind. ``recorded``: the
    source a bundle was made from, rebuilt from its provenance and the file whose sha256 was checked (``validate``).
    """

    method: ClassVar[str | None]

    @classmethod
    def claims(cls, path: Path) -> bool: ...

    @classmethod
    def from_path(cls, path: Path) -> Source: ...

    @classmethod
    def recorded(cls, provenance: Mapping[str, Any], file: Path) -> Source: ...

    def with_overrides(self, **overrides: Any) -> Source: ...

    def load(self) -> Loaded: ...


def recorded_spec(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """The backbone spec a bundle's provenance records (a foreign source cannot be rebuilt without one)."""
    spec = dict(provenance.get("backbone_spec") or {})
    if not spec.get("name"):
        raise UsageError(
            f"the bundle's provenance records no backbone for its {provenance.get('method')} source",
            "re-create the bundle with this peftx version",
        )
    return spec


__all__ = ["Loaded", "Source", "recorded_spec"]
