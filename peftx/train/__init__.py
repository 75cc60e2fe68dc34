"""Training: :class:`TrainConfig` and :func:`train`, the loop behind ``peftx train``.

The modules are the pieces their names say: ``config`` (TrainConfig, validation, resolve), ``loop`` (the trainer),
``schedule`` (timm's cosine), ``optim`` (AdamW parameter groups), ``seeding``, ``signals``, ``progress`` (events),
``rundir`` (the run directory's files), ``resume`` (what --resume may change), ``checkpoint``, ``recipes`` and
``regularization`` (residual dropout). Process groups and sharding are :mod:`peftx.distributed`'s (evaluation uses
them too).
"""

from __future__ import annotations

from ..errors import TrainingInterrupted
from .config import DEFAULTS, RUNTIME_FIELDS, TrainConfig, resolve
from .loop import Trainer, train
from .optim import make_optimizer, param_groups
from .progress import EVENTS
from .rundir import CURVES_FILE, METRICS_FILE, SUMMARY_FILE
from .schedule import Schedule, lr_at
from .seeding import SeededSamples, seed_for
from .signals import StopFlag, stop_on_signals

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
