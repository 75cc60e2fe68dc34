"""Progress reporting: the library prints nothing; it hands typed events (:mod:`peftx.events`) to the caller's
``progress`` callable. :data:`EVENTS` names each training event and its fields, in the order a run emits them."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..distributed import DistInfo
from ..errors import UsageError
from ..events import TRAIN_EVENTS, Progress, quiet

EVENTS: dict[str, tuple[str, ...]] = {cls.name: tuple(f.name for f in dataclasses.fields(cls)) for cls in TRAIN_EVENTS}


def emitter(progress: Any, info: DistInfo) -> Progress:
    """The callback for this process: rank 0 reports, the other ranks are silent."""
    if progress is None or not info.is_main:
        return quiet
    if not callable(progress):
        raise UsageError("progress must be a callable that takes one event (peftx.events)")
    return progress


__all__ = ["EVENTS", "Progress", "emitter"]
