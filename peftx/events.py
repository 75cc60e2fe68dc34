"""Progress events: what the library reports while it works, one small frozen dataclass each.

The library prints nothing. A long call (``train``, ``compare``, ``merge_export``) takes ``progress``, a callable that
receives these objects as they happen; the CLI hands it its one renderer (``peftx.cli.render``). Each class's
``name`` is the event's name on the wire: ``compare``'s worker process sends a training event as one JSON line
``{"event": name, **fields}`` and :func:`from_message` turns it back into the same class.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class Event:
    """The base of every progress event."""

    name: ClassVar[str] = ""

    def fields(self) -> dict[str, Any]:
        """The event's fields by name (shallow: values are not copied)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


Progress = Callable[[Event], None]


def quiet(_event: Event) -> None:
    """The callback that drops every event."""


# -- training (peftx.train.train), in the order a run emits them ---------------------------------------------------


@dataclass(frozen=True)
class TrainStart(Event):
    """Before the first step: the effective configuration.

    ``config``: the resolved TrainConfig as a dict; ``notes``: what was adjusted on its own (e.g. a warm-up scaled to a
    short run); ``extended_from``: the epochs of a run that --epochs extends, else None; ``preprocessing``: the run's
    preprocessing contract (peftx.preprocess); ``source``: the data, described; ``skipped_files``: non-image files
    left out of an ImageFolder; ``val_drawn``: how val was drawn from train/ when the folder has no val/, else None;
    ``image_modes``: image files per PIL mode and ``exif_rotated``: files an EXIF orientation turns, both what
    peftx.preprocess.to_rgb decodes ({} and 0 for in-memory data).
    """

    name: ClassVar[str] = "start"
    run_dir: str
    epochs: int
    start_epoch: int
    steps_per_epoch: int
    device: str
    amp: str
    world_size: int
    train_size: int
    val_size: int
    test_size: int
    trainable_params: int
    total_params: int
    resumed: bool
    config: dict[str, Any]
    notes: list[str]
    extended_from: int | None
    preprocessing: dict[str, Any]
    source: Any
    skipped_files: list[str]
    val_drawn: dict[str, Any] | None
    image_modes: dict[str, int] = field(default_factory=dict)
    exif_rotated: int = 0


@dataclass(frozen=True)
class EpochStart(Event):
    name: ClassVar[str] = "epoch_start"
    epoch: int  # 1-based
    epochs: int
    steps: int
    start_step: int  # > 0 when a resumed run continues mid-epoch


@dataclass(frozen=True)
class Step(Event):
    name: ClassVar[str] = "step"
    epoch: int
    step: int
    steps: int
    global_step: int
    loss: float
    lr: float


@dataclass(frozen=True)
class Estimate(Event):
    """Once, after the first few steps of this process: the time the rest of the run will take (steps x the measured
    step time; evaluation estimated as forward-only, a third of a training step per image)."""

    name: ClassVar[str] = "estimate"
    seconds_per_step: float
    measured_steps: int
    steps_remaining: int
    train_seconds: float
    eval_seconds: float
    total_seconds: float


@dataclass(frozen=True)
class EpochEnd(Event):
    """An epoch trained and validated (the record metrics.jsonl holds, and the best epoch so far)."""

    name: ClassVar[str] = "epoch"
    epoch: int
    epochs: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    lr: float
    img_per_s: float | None
    seconds: float
    global_step: int
    best: bool
    best_epoch: int | None  # set from the first epoch on
    best_val_accuracy: float | None


@dataclass(frozen=True)
class CheckpointSaved(Event):
    name: ClassVar[str] = "checkpoint"
    path: str
    epoch: int
    step: int
    reason: str  # epoch | interrupt | step


@dataclass(frozen=True)
class TestResult(Event):
    __test__ = False  # not a pytest test class
    name: ClassVar[str] = "test"
    accuracy: float | None
    loss: float | None
    n: int | None
    best_epoch: int | None


@dataclass(frozen=True)
class TrainDone(Event):
    name: ClassVar[str] = "done"
    summary: dict[str, Any]


TRAIN_EVENTS: tuple[type[Event], ...] = (
    TrainStart,
    EpochStart,
    Step,
    Estimate,
    EpochEnd,
    CheckpointSaved,
    TestResult,
    TrainDone,
)
# What compare's worker process forwards (not "done": compare reads summary.json; not "estimate": compare shows none).
FORWARDED: tuple[type[Event], ...] = (TrainStart, EpochStart, Step, EpochEnd, CheckpointSaved, TestResult)
_FORWARDED_BY_NAME = {cls.name: cls for cls in FORWARDED}


def to_message(event: Event) -> dict[str, Any]:
    """A forwarded event as one JSON-able message ``{"event": name, **fields}``."""
    return {"event": event.name, **event.fields()}


def from_message(message: dict[str, Any]) -> Event | None:
    """The event a worker's message carries, or None for a message that is not a forwarded event."""
    cls = _FORWARDED_BY_NAME.get(str(message.get("event")))
    if cls is None:
        return None
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in message.items() if k in names})


# -- a comparison (peftx.compare.compare) --------------------------------------------------------------------------


@dataclass(frozen=True)
class ComparePlan(Event):
    name: ClassVar[str] = "plan"
    runs: list[dict[str, Any]]  # [{method, seed, action}]; action: new | resume | skip | failed | invalid


@dataclass(frozen=True)
class CompareRunStart(Event):
    name: ClassVar[str] = "run_start"
    method: str
    seed: int
    index: int
    total: int
    action: str


@dataclass(frozen=True)
class CompareTrain(Event):
    """A training event of the run that is training now."""

    name: ClassVar[str] = "train"
    method: str
    seed: int
    event: Event


@dataclass(frozen=True)
class CompareRunEnd(Event):
    name: ClassVar[str] = "run_end"
    row: dict[str, Any]
    index: int
    total: int


@dataclass(frozen=True)
class CompareLatency(Event):
    name: ClassVar[str] = "latency"
    latency: Any


@dataclass(frozen=True)
class CompareDone(Event):
    name: ClassVar[str] = "done"
    result: dict[str, Any]


# -- building a bundle (peftx.deploy.merge_export, export --weights, byo) ------------------------------------------


@dataclass(frozen=True)
class ExportStep(Event):
    """One step of building or checking a bundle, said in a few words ("merging", "exporting ONNX")."""

    name: ClassVar[str] = "export_step"
    message: str


def steps_to(progress: Progress | None) -> Callable[[str], None]:
    """A ``say(message)`` for the bundle writer whose words reach ``progress`` as :class:`ExportStep` events."""
    if progress is None:
        return lambda _m: None
    return lambda message: progress(ExportStep(message))


__all__ = [
    "Event",
    "Progress",
    "quiet",
    "TrainStart",
    "EpochStart",
    "Step",
    "Estimate",
    "EpochEnd",
    "CheckpointSaved",
    "TestResult",
    "TrainDone",
    "TRAIN_EVENTS",
    "FORWARDED",
    "to_message",
    "from_message",
    "ComparePlan",
    "CompareRunStart",
    "CompareTrain",
    "CompareRunEnd",
    "CompareLatency",
    "CompareDone",
    "ExportStep",
    "steps_to",
]
