"""Training: :class:`TrainConfig` and :func:`train`, the loop behind ``peftx train``.

The modules are the pieces their names say: ``config`` (TrainConfig, validation, resolve), ``loop`` (the trainer),
``schedule`` (timm's cosine), ``optim`` (AdamW parameter groups), ``seeding``, ``signals``, ``progress`` (events),
``rundir`` (the run directory's files), ``resume`` (what --resume may change), ``checkpoint``, ``recipes`` and
``regularization`` (residual dropout). Process groups and sharding are :mod:`peftx.distributed`'s (evaluation uses
them too).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..errors import TrainingInterrupted

if TYPE_CHECKING:  # the names below, as type checkers see them; at run time they load on first use (PEP 562)
    from .config import DEFAULTS, RUNTIME_FIELDS, TrainConfig, resolve
    from .loop import Trainer, train
    from .optim import make_optimizer, param_groups
    from .progress import EVENTS
    from .rundir import CURVES_FILE, METRICS_FILE, SUMMARY_FILE
    from .schedule import Schedule, lr_at
    from .seeding import SeededSamples, seed_for
    from .signals import StopFlag, stop_on_signals

# name -> its module. Lazy, as peftx.exports: `peftx --help` reads the recipes (peftx.train.recipes) without the
# trainer's torch and timm.
_PUBLIC = {
    **dict.fromkeys(("DEFAULTS", "RUNTIME_FIELDS", "TrainConfig", "resolve"), "config"),
    **dict.fromkeys(("Trainer", "train"), "loop"),
    **dict.fromkeys(("make_optimizer", "param_groups"), "optim"),
    "EVENTS": "progress",
    **dict.fromkeys(("CURVES_FILE", "METRICS_FILE", "SUMMARY_FILE"), "rundir"),
    **dict.fromkeys(("Schedule", "lr_at"), "schedule"),
    **dict.fromkeys(("SeededSamples", "seed_for"), "seeding"),
    **dict.fromkeys(("StopFlag", "stop_on_signals"), "signals"),
}


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    try:  # a submodule used as an attribute (peftx.train.loop) loads as it did when this file imported it
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":  # the submodule exists; something it imports is missing
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


__all__ = [
    "TrainingInterrupted",
    "TrainConfig",
    "resolve",
    "DEFAULTS",
    "RUNTIME_FIELDS",
    "train",
    "Trainer",
    "EVENTS",
    "lr_at",
    "Schedule",
    "param_groups",
    "make_optimizer",
    "seed_for",
    "SeededSamples",
    "StopFlag",
    "stop_on_signals",
    "METRICS_FILE",
    "SUMMARY_FILE",
    "CURVES_FILE",
]
