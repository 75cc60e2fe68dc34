"""``--resume RUN``: continue a run with the configuration it was started with.

* Every option the user gives must equal the run's (after the same normalisation :func:`~.config.resolve` applies:
  absolute paths, the canonical task name, the method's full option values). Anything else is refused, all the
  differences named at once, because a silently ignored ``--seed 42`` or ``--data demo`` is worse than an error.
  Options not given keep the run's values. Runtime options (:data:`~.config.RUNTIME_FIELDS`: device, AMP, workers,
  ...) say how the run executes, not what it computes, and may change.
* The one hyper-parameter that may change is ``epochs``, and only upward: ``--epochs N`` with N larger than the
  run's extends it to N (the schedule is recomputed for the new total, see :mod:`.schedule`; the extension is
  recorded in the checkpoint's loop state and in summary.json). A run cannot be shortened.
* A finished run (every epoch trained, summary.json written) is not trained again and its summary is not rewritten:
  :func:`plan_resume` says it is complete and how to extend it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from ..errors import AdapterFileError, UsageError
from ..preprocess import TRAINING
from .checkpoint import Checkpoint, load_checkpoint
from .config import (
    CLI_OPTIONS,
    DEFAULTS,
    RUNTIME_FIELDS,
    RunConfig,
    TrainConfig,
    check_method_options,
    is_demo_data,
    json_copy,
)
from .rundir import SUMMARY_FILE


@dataclass
class ResumePlan:
    config: RunConfig  # the run's configuration, runtime options and an extension applied
    checkpoint: Checkpoint
    extended_from: int | None  # the run's epochs before this --epochs, when it extends the run


def plan_resume(cfg: TrainConfig) -> ResumePlan:
    """The configuration to continue ``cfg.resume`` with; UsageError for any option that contradicts the run."""
    assert cfg.resume is not None
    ckpt = load_checkpoint(cfg.resume)
    try:
        recorded = TrainConfig.from_dict(ckpt.config)
    except UsageError as e:
        raise AdapterFileError(
            f"{ckpt.path}: the checkpoint's config is damaged ({e.message})",
            "the checkpoint was edited or damaged: restore it, or start the run again",
        ) from None
    missing = [
        n
        for n in (
            "model",
            "method",
            "data",
            "epochs",
            "batch_size",
            "lr",
            "warmup_epochs",
            "cooldown_epochs",
            "min_lr",
            "warmup_lr",
            "seed",
        )
        if getattr(recorded, n) is None
    ]
    if missing:
        raise AdapterFileError(
            f"{ckpt.path}: the checkpoint's config lacks {', '.join(missing)}",
            "the checkpoint was edited or damaged: restore it, or start the run again",
        )
    saved = cast(RunConfig, recorded)  # a resolved run's config, its required fields checked just above
    given = {k: v for k, v in cfg.given().items() if k not in RUNTIME_FIELDS}
    epochs = given.pop("epochs", None)
    differences = _differences(given, saved)
    if differences:
        options = list(dict.fromkeys(CLI_OPTIONS.get(name, name) for name, _ in differences))
        raise UsageError(
            "; ".join(text for _, text in differences),
            f"a resumed run keeps its configuration: drop {', '.join(options)}, or start a new run "
            "with another --output",
        )
    extended_from = None
    if epochs is not None and epochs != saved.epochs:
        if epochs < saved.epochs:
            raise UsageError(
                f"epochs: {epochs} is fewer than the resumed run's {saved.epochs}",
                f"a run cannot be shortened; --epochs N with N > {saved.epochs} extends it",
            )
        extended_from = saved.epochs
    run_dir = Path(cfg.resume)
    if ckpt.state.epoch >= (epochs or saved.epochs) and (run_dir / SUMMARY_FILE).is_file():
        raise UsageError(
            f"{run_dir} is already complete ({ckpt.state.epoch} of {saved.epochs} epochs; its results "
            f"are in {run_dir / SUMMARY_FILE}); nothing was changed",
            f"extend it with: peftx train --resume {run_dir} --epochs N (N > {saved.epochs})",
        )
    runtime = {
        name: getattr(cfg, name) if getattr(cfg, name) is not None else DEFAULTS.get(name)
        for name in RUNTIME_FIELDS
        if name not in ("output", "resume", "eval_batch_size")
    }
    if cfg.eval_batch_size is not None:
        runtime["eval_batch_size"] = cfg.eval_batch_size
    merged = dataclasses.replace(
        saved, **runtime, output=str(run_dir), resume=str(run_dir), epochs=epochs or saved.epochs
    )
    return ResumePlan(merged, ckpt, extended_from)


def _differences(given: dict[str, Any], saved: RunConfig) -> list[tuple[str, str]]:
    """(field, description) of every given option that is not the run's."""
    out = []
    kwargs = dict(given.pop("model_kwargs", None) or {})
    if "img_size" in kwargs and "img_size" not in given:
        given["img_size"] = kwargs["img_size"]
    kwargs.pop("img_size", None)
    if kwargs and json_copy(kwargs) != json_copy(saved.model_kwargs):
        out.append(("model_kwargs", _describe("model_kwargs", kwargs, saved.model_kwargs)))
    options = given.pop("method_options", None)
    if options:
        method = given.get("method", saved.method)
        mine = check_method_options(method, options)
        theirs = check_method_options(saved.method, saved.method_options or {})
        for key in options:
            if key in mine and mine.get(key) != theirs.get(key):
                out.append(("method_options", _describe(f"method_options.{key}", mine[key], theirs.get(key))))
    overrides = given.pop("data_overrides", None)
    if overrides:  # per key, against the preprocessing the run trained with (peftx's default where it gave none)
        theirs = {**TRAINING, **(saved.data_overrides or {})}
        for key, value in overrides.items():
            if json_copy(value) != json_copy(theirs.get(key)):
                out.append(("data_overrides", _describe(f"data_overrides.{key}", value, theirs.get(key))))
    for name, value in given.items():
        ours, theirs = _normalise(name, value), _normalise(name, getattr(saved, name))
        if ours != theirs:
            out.append((name, _describe(name, value, getattr(saved, name))))
    return out


def _describe(name: str, given: Any, saved: Any) -> str:
    return f"{name}: {given!r} differs from the resumed run's {saved!r}"


def _normalise(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name == "data":
        if is_demo_data(value):
            return "demo"
        path = Path(str(value)).expanduser()
        return str(path.absolute()) if path.exists() else str(value)
    if name == "weights":
        return str(Path(str(value)).expanduser().absolute())
    return json_copy(value)


def method_of(resume: str | Path | None) -> str:
    """The method a run is trained with: the resumed run's, or the default for a new run (the CLI maps its shared
    options such as --rank to that method's config fields)."""
    if resume is None:
        return str(DEFAULTS["method"])
    method = load_checkpoint(resume).config.get("method")
    if not isinstance(method, str):
        raise AdapterFileError(
            f"{resume}: the checkpoint does not record its method",
            "the checkpoint was edited or damaged: restore it, or start the run again",
        )
    return method
