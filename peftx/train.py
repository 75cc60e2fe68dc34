"""Training: :class:`TrainConfig` and :func:`train`, the loop behind ``peftx train``.

One run = one directory::

    adapter.safetensors, adapter_config.json   best epoch on VALIDATION (never on test)
    metrics.jsonl                              one line per epoch
    summary.json                               selection, test accuracy at the selected epoch, cost
    curves.png                                 loss / accuracy per epoch
    checkpoint/last.safetensors                resumable state, rewritten atomically every epoch and on SIGINT/SIGTERM

The library prints nothing: it reports through ``progress(event, **fields)`` (see :data:`EVENTS`), or drives a
``rich.progress.Progress`` handed in by the caller.

Reproducibility: with a fixed seed on CPU, a run resumed from any checkpoint (epoch end or mid-epoch) ends with the
same adapter, bit for bit, as the uninterrupted run. The data order is a function of (seed, epoch), each sample's
augmentation a function of (seed, epoch, index), and each step's dropout a function of (seed, step, rank); the
learning rate is a function of the step. Nothing random is carried from one step to the next.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import random
import resource
import signal
import struct
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .adapter import adapt, count_parameters, split_weight_decay, state_of, trainable_names
from .backbones import DEMO_MODEL
from .adapter_io import ADAPTER_FILE, CONFIG_FILE, check_tensors, read_adapter, save_adapter
from .checkpoint import LoopState, checkpoint_path, load_checkpoint, restore_optimizer, save_checkpoint
from .distributed import DistInfo, EpochSampler, any_rank, all_reduce_sum, init_distributed, shutdown
from .errors import NonFiniteError, OutputError, TrainingInterrupted, UsageError
from .evaluate import (AMP_MODES, autocast, eval_loader, evaluate_model, resolve_amp, resolve_device, to_device,
                       use_fused_attention)
from .fsutil import ensure_dir, output_error, write_text_atomic
from .methods import config_class, get_method, method_names
from .recipes import GENERIC, Recipe, canonical_task, recipe
from .regularization import add_residual_dropout, residual_dropout_removed

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CURVES_FILE = "curves.png"

# progress(event, **fields): the events and their fields, in the order a run emits them.
EVENTS: dict[str, tuple[str, ...]] = {
    "start": ("run_dir", "epochs", "start_epoch", "steps_per_epoch", "device", "amp", "world_size", "train_size",
              "val_size", "test_size", "trainable_params", "total_params", "resumed"),
    "epoch_start": ("epoch", "epochs", "steps", "start_step"),
    "step": ("epoch", "step", "steps", "global_step", "loss", "lr"),
    "epoch": ("epoch", "epochs", "train_loss", "val_loss", "val_accuracy", "lr", "img_per_s", "seconds",
              "global_step", "best", "best_epoch", "best_val_accuracy"),
    "checkpoint": ("path", "epoch", "step", "reason"),
    "test": ("accuracy", "loss", "n", "best_epoch"),
    "done": ("summary",),
}
Progress = Callable[..., None]

# Runtime-only fields: how a run executes, not what it computes; a resumed run may change them.
_RUNTIME_FIELDS = frozenset({"device", "amp", "num_workers", "channels_last", "fast_attention", "output", "resume",
                             "overwrite", "eval_batch_size"})
_DEMO_DATA = ("demo", "digits")


# -- config -----------------------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Everything a training run depends on. ``None`` = take the value from the recipe (see :meth:`resolved`)."""

    model: str = DEMO_MODEL  # a timm name (optionally name.tag); the default is the embedded demo backbone
    weights: str | None = None  # backbone weights file (.safetensors / torch tensors); None = the model's own
    pretrained: bool = True  # False: random init (ablations, tests); the init seed is recorded to rebuild it
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm create_model kwargs (depth=..., ...)
    method: str = "rlrr"
    method_options: dict[str, Any] = field(default_factory=dict)  # the method config's fields (r=4, targets=[...])
    data: str = "demo"  # 'demo' (sklearn digits), an ImageFolder root, or a VTAB-1k task directory
    data_overrides: dict[str, Any] = field(default_factory=dict)  # preprocessing overrides (mean, std, ...)
    task: str | None = None  # VTAB-1k task name: selects the paper's per-task recipe
    epochs: int | None = None  # total epochs, warm-up and cool-down included
    batch_size: int | None = None  # GLOBAL batch (split over processes under torchrun)
    lr: float | None = None
    weight_decay: float | None = None
    warmup_epochs: float | None = None  # may be fractional: the warm-up is per step
    cooldown_epochs: int | None = None  # epochs at min_lr after the cosine (the paper: 10)
    min_lr: float | None = None
    warmup_lr: float = 1e-7
    dropout: float | None = None  # residual dropout rate of the last block (linspace(0, p, depth))
    hflip: bool | None = None
    img_size: int | None = None
    amp: str = "auto"  # auto | bf16 | fp16 | off
    device: str = "auto"  # auto | cpu | cuda[:N]
    seed: int = 42
    channels_last: bool | None = None  # None: on for CUDA
    fast_attention: bool = True  # train with timm's fused SDPA attention (same function; exports stay exportable)
    num_workers: int = 0
    eval_batch_size: int | None = None  # None: 2x batch_size
    output: str | None = None  # run directory; None: runs/<method>-<data>-<timestamp> (or the resume directory)
    resume: str | None = None  # run directory to continue from its checkpoint/last.safetensors
    overwrite: bool = False  # allow writing a new run into a directory that already holds one
    limit_train_batches: int | None = None  # cap on steps per epoch (tests, smoke runs)

    def __post_init__(self) -> None:
        for name in ("model_kwargs", "method_options", "data_overrides"):
            if not isinstance(getattr(self, name), dict):
                raise UsageError(f"{name}: expected a mapping, got {type(getattr(self, name)).__name__}")
        _check_choice("method", self.method, method_names())
        _check_choice("amp", self.amp, AMP_MODES)
        if not (self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:")):
            raise UsageError(f"device: {self.device!r} is not a device", "use auto, cpu or cuda")
        if self.task is not None:
            self.task = canonical_task(self.task)
        try:  # unknown / bad method options fail now, not after the data and model are loaded
            config_class(self.method).from_dict(dict(self.method_options))
        except UsageError as e:
            raise UsageError(f"method_options: {e.message}", e.hint) from None
        for name in ("epochs", "batch_size", "img_size", "limit_train_batches", "eval_batch_size"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("cooldown_epochs", "num_workers", "seed"):
            _check_int(name, getattr(self, name), minimum=0)
        _check_float("lr", self.lr, positive=True)
        for name in ("weight_decay", "min_lr", "warmup_lr", "warmup_epochs"):
            _check_float(name, getattr(self, name), positive=False)
        if self.dropout is not None and not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise UsageError(f"dropout: {self.dropout!r} is outside [0, 1)", "residual dropout rate, e.g. 0.1")
        if None not in (self.epochs, self.warmup_epochs, self.cooldown_epochs) and \
                self.warmup_epochs + self.cooldown_epochs > self.epochs:
            raise UsageError(f"epochs: {self.epochs} is fewer than warmup_epochs + cooldown_epochs "
                             f"({self.warmup_epochs} + {self.cooldown_epochs})", "train longer or shorten those")
        if "img_size" in self.model_kwargs and self.img_size is not None \
                and self.model_kwargs["img_size"] != self.img_size:
            raise UsageError(f"img_size: {self.img_size} conflicts with model_kwargs img_size "
                             f"{self.model_kwargs['img_size']}", "give the size once")
        if self.resume is not None and self.output is not None and Path(self.output) != Path(self.resume):
            raise UsageError(f"output: {self.output} differs from the resumed run {self.resume}",
                             "a resumed run continues in its own directory: drop --output")

    def recipe(self) -> Recipe:
        """Where the None fields come from: the VTAB task's recipe, the demo's, or the generic one."""
        if self.task is not None:
            return recipe(self.task)
        if str(self.data).strip().lower() in _DEMO_DATA:
            return recipe(None)
        return GENERIC

    def resolved(self) -> "TrainConfig":
        """A copy with every None filled from :meth:`recipe` and paths made absolute (so a resume works anywhere)."""
        r = self.recipe()
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        kwargs = dict(self.model_kwargs)
        if values["img_size"] is None and "img_size" in kwargs:
            values["img_size"] = kwargs["img_size"]
        kwargs.pop("img_size", None)
        values["model_kwargs"] = _jsonable(kwargs)
        values["method_options"] = _jsonable(self.method_options)
        values["data_overrides"] = _jsonable(self.data_overrides)
        for name, value in r.to_dict().items():
            if name in values and values[name] is None:
                values[name] = value
        if self.lr is None:  # the recipes' learning rates are tuned for adapters; the method may scale them
            values["lr"] = values["lr"] * get_method(self.method).recipe_lr_scale
        if values["eval_batch_size"] is None:
            values["eval_batch_size"] = 2 * values["batch_size"]
        if values["weights"] is not None:
            values["weights"] = str(Path(values["weights"]).expanduser().absolute())
        if str(self.data).strip().lower() not in _DEMO_DATA and Path(self.data).expanduser().exists():
            values["data"] = str(Path(self.data).expanduser().absolute())
        return TrainConfig(**values)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UsageError(f"train config: unknown field(s) {unknown}", f"valid fields: {', '.join(sorted(known))}")
        return cls(**d)


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
        raise UsageError(f"{name}: {value!r} must be a {'positive' if positive else 'non-negative'} finite number",
                         "see `peftx train --help`")


def _jsonable(value: Any) -> Any:
    """JSON round trip: tuples become lists, so a config compares equal to its saved copy."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        raise UsageError(f"configuration value {value!r} is not JSON-serialisable",
                         "use plain numbers, strings, lists and mappings") from None


# -- schedule, optimizer, seeding -----------------------------------------------------------------------------------

def lr_at(step: int, *, lr: float, steps_per_epoch: int, epochs: int, warmup_epochs: float, cooldown_epochs: int,
          warmup_lr: float, min_lr: float) -> float:
    """Per-step learning rate: linear warm-up from ``warmup_lr``, cosine to ``min_lr``, then ``min_lr`` (cool-down)."""
    warm = round(warmup_epochs * steps_per_epoch)
    decay_end = (epochs - cooldown_epochs) * steps_per_epoch
    if step < warm:
        return warmup_lr + (lr - warmup_lr) * step / warm
    if step >= decay_end:
        return min_lr
    t = (step - warm) / max(1, decay_end - warm)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t))


def schedule(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    return lambda step: lr_at(step, lr=cfg.lr, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs,
                              warmup_epochs=cfg.warmup_epochs, cooldown_epochs=cfg.cooldown_epochs,
                              warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr)


def param_groups(model: nn.Module, weight_decay: float) -> tuple[list[dict[str, Any]], list[str]]:
    """AdamW groups (decay, no-decay) over the adapted model's trainable tensors, and their names in that order.

    Which tensors decay is the method's decision (peftx.adapter.split_weight_decay, through the method registry).
    """
    params = dict(model.named_parameters())
    decay, no_decay = split_weight_decay(model)
    groups, names = [], []
    for group_names, wd in ((decay, weight_decay), (no_decay, 0.0)):
        if group_names:
            groups.append({"params": [params[n] for n in group_names], "weight_decay": wd})
            names += group_names
    return groups, names


def seed_for(*keys: int) -> int:
    """A 63-bit seed that is a pure function of ``keys`` (same in every process, unlike ``hash``)."""
    digest = hashlib.blake2b(struct.pack(f"<{len(keys)}q", *keys), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


class SeededSamples(Dataset):
    """A view whose item ``i`` draws its augmentation randomness from seed_for(seed, epoch, i).

    So augmentation does not depend on worker count, process count or where a run was resumed. Only the CPU
    generator and Python's ``random`` are touched (what torchvision / timm transforms use), and both are restored.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        cpu_state, py_state = torch.get_rng_state(), random.getstate()
        s = seed_for(self.seed, self.epoch, index)
        torch.default_generator.manual_seed(s)
        random.seed(s)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(cpu_state)
            random.setstate(py_state)


# -- signals ----------------------------------------------------------------------------------------------------------

class StopFlag:
    """Set by SIGINT / SIGTERM; the loop checks it after every step. A second signal aborts at once."""

    def __init__(self) -> None:
        self.signal: str | None = None

    def __bool__(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt  # second signal: the user insists; the last per-epoch checkpoint remains
        self.signal = signal.Signals(signum).name


@contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[StopFlag]:
    """Route SIGINT / SIGTERM to ``flag`` while training (main thread only; elsewhere signals are untouched)."""
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.signal(s, flag._handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# -- progress ---------------------------------------------------------------------------------------------------------

def rich_progress(progress: Any) -> Progress:
    """Adapt a ``rich.progress.Progress`` (owned and started by the caller) to the event callback."""
    tasks: dict[str, Any] = {}

    def on(event: str, **f: Any) -> None:
        if event == "start":
            tasks["run"] = progress.add_task("epochs", total=f["epochs"], completed=f["start_epoch"])
        elif event == "epoch_start":
            if "epoch" in tasks:
                progress.remove_task(tasks["epoch"])
            tasks["epoch"] = progress.add_task(f"epoch {f['epoch']}/{f['epochs']}", total=f["steps"],
                                               completed=f["start_step"])
        elif event == "step":
            progress.update(tasks["epoch"], completed=f["step"],
                            description=f"epoch {f['epoch']} loss {f['loss']:.4f} lr {f['lr']:.2e}")
        elif event == "epoch":
            progress.update(tasks["run"], completed=f["epoch"],
                            description=f"epochs (val {100 * f['val_accuracy']:.1f} %, best "
                                        f"{100 * f['best_val_accuracy']:.1f} % @ {f['best_epoch']})")

    return on


def _emitter(progress: Any, info: DistInfo) -> Progress:
    if progress is None or not info.is_main:
        return lambda event, **fields: None
    if hasattr(progress, "add_task") and hasattr(progress, "update"):
        return rich_progress(progress)
    if not callable(progress):
        raise UsageError("progress must be a callable progress(event, **fields) or a rich.progress.Progress")
    return progress


# -- the run ----------------------------------------------------------------------------------------------------------

@dataclass
class _Setup:
    cfg: TrainConfig
    info: DistInfo
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    run_dir: Path
    model: nn.Module  # the adapted model (not DDP-wrapped)
    splits: Any
    data_cfg: dict[str, Any]
    checkpoint: Any = None  # a loaded Checkpoint when resuming
    created_run_dir: bool = False  # this run made run_dir (so may remove it while it is still empty)


def _resolve_config(cfg: TrainConfig) -> tuple[TrainConfig, Any]:
    """The effective config and, when resuming, the checkpoint. A resumed run keeps its saved hyper-parameters."""
    if cfg.resume is None:
        return cfg.resolved(), None
    ckpt = load_checkpoint(cfg.resume)
    saved = TrainConfig.from_dict(ckpt.config)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name in _RUNTIME_FIELDS:
            continue
        given = _jsonable(getattr(cfg, f.name))
        if given != _jsonable(getattr(defaults, f.name)) and given != _jsonable(getattr(saved, f.name)):
            raise UsageError(f"{f.name}: {given!r} differs from the resumed run's {getattr(saved, f.name)!r}",
                             "a resumed run keeps its hyper-parameters; start a new run to change them")
    runtime = {name: getattr(cfg, name) for name in _RUNTIME_FIELDS if name not in ("output", "eval_batch_size")}
    if cfg.eval_batch_size is not None:
        runtime["eval_batch_size"] = cfg.eval_batch_size
    merged = dataclasses.replace(saved, **runtime, output=str(Path(cfg.resume)))
    return merged, ckpt


def _default_output(cfg: TrainConfig) -> str:
    data = "demo" if str(cfg.data).lower() in _DEMO_DATA else Path(cfg.data).name or "data"
    return str(Path("runs") / f"{cfg.method}-{data}-{datetime.now():%Y%m%d-%H%M%S}")


def _run_files(run_dir: Path) -> list[Path]:
    return [run_dir / n for n in (ADAPTER_FILE, CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, CURVES_FILE)] + \
        [checkpoint_path(run_dir)]


def _prepare_run_dir(cfg: TrainConfig, info: DistInfo, *, create: bool) -> Path:
    """The run directory; a new run refuses one holding another run, or (``overwrite``) deletes that run's files
    first, so an interrupted new run never leaves the old run's adapter or summary looking like its own.

    Called twice: ``create=False`` checks before anything is built (fail fast), ``create=True`` creates the
    directory only once the data, weights and model have built, so an early error leaves nothing behind."""
    run_dir = Path(cfg.output or _default_output(cfg))
    if info.is_main:
        old = [p for p in _run_files(run_dir) if p.exists()] if cfg.resume is None else []
        if old and not cfg.overwrite:
            raise OutputError(f"{run_dir} already holds a training run",
                              f"resume it with --resume {run_dir}, pass --overwrite, or choose another --output")
        if not create:
            return run_dir
        for path in old:
            try:
                path.unlink()
            except OSError as e:
                raise output_error(path, e) from None
        ensure_dir(run_dir)
    return run_dir


def _meta_backbone(cfg: TrainConfig) -> nn.Module:
    """Shapes-only model, for the preprocessing config before the class count (and so the head) is known."""
    from .backbones import create_backbone

    with torch.device("meta"):
        return create_backbone(cfg.model, num_classes=1, pretrained=False, img_size=cfg.img_size, **cfg.model_kwargs)


def _spec(cfg: TrainConfig) -> dict[str, Any]:
    """How to rebuild the backbone (evaluate / merge-export read it from the adapter file)."""
    return {"name": cfg.model, "weights": cfg.weights, "img_size": cfg.img_size, "model_kwargs": cfg.model_kwargs,
            "pretrained": cfg.pretrained, "init_seed": None if cfg.pretrained else cfg.seed}


def _build(cfg: TrainConfig, ckpt: Any) -> _Setup:
    from .backbones import create_backbone, data_config
    from .data import load_splits

    device = resolve_device(cfg.device)
    info = init_distributed(device.type)
    try:
        if device.type == "cuda" and info.enabled:
            device = torch.device("cuda", info.local_rank)
        amp_dtype = resolve_amp(cfg.amp, device)
        channels_last = device.type == "cuda" if cfg.channels_last is None else cfg.channels_last
        if cfg.batch_size % info.world_size:
            raise UsageError(f"batch_size: {cfg.batch_size} is not divisible by the {info.world_size} processes",
                             "the global batch is split evenly: pick a multiple of the process count")
        run_dir = _prepare_run_dir(cfg, info, create=False)
        cfg = dataclasses.replace(cfg, output=str(run_dir))  # recorded in the checkpoint and the summary
        seed_everything(cfg.seed)
        data_cfg = data_config(_meta_backbone(cfg), cfg.data_overrides or None)
        splits = load_splits(cfg.data, data_cfg, hflip=bool(cfg.hflip), seed=cfg.seed)
        torch.manual_seed(cfg.seed)  # identical init on every rank, and rebuildable for pretrained=False
        model = create_backbone(cfg.model, num_classes=len(splits.class_names), weights=cfg.weights,
                                pretrained=cfg.pretrained, img_size=cfg.img_size, **cfg.model_kwargs)
        method_cfg = config_class(cfg.method).from_dict(dict(cfg.method_options))
        adapt(model, method_cfg, spec=_spec(cfg))
        if ckpt is not None:
            _load_params(model, ckpt.params, str(ckpt.path))
        created = not run_dir.exists()
        _prepare_run_dir(cfg, info, create=True)
    except BaseException:
        shutdown(info)
        raise
    return _Setup(cfg, info, device, amp_dtype, channels_last, run_dir, model, splits, data_cfg, ckpt, created)


def _load_params(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    params = dict(model.named_parameters())
    expected = {n: params[n] for n in trainable_names(model)}
    check_tensors(expected, tensors, where)
    with torch.no_grad():
        for name, value in tensors.items():
            expected[name].copy_(value)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().to("cpu", copy=True) for n in trainable_names(model)}


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"


def train(cfg: TrainConfig | None = None, progress: Progress | Any = None) -> dict[str, Any]:
    """Train an adapter as ``cfg`` says; returns the summary (also written to ``summary.json``).

    ``progress`` is ``progress(event, **fields)`` (events: :data:`EVENTS`) or a started ``rich.progress.Progress``.
    Raises :class:`TrainingInterrupted` after SIGINT / SIGTERM, once a resumable checkpoint is written.
    """
    cfg, ckpt = _resolve_config(cfg or TrainConfig())
    wall0 = time.perf_counter()
    setup = _build(cfg, ckpt)
    try:
        return _Trainer(setup, _emitter(progress, setup.info), wall0).run()
    except BaseException:
        if setup.created_run_dir and setup.info.is_main:
            _remove_if_empty(setup.run_dir)  # failed before writing anything: leave nothing behind
        raise
    finally:
        shutdown(setup.info)


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()  # refuses a non-empty directory: what a run wrote is never removed
    except OSError:
        pass


class _Trainer:
    """One training run; holds the loop state so each phase is a small method."""

    def __init__(self, setup: _Setup, emit: Progress, wall0: float):
        self.s, self.cfg, self.info, self.emit, self.wall0 = setup, setup.cfg, setup.info, emit, wall0
        self.device = setup.device
        self.model = setup.model
        self.state = setup.checkpoint.state if setup.checkpoint is not None else LoopState()
        self.best_params: dict[str, torch.Tensor] | None = None  # in memory when the best epoch is in this process
        self._place_model()
        groups, self.opt_names = param_groups(self.model, self.cfg.weight_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=self.cfg.lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=setup.amp_dtype == torch.float16)
        if setup.checkpoint is not None:
            restore_optimizer(self.optimizer, self.opt_names, setup.checkpoint.optimizer)
            if setup.checkpoint.scaler and self.scaler.is_enabled():
                self.scaler.load_state_dict(setup.checkpoint.scaler)
        self.train_data = SeededSamples(setup.splits.train, self.cfg.seed)
        self.sampler = EpochSampler(len(self.train_data), self.cfg.batch_size, seed=self.cfg.seed,
                                    rank=self.info.rank, world_size=self.info.world_size)
        full = self.sampler.batches
        if full == 0:
            raise UsageError(f"batch_size: {self.cfg.batch_size} is larger than the training set "
                             f"({len(self.train_data)} images)", "use a smaller batch")
        self.steps_per_epoch = min(full, self.cfg.limit_train_batches or full)
        self.lr_at = schedule(self.cfg, self.steps_per_epoch)

    # -- set-up -------------------------------------------------------------------------------------------------
    def _place_model(self) -> None:
        self.dropout_rates = add_residual_dropout(self.model, self.cfg.dropout, state_of(self.model).layout.blocks)
        if self.cfg.fast_attention:
            use_fused_attention(self.model)
        self.model.to(self.device)
        if self.s.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.forward_model: nn.Module = self.model
        if self.info.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # Only adapter + head tensors require grad and every one of them is used in each forward. Buffers
            # (Swin's index tables / masks) are constants, identical on every rank: no per-forward sync.
            ids = [self.info.local_rank] if self.device.type == "cuda" else None
            sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                    else {"broadcast_buffers": False})  # torch >= 2.14 renamed the option
            self.forward_model = DDP(self.model, device_ids=ids, find_unused_parameters=False, **sync)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _train_loader(self, epoch: int, start_batch: int) -> DataLoader:
        self.train_data.epoch = epoch
        self.sampler.set_epoch(epoch, start_batch)
        return DataLoader(self.train_data, batch_size=self.cfg.batch_size // self.info.world_size,
                          sampler=self.sampler, drop_last=True, num_workers=self.cfg.num_workers,
                          pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(self.cfg.seed))

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        per_rank = max(1, self.cfg.eval_batch_size // self.info.world_size)
        return eval_loader(dataset, per_rank, info=self.info, num_workers=self.cfg.num_workers,
                           pin_memory=self.device.type == "cuda")

    # -- loop ---------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        sp = self.s.splits
        trainable, total = count_parameters(self.model)
        self.emit("start", run_dir=str(self.s.run_dir), epochs=self.cfg.epochs, start_epoch=self.state.epoch,
                  steps_per_epoch=self.steps_per_epoch, device=str(self.device), amp=_amp_name(self.s.amp_dtype),
                  world_size=self.info.world_size, train_size=len(sp.train), val_size=len(sp.val),
                  test_size=len(sp.test) if sp.test is not None else 0, trainable_params=trainable,
                  total_params=total, resumed=self.s.checkpoint is not None)
        self.val_loader = self._eval_loader(sp.val)
        flag = StopFlag()
        with stop_on_signals(flag):
            while self.state.epoch < self.cfg.epochs:
                self._train_epoch(flag)
                self._end_epoch()
                if any_rank(bool(flag), self.device, self.info):  # a signal during validation / saving
                    self._interrupted(flag, "epoch")
        return self._finish(trainable, total)

    def _train_epoch(self, flag: StopFlag) -> None:
        st, cfg = self.state, self.cfg
        epoch = st.epoch  # 0-based index of the epoch being trained
        start = st.batch
        loss_sum = st.partial.get("loss_sum", 0.0) if self.info.is_main else 0.0
        seen = st.partial.get("images", 0.0) if self.info.is_main else 0.0
        seconds = st.partial.get("seconds", 0.0)
        self.emit("epoch_start", epoch=epoch + 1, epochs=cfg.epochs, steps=self.steps_per_epoch, start_step=start)
        self.model.train()
        loader = self._train_loader(epoch, start)
        t0 = time.perf_counter()
        step = start
        for x, y in loader:
            if step >= self.steps_per_epoch:
                break
            lr = self._step(x, y)
            loss_sum += self._last_loss * y.numel()
            seen += y.numel()
            step += 1
            st.global_step += 1
            st.batch = step
            self.emit("step", epoch=epoch + 1, step=step, steps=self.steps_per_epoch, global_step=st.global_step,
                      loss=self._last_loss, lr=lr)
            if any_rank(bool(flag), self.device, self.info) and step < self.steps_per_epoch:
                st.partial = self._reduced_partial(loss_sum, seen, seconds + time.perf_counter() - t0)
                self._interrupted(flag, "step")
        seconds += time.perf_counter() - t0
        loss_sum, seen = all_reduce_sum([loss_sum, seen], self.device, self.info)
        self._epoch_train = {"train_loss": loss_sum / max(seen, 1), "images": int(seen), "train_seconds": seconds,
                             "lr": lr if step > start else self.lr_at(max(st.global_step - 1, 0))}

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        st = self.state
        torch.manual_seed(seed_for(self.cfg.seed, st.global_step, self.info.rank))  # dropout: f(seed, step, rank)
        lr = self.lr_at(st.global_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = to_device(x, self.device, self.s.channels_last), y.to(self.device, non_blocking=True)
        with autocast(self.device, self.s.amp_dtype):
            logits = self.forward_model(x)
        loss = F.cross_entropy(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._last_loss = loss.item()
        if not math.isfinite(self._last_loss):
            raise NonFiniteError(f"training loss became {self._last_loss} at step {st.global_step}",
                                 "lower the learning rate, or use --amp bf16 / off")
        return lr

    def _reduced_partial(self, loss_sum: float, seen: float, seconds: float) -> dict[str, float]:
        loss_sum, seen = all_reduce_sum([loss_sum, seen], self.device, self.info)
        return {"loss_sum": loss_sum, "images": seen, "seconds": seconds}

    def _end_epoch(self) -> None:
        st, tr = self.state, self._epoch_train
        t0 = time.perf_counter()
        val = evaluate_model(self.model, self.val_loader, device=self.device, amp_dtype=self.s.amp_dtype,
                             channels_last=self.s.channels_last, info=self.info)
        st.epoch += 1
        st.batch, st.partial = 0, {}
        better = st.best_val_accuracy is None or val["accuracy"] > st.best_val_accuracy or (
            val["accuracy"] == st.best_val_accuracy and val["loss"] < st.best_val_loss)
        if better:  # select on validation accuracy; ties go to the lower validation loss
            st.best_epoch, st.best_val_accuracy, st.best_val_loss = st.epoch, val["accuracy"], val["loss"]
            self.best_params = _snapshot(self.model)
            if self.info.is_main:
                self._save_adapter()
        record = {"epoch": st.epoch, "train_loss": tr["train_loss"], "val_loss": val["loss"],
                  "val_accuracy": val["accuracy"], "lr": tr["lr"],
                  "img_per_s": tr["images"] / tr["train_seconds"] if tr["train_seconds"] > 0 else None,
                  "seconds": tr["train_seconds"] + time.perf_counter() - t0, "global_step": st.global_step}
        st.history.append(record)
        st.train_seconds += record["seconds"]
        st.step_seconds += tr["train_seconds"]
        st.train_images += tr["images"]
        if self.info.is_main:
            self._write_metrics()
            self._save_checkpoint("epoch")
        self.emit("epoch", epochs=self.cfg.epochs, best=better, best_epoch=st.best_epoch,
                  best_val_accuracy=st.best_val_accuracy, **record)

    # -- files (rank 0) -----------------------------------------------------------------------------------------
    def _save_adapter(self) -> None:
        st, sp = self.state, self.s.splits
        extra = {"class_names": list(sp.class_names), "data_config": _jsonable(self.s.data_cfg),
                 "data": self.cfg.data, "data_source": sp.source, "seed": self.cfg.seed, "task": self.cfg.task,
                 "best_epoch": st.best_epoch, "val_accuracy": st.best_val_accuracy, "val_loss": st.best_val_loss,
                 "train_config": self.cfg.to_dict()}
        with residual_dropout_removed(self.model):
            save_adapter(self.model, self.s.run_dir, extra=extra)

    def _write_metrics(self) -> None:
        lines = "".join(json.dumps(r) + "\n" for r in self.state.history)
        write_text_atomic(self.s.run_dir / METRICS_FILE, lines)
        from .plotting import plot_curves

        plot_curves(self.state.history, self.s.run_dir / CURVES_FILE, best_epoch=self.state.best_epoch,
                    title=f"{self.cfg.method} on {self.cfg.model} ({Path(self.cfg.data).name})")

    def _save_checkpoint(self, reason: str) -> Path:
        path = save_checkpoint(checkpoint_path(self.s.run_dir), params=_snapshot(self.model), optimizer=self.optimizer,
                               optimizer_names=self.opt_names, scaler=self.scaler, state=self.state,
                               config=self.cfg.to_dict())
        self.emit("checkpoint", path=str(path), epoch=self.state.epoch, step=self.state.batch, reason=reason)
        return path

    def _interrupted(self, flag: StopFlag, where: str) -> None:
        path = checkpoint_path(self.s.run_dir)
        if self.info.is_main:
            if where == "step":
                self._save_checkpoint("interrupt")
            else:  # the epoch-end checkpoint was just written
                self.emit("checkpoint", path=str(path), epoch=self.state.epoch, step=0, reason="interrupt")
        st = self.state
        at = f"epoch {st.epoch + 1}, step {st.batch}" if st.batch else f"the end of epoch {st.epoch}"
        raise TrainingInterrupted(f"training interrupted by {flag.signal or 'a signal'} at {at}; "
                                  f"checkpoint saved to {path}",
                                  f"continue with: peftx train --resume {self.s.run_dir}")

    # -- end ----------------------------------------------------------------------------------------------------
    def _finish(self, trainable: int, total: int) -> dict[str, Any]:
        st, sp = self.state, self.s.splits
        best = self.best_params
        if best is None:  # the best epoch was trained before a resume: its adapter is on disk
            _, best = read_adapter(self.s.run_dir / ADAPTER_FILE)
        _load_params(self.model, best, str(self.s.run_dir / ADAPTER_FILE))
        test = {"accuracy": None, "loss": None, "n": 0}
        if sp.test is not None and len(sp.test):
            test = evaluate_model(self.model, self._eval_loader(sp.test), device=self.device,
                                  amp_dtype=self.s.amp_dtype, channels_last=self.s.channels_last, info=self.info)
        self.emit("test", accuracy=test["accuracy"], loss=test["loss"], n=test["n"], best_epoch=st.best_epoch)
        peak, peak_kind = _peak_memory(self.device)
        summary = {
            "best_epoch": st.best_epoch, "val_accuracy": st.best_val_accuracy, "val_loss": st.best_val_loss,
            "test_accuracy": test["accuracy"], "test_loss": test["loss"], "test_images": test["n"],
            "selection": "best validation accuracy (ties: lower validation loss); test measured at that epoch only",
            "trainable_params": trainable, "total_params": total, "trainable_percent": 100.0 * trainable / total,
            "method": self.cfg.method, "model": self.cfg.model, "data": self.cfg.data, "data_source": sp.source,
            "task": self.cfg.task, "epochs": self.cfg.epochs, "steps_per_epoch": self.steps_per_epoch,
            "train_seconds": st.train_seconds, "wall_seconds": time.perf_counter() - self.wall0,
            "img_per_s": st.train_images / st.step_seconds if st.step_seconds > 0 else None,
            "peak_memory_mb": peak, "peak_memory_kind": peak_kind, "device": str(self.device),
            "amp": _amp_name(self.s.amp_dtype), "world_size": self.info.world_size,
            "residual_dropout_rates": self.dropout_rates, "run_dir": str(self.s.run_dir),
            "adapter": str(self.s.run_dir / ADAPTER_FILE), "resumed": self.s.checkpoint is not None,
            "config": self.cfg.to_dict(),
        }
        if self.info.is_main:
            write_text_atomic(self.s.run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        self.emit("done", summary=summary)
        return summary


def _amp_name(dtype: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "off")
