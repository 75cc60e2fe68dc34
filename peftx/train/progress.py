"""Progress reporting: the library prints nothing; it calls ``progress(event, **fields)`` (see :data:`EVENTS`), or
drives a ``rich.progress.Progress`` handed in by the caller (the CLI composes both: it prints the ``start`` and
``estimate`` events and hands the rest to :func:`rich_progress`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import UsageError
from .distributed import DistInfo

# progress(event, **fields): the events and their fields, in the order a run emits them.
EVENTS: dict[str, tuple[str, ...]] = {
    # before the first step: the effective configuration (``config``: the resolved TrainConfig as a dict; ``notes``:
    # what was adjusted on its own, e.g. a warm-up scaled to a short run; ``extended_from``: the epochs of a run
    # that --epochs extends, else None; ``preprocessing``: the run's preprocessing contract, peftx.preprocess;
    # ``source``: the data, described; ``skipped_files``: non-image files left out of an ImageFolder; ``val_drawn``:
    # how val was drawn from train/ when the folder has no val/, else None; ``image_modes``: image files per PIL mode
    # and ``exif_rotated``: files an EXIF orientation turns, both what peftx.preprocess.to_rgb decodes; {} and 0 for
    # in-memory data)
    "start": (
        "run_dir",
        "epochs",
        "start_epoch",
        "steps_per_epoch",
        "device",
        "amp",
        "world_size",
        "train_size",
        "val_size",
        "test_size",
        "trainable_params",
        "total_params",
        "resumed",
        "config",
        "notes",
        "extended_from",
        "preprocessing",
        "source",
        "skipped_files",
        "val_drawn",
        "image_modes",
        "exif_rotated",
    ),
    "epoch_start": ("epoch", "epochs", "steps", "start_step"),
    "step": ("epoch", "step", "steps", "global_step", "loss", "lr"),
    # once, after the first few steps of this process: the time the rest of the run will take (steps x the measured
    # step time; evaluation estimated as forward-only, a third of a training step per image)
    "estimate": (
        "seconds_per_step",
        "measured_steps",
        "steps_remaining",
        "train_seconds",
        "eval_seconds",
        "total_seconds",
    ),
    "epoch": (
        "epoch",
        "epochs",
        "train_loss",
        "val_loss",
        "val_accuracy",
        "lr",
        "img_per_s",
        "seconds",
        "global_step",
        "best",
        "best_epoch",
        "best_val_accuracy",
    ),
    "checkpoint": ("path", "epoch", "step", "reason"),
    "test": ("accuracy", "loss", "n", "best_epoch"),
    "done": ("summary",),
}
Progress = Callable[..., None]


def rich_progress(progress: Any) -> Progress:
    """Adapt a ``rich.progress.Progress`` (owned and started by the caller) to the event callback."""
    tasks: dict[str, Any] = {}

    def on(event: str, **f: Any) -> None:
        if event == "start":
            tasks["run"] = progress.add_task("epochs", total=f["epochs"], completed=f["start_epoch"])
        elif event == "epoch_start":
            if "epoch" in tasks:
                progress.remove_task(tasks["epoch"])
            tasks["epoch"] = progress.add_task(
                f"epoch {f['epoch']}/{f['epochs']}", total=f["steps"], completed=f["start_step"]
            )
        elif event == "step":
            progress.update(
                tasks["epoch"],
                completed=f["step"],
                description=f"epoch {f['epoch']} loss {f['loss']:.4f} lr {f['lr']:.2e}",
            )
        elif event == "epoch":
            progress.update(
                tasks["run"],
                completed=f["epoch"],
                description=f"epochs (val {100 * f['val_accuracy']:.1f} %, best "
                f"{100 * f['best_val_accuracy']:.1f} % @ {f['best_epoch']})",
            )

    return on


def emitter(progress: Any, info: DistInfo) -> Progress:
    """The callback for this process: rank 0 reports, the other ranks are silent."""
    if progress is None or not info.is_main:
        return lambda event, **fields: None
    if hasattr(progress, "add_task") and hasattr(progress, "update"):
        return rich_progress(progress)
    if not callable(progress):
        raise UsageError("progress must be a callable progress(event, **fields) or a rich.progress.Progress")
    return progress
