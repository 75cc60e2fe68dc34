"""The run's configuration: :class:`TrainConfig`, its validation, and :func:`resolve` (recipe + defaults filled in).

Every field defaults to ``None``, which means "not given": :func:`resolve` fills it from the recipe (the VTAB task's,
the demo's or the generic one, :mod:`.recipes`) or from :data:`DEFAULTS`. Keeping "not given" apart from "given the
default value" is what lets ``--resume`` refuse every option the user passes that differs from the run's, including
one that happens to equal the default (``--seed 42`` on a seed-7 run), while leaving the options not given alone.

Short runs just work: when ``epochs`` is shorter than the recipe's, the recipe's warm-up and cool-down (never values
the user gave) are scaled to the same fraction of the run, e.g. the generic recipe's 3 warm-up epochs of 30 become
0.2 of a 2-epoch run. :func:`resolve` returns a note saying so; an explicit warm-up that does not fit stays an error.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ..backbones import DEMO_MODEL
from ..errors import UsageError
from ..methods import config_class, get_method
from ..runtime import AMP_MODES
from .recipes import GENERIC, Recipe, canonical_task, recipe

DEMO_DATA = ("demo", "digits")

# What a field not given means when the recipe does not say (the recipe fills lr, epochs, batch size, ...).
DEFAULTS: dict[str, Any] = {
    "model": DEMO_MODEL,
    "pretrained": True,
    "model_kwargs": {},
    "method": "rlrr",
    "method_options": {},
    "data": "demo",
    "data_overrides": {},
    "amp": "auto",
    "device": "auto",
    "seed": 42,
    "fast_attention": True,
    "num_workers": 0,
    "overwrite": False,
}

# Runtime-only fields: how a run executes, not what it computes; a resumed run may change them.
RUNTIME_FIELDS = frozenset(
    {
        "device",
        "amp",
        "num_workers",
        "channels_last",
        "fast_attention",
        "output",
        "resume",
        "overwrite",
        "eval_batch_size",
    }
)

# The CLI option behind each field, for hints (a library user reads the field name beside it).
CLI_OPTIONS = {
    "epochs": "--epochs",
    "warmup_epochs": "--warmup-epochs",
    "batch_size": "--batch-size",
    "lr": "--lr",
    "weight_decay": "--weight-decay",
    "min_lr": "--min-lr",
    "dropout": "--dropout",
    "hflip": "--hflip/--no-hflip",
    "img_size": "--img-size",
    "seed": "--seed",
    "model": "--model",
    "weights": "--weights",
    "method": "--method",
    "method_options": "--rank/--alpha/--targets/--init",
    "data": "--data",
    "task": "--task",
    "data_overrides": "--crop-mode/--crop-pct",
}


@dataclass
class TrainConfig:
    """Everything a training run depends on. ``None`` = not given: filled by :func:`resolve`."""

    model: str | None = None  # a timm name (optionally name.tag); default: the embedded demo backbone
    weights: str | None = None  # backbone weights file (.safetensors / torch tensors); None = the model's own
    pretrained: bool | None = None  # False: random init (ablations, tests); the init seed is recorded to rebuild it
    model_kwargs: dict[str, Any] | None = None  # extra timm create_model kwargs (depth=..., ...)
    method: str | None = None  # default rlrr
    method_options: dict[str, Any] | None = None  # the method config's fields (r=4, targets=[...])
    data: str | None = None  # 'demo' (sklearn digits, the default), an ImageFolder root, or a VTAB-1k task directory
    data_overrides: dict[str, Any] | None = None  # preprocessing overrides (mean, std, ...)
    task: str | None = None  # VTAB-1k task name: selects the paper's per-task recipe
    epochs: int | None = None  # total epochs, warm-up and cool-down included
    batch_size: int | None = None  # GLOBAL batch (split over processes under torchrun)
    lr: float | None = None
    weight_decay: float | None = None
    warmup_epochs: float | None = None  # may be fractional: the warm-up is per step
    cooldown_epochs: int | None = None  # epochs at min_lr after the cosine (the paper: 10)
    min_lr: float | None = None
    warmup_lr: float | None = None
    dropout: float | None = None  # residual dropout rate of the last block (linspace(0, p, depth))
    hflip: bool | None = None
    img_size: int | None = None
    amp: str | None = None  # auto | bf16 | fp16 | off
    device: str | None = None  # auto | cpu | cuda[:N]
    seed: int | None = None  # default 42
    channels_last: bool | None = None  # None: on for CUDA
    fast_attention: bool | None = None  # train with timm's fused SDPA attention (same function; exports unaffected)
    num_workers: int | None = None
    eval_batch_size: int | None = None  # None: 2x batch_size
    output: str | None = None  # run directory; None: runs/<method>-<data>-<timestamp> (or the resume directory)
    resume: str | None = None  # run directory to continue from its checkpoint/last.safetensors
    overwrite: bool | None = None  # allow writing a new run into a directory that already holds one
    limit_train_batches: int | None = None  # cap on steps per epoch (tests, smoke runs)

    def __post_init__(self) -> None:
        for name in ("model_kwargs", "method_options", "data_overrides"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                raise UsageError(f"{name}: expected a mapping, got {type(value).__name__}")
        if self.method is not None:
            try:
                get_method(self.method)
            except UsageError as e:  # the registry's message, under the field's name like every other field
                raise UsageError(f"method: {e.message}", e.hint) from None
        if self.amp is not None:
            _check_choice("amp", self.amp, AMP_MODES)
        if self.device is not None and not (
            self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:")
        ):
            raise UsageError(f"device: {self.device!r} is not a device", "use auto, cpu or cuda")
        if self.task is not None:
            self.task = canonical_task(self.task)
        if self.method_options and (self.method is not None or self.resume is None):
            check_method_options(self.method or DEFAULTS["method"], self.method_options)  # a resume checks later
        for name in ("epochs", "batch_size", "img_size", "limit_train_batches", "eval_batch_size"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("cooldown_epochs", "num_workers", "seed"):
            _check_int(name, getattr(self, name), minimum=0)
        _check_float("lr", self.lr, positive=True)
        for name in ("weight_decay", "min_lr", "warmup_lr", "warmup_epochs"):
            _check_float(name, getattr(self, name), positive=False)
        if self.dropout is not None and not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise UsageError(f"dropout: {self.dropout!r} is outside [0, 1)", "residual dropout rate, e.g. 0.1")
        _check_schedule_fits(self.epochs, self.warmup_epochs, self.cooldown_epochs)
        kwargs = self.model_kwargs or {}
        if "img_size" in kwargs and self.img_size is not None and kwargs["img_size"] != self.img_size:
            raise UsageError(
                f"img_size: {self.img_size} conflicts with model_kwargs img_size {kwargs['img_size']}",
                "give the size once",
            )
        if self.resume is not None and self.output is not None and Path(self.output) != Path(self.resume):
            raise UsageError(
                f"output: {self.output} differs from the resumed run {self.resume}",
                "a resumed run continues in its own directory: drop --output",
            )

    def given(self) -> dict[str, Any]:
        """The fields that were set (not None): what the user asked for."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def recipe(self) -> Recipe:
        """Where the hyper-parameters not given come from: the VTAB task's recipe, the demo's, or the generic one."""
        if self.task is not None:
            return recipe(self.task)
        if is_demo_data(self.data if self.data is not None else DEFAULTS["data"]):
            return recipe(None)
        return GENERIC

    def resolved(self) -> RunConfig:
        """A copy with every field filled (see :func:`resolve`)."""
        return resolve(self).config

    def to_dict(self) -> dict[str, Any]:
        return json_copy(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UsageError(f"train config: unknown field(s) {unknown}", f"valid fields: {', '.join(sorted(known))}")
        return cls(**d)


if TYPE_CHECKING:

    class RunConfig(TrainConfig):
        """For the type checker only: a TrainConfig after :func:`resolve`, so these fields are never None (at run time
        it IS TrainConfig; resolve() and a resumed run's checked config are where the narrowing is established)."""

        model: str
        pretrained: bool
        model_kwargs: dict[str, Any]
        method: str
        method_options: dict[str, Any]
        data: str
        data_overrides: dict[str, Any]
        epochs: int
        batch_size: int
        lr: float
        weight_decay: float
        warmup_epochs: float
        cooldown_epochs: int
        min_lr: float
        warmup_lr: float
        dropout: float
        hflip: bool
        amp: str
        device: str
        seed: int
        fast_attention: bool
        num_workers: int
        eval_batch_size: int
        overwrite: bool
else:
    RunConfig = TrainConfig


@dataclass
class Resolved:
    config: RunConfig  # every field filled, paths absolute
    notes: list[str]  # what resolve() adjusted on its own (shown before the first step)


def resolve(cfg: TrainConfig) -> Resolved:
    """Every None filled from the recipe or :data:`DEFAULTS`, paths made absolute (so a resume works anywhere), and
    the recipe's warm-up / cool-down scaled to a run shorter than the recipe's."""
    r = cfg.recipe()
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    for name, default in DEFAULTS.items():
        if values[name] is None:
            values[name] = default
    kwargs = dict(values["model_kwargs"])
    if values["img_size"] is None and "img_size" in kwargs:
        values["img_size"] = kwargs["img_size"]
    kwargs.pop("img_size", None)
    values["model_kwargs"] = json_copy(kwargs)
    values["method_options"] = json_copy(values["method_options"])
    values["data_overrides"] = json_copy(values["data_overrides"])
    from_recipe = {name for name in r.to_dict() if name in values and values[name] is None}
    for name in from_recipe:
        values[name] = getattr(r, name)
    notes = _fit_schedule(values, r, from_recipe)
    scale = get_method(values["method"]).recipe_lr_scale
    if "lr" in from_recipe and scale != 1:  # the recipes' learning rates are tuned for adapters
        values["lr"] = values["lr"] * scale
        notes.append(
            f"lr {r.lr:g} x {scale:g} = {values['lr']:g}: {values['method']} takes {scale:g} of the "
            "recipe's adapter learning rate (--lr sets it)"
        )
    _check_schedule_fits(values["epochs"], values["warmup_epochs"], values["cooldown_epochs"])
    if values["eval_batch_size"] is None:
        values["eval_batch_size"] = 2 * values["batch_size"]
    if values["weights"] is not None:
        values["weights"] = str(Path(values["weights"]).expanduser().absolute())
    if not is_demo_data(values["data"]) and Path(values["data"]).expanduser().exists():
        values["data"] = str(Path(values["data"]).expanduser().absolute())
    return Resolved(cast(RunConfig, TrainConfig(**values)), notes)


def _fit_schedule(values: dict[str, Any], r: Recipe, from_recipe: set[str]) -> list[str]:
    """Scale the recipe's warm-up / cool-down to a run shorter than the recipe's (same fraction of the run)."""
    epochs, notes = values["epochs"], list[str]()
    if epochs >= r.epochs:
        return notes
    frac = epochs / r.epochs
    if "warmup_epochs" in from_recipe and r.warmup_epochs > 0:
        values["warmup_epochs"] = round(r.warmup_epochs * frac, 4)
        notes.append(
            f"warm-up {_num(r.warmup_epochs)} -> {_num(values['warmup_epochs'])} epochs: the recipe's "
            f"{_num(r.warmup_epochs)} of {r.epochs}, scaled to this {epochs}-epoch run (--warmup-epochs "
            "sets it)"
        )
    if "cooldown_epochs" in from_recipe and r.cooldown_epochs > 0:
        values["cooldown_epochs"] = math.floor(r.cooldown_epochs * frac)
        notes.append(
            f"cool-down {r.cooldown_epochs} -> {values['cooldown_epochs']} epochs: the recipe's "
            f"{r.cooldown_epochs} of {r.epochs}, scaled to this {epochs}-epoch run"
        )
    return notes


def _check_schedule_fits(epochs: int | None, warmup: float | None, cooldown: int | None) -> None:
    if None in (epochs, warmup, cooldown):
        return
    assert epochs is not None and warmup is not None and cooldown is not None
    if warmup + cooldown > epochs:
        raise UsageError(
            f"epochs: {epochs} is fewer than warmup_epochs + cooldown_epochs ({_num(warmup)} + {cooldown})",
            "shorten the warm-up with --warmup-epochs (it may be fractional, e.g. 0.5) or train longer with --epochs",
        )


def check_method_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The method config's full field values for ``options``; unknown / bad options fail now, before any loading."""
    try:
        return config_class(method).from_dict(dict(options)).to_dict()
    except UsageError as e:
        raise UsageError(f"method_options: {e.message}", e.hint) from None


def is_demo_data(data: Any) -> bool:
    return str(data).strip().lower() in DEMO_DATA


def _num(x: float) -> str:
    return f"{x:g}"


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{name}: {value!r} is not one of {', '.join(choices)}", f"choose from {', '.join(choices)}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{name}: {value!r} must be an integer >= {minimum}", "see `peftx train --help`")


def _check_float(name: str, value: Any, positive: bool) -> None:
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise UsageError(
            f"{name}: {value!r} must be a {'positive' if positive else 'non-negative'} finite number",
            "see `peftx train --help`",
        )


def json_copy(value: Any) -> Any:
    """JSON round trip: tuples become lists, so a config compares equal to its saved copy."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        raise UsageError(
            f"configuration value {value!r} is not JSON-serialisable", "use plain numbers, strings, lists and mappings"
        ) from None
