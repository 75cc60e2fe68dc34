"""Training: :class:`TrainConfig` and :func:`train`, the loop behind ``peftx train``.

The modules are the pieces their names say: ``config`` (TrainConfig, validation, resolve), ``loop`` (the trainer),
``schedule`` (timm's cosine), ``optim`` (AdamW parameter groups), ``seeding``, ``signals``, ``progress`` (events),
``rundir`` (the run directory's files), ``resume`` (what --resume may change), ``checkpoint``, ``distributed``,
``recipes`` and ``regularization`` (residual dropout).

The names below are loaded on first use (PEP 562), so importing one light submodule (``peftx.train.distributed`` from
the evaluator, say) does not import the whole trainer, and the runtime helpers the trainer needs can import it back.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..errors import TrainingInterrupted

_EXPORTS = {
    "TrainConfig": "config",
    "resolve": "config",
    "DEFAULTS": "config",
    "RUNTIME_FIELDS": "config",
    "train": "loop",
    "Trainer": "loop",
    "EVENTS": "progress",
    "lr_at": "schedule",
    "Schedule": "schedule",
    "param_groups": "optim",
    "make_optimizer": "optim",
    "seed_for": "seeding",
    "SeededSamples": "seeding",
    "StopFlag": "signals",
    "stop_on_signals": "signals",
    "METRICS_FILE": "rundir",
    "SUMMARY_FILE": "rundir",
    "CURVES_FILE": "rundir",
}

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

if TYPE_CHECKING:
    from .config import DEFAULTS, RUNTIME_FIELDS, TrainConfig, resolve
    from .loop import Trainer, train
    from .optim import make_optimizer, param_groups
    from .progress import EVENTS
    from .rundir import CURVES_FILE, METRICS_FILE, SUMMARY_FILE
    from .schedule import Schedule, lr_at
    from .seeding import SeededSamples, seed_for
    from .signals import StopFlag, stop_on_signals


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
