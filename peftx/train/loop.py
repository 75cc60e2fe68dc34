"""The training loop: :func:`train` builds a run (data, backbone, adapter, optimiser) and :class:`Trainer` runs it.

The pieces live beside this file (config, schedule, optim, seeding, signals, progress, rundir, resume, checkpoint,
distributed, recipes, regularization); this module only composes them.

Reproducibility: with a fixed seed on CPU, a run resumed from any checkpoint (epoch end or mid-epoch) ends with the
same adapter, bit for bit, as the uninterrupted run. The data order is a function of (seed, epoch), each sample's
augmentation a function of (seed, epoch, index), and each step's dropout a function of (seed, step, rank); the
learning rate is a function of the step. Nothing random is carried from one step to the next.

Non-finite numbers (what is checked where, and why):

* The loss is checked BEFORE backward and the optimiser step, and under DDP the flag is all-reduced first, so every
  rank raises :class:`NonFiniteError` at the same step and none is left waiting in backward's gradient all-reduce.
  This holds with fp16 too: the grad scaler multiplies the loss after the forward, so a forward that already
  overflowed (a non-finite loss) is nothing the scaler can skip its way out of.
* Gradients that overflow while the loss is finite are the fp16 grad scaler's job: it skips that optimiser step and
  lowers the scale, and training goes on (skipped steps are counted: ``amp_skipped_steps`` in summary.json). Only
  :data:`MAX_CONSECUTIVE_SKIPS` skips in a row (the scale has fallen by 2**20: the gradients are not merely large)
  abort. Without a scaler (fp32, bf16) non-finite gradients abort before the optimiser step. DDP has averaged the
  gradients by then, so every rank sees the same ones and decides alike without another collective.
"""

from __future__ import annotations

import inspect
import math
import resource
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .. import events as ev
from ..adapter import adapt, count_parameters, state_of, trainable_names
from ..adapter_io import ADAPTER_FILE, check_tensors, read_adapter, save_adapter
from ..backbones import create_backbone, data_config
from ..data import VAL_SPLIT_FILE, load_splits, read_val_split, write_val_split
from ..distributed import DistInfo, EpochSampler, all_reduce_sum, any_rank, init_distributed, shutdown
from ..errors import NonFiniteError, TrainingInterrupted, UsageError
from ..methods import config_class
from ..metrics import class_report
from ..plotting import plot_confusion
from ..preprocess import TRAINING as PREPROCESSING_DEFAULT
from ..preprocess import contract
from ..runtime import autocast, eval_loader, evaluate_model, resolve_amp, resolve_device, to_device, use_fused_attention
from .checkpoint import Checkpoint, LoopState, checkpoint_path, restore_optimizer, save_checkpoint
from .config import RunConfig, TrainConfig, json_copy, resolve
from .optim import make_optimizer
from .progress import Progress, emitter
from .regularization import add_residual_dropout, residual_dropout_removed
from .resume import plan_resume
from .rundir import CONFUSION_FILE, prepare_run_dir, remove_if_empty, write_metrics, write_summary
from .schedule import schedule
from .seeding import SeededSamples, seed_everything, seed_for
from .signals import StopFlag, stop_on_signals

MAX_CONSECUTIVE_SKIPS = 20  # fp16: overflowed steps in a row before the gradients count as non-finite
ESTIMATE_AFTER_STEPS = 3  # the time estimate: steps 2..3 of this process (step 1 pays one-time set-up costs)


def train(cfg: TrainConfig | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Train an adapter as ``cfg`` says; returns the summary (also written to ``summary.json``).

    ``progress`` receives the run's typed events (:mod:`peftx.events`: ``TrainStart``, ``EpochStart``, ``Step``,
    ``Estimate``, ``EpochEnd``, ``CheckpointSaved``, ``TestResult``, ``TrainDone``).
    Raises :class:`TrainingInterrupted` after SIGINT / SIGTERM, once a resumable checkpoint is written.
    """
    asked = cfg or TrainConfig()
    extended_from = None
    run: RunConfig
    if asked.resume is None:
        resolved = resolve(asked)
        run, ckpt, notes = resolved.config, None, resolved.notes
    else:
        plan = plan_resume(asked)
        run, ckpt, notes, extended_from = plan.config, plan.checkpoint, [], plan.extended_from
        if extended_from is not None:
            notes.append(
                f"extends the run from {extended_from} to {run.epochs} epochs: the cosine schedule is "
                "recomputed for the new total, so the rate rises at the resume step and decays from there"
            )
    wall0 = time.perf_counter()
    setup = _build(run, ckpt)
    try:
        return Trainer(setup, emitter(progress, setup.info), wall0, notes, extended_from).run()
    except BaseException:
        if setup.created_run_dir and setup.info.is_main:
            remove_if_empty(setup.run_dir)  # failed before writing anything: leave nothing behind
        raise
    finally:
        shutdown(setup.info)


# -- set-up -----------------------------------------------------------------------------------------------------------


@dataclass
class _Setup:
    cfg: RunConfig
    info: DistInfo
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    run_dir: Path
    model: nn.Module  # the adapted model (not DDP-wrapped)
    splits: Any
    data_cfg: dict[str, Any]
    checkpoint: Checkpoint | None = None  # when resuming
    created_run_dir: bool = False  # this run made run_dir (so may remove it while it is still empty)


def _meta_backbone(cfg: RunConfig) -> nn.Module:
    """Shapes-only model, for the preprocessing config before the class count (and so the head) is known."""
    with torch.device("meta"):
        return create_backbone(cfg.model, num_classes=1, pretrained=False, img_size=cfg.img_size, **cfg.model_kwargs)


def _spec(cfg: RunConfig) -> dict[str, Any]:
    """How to rebuild the backbone (evaluate / merge-export read it from the adapter file)."""
    return {
        "name": cfg.model,
        "weights": cfg.weights,
        "img_size": cfg.img_size,
        "model_kwargs": cfg.model_kwargs,
        "pretrained": cfg.pretrained,
        "init_seed": None if cfg.pretrained else cfg.seed,
    }


def _build(cfg: RunConfig, ckpt: Checkpoint | None) -> _Setup:

    device = resolve_device(cfg.device)
    info = init_distributed(device.type)
    try:
        if device.type == "cuda" and info.enabled:
            device = torch.device("cuda", info.local_rank)
        amp_dtype = resolve_amp(cfg.amp, device)
        channels_last = device.type == "cuda" if cfg.channels_last is None else cfg.channels_last
        if cfg.batch_size % info.world_size:
            raise UsageError(
                f"batch_size: {cfg.batch_size} is not divisible by the {info.world_size} processes",
                "the global batch is split evenly: pick a multiple of the process count",
            )
        run_dir = prepare_run_dir(cfg, info, create=False)
        cfg = replace(cfg, output=str(run_dir))  # recorded in the checkpoint and the summary
        seed_everything(cfg.seed)
        # The run's preprocessing contract, recorded in the adapter file: peftx's training default (whole image
        # squashed to the input size), then whatever the run asked for (crop_mode / crop_pct / mean / ...).
        data_cfg = contract(data_config(_meta_backbone(cfg), {**PREPROCESSING_DEFAULT, **(cfg.data_overrides or {})}))
        # a resumed run keeps the validation split it drew (its val_split.json), even if files were added since
        val_files = read_val_split(run_dir) if cfg.resume is not None else None
        splits = load_splits(cfg.data, data_cfg, hflip=bool(cfg.hflip), seed=cfg.seed, val_files=val_files)
        torch.manual_seed(cfg.seed)  # identical init on every rank, and rebuildable for pretrained=False
        model = create_backbone(
            cfg.model,
            num_classes=len(splits.class_names),
            weights=cfg.weights,
            pretrained=cfg.pretrained,
            img_size=cfg.img_size,
            **cfg.model_kwargs,
        )
        method_cfg = config_class(cfg.method).from_dict(dict(cfg.method_options))
        adapt(model, method_cfg, spec=_spec(cfg))
        if ckpt is not None:
            _load_params(model, ckpt.params, str(ckpt.path))
        created = not run_dir.exists()
        prepare_run_dir(cfg, info, create=True)
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


def _drawn_summary(drawn: dict[str, Any] | None) -> dict[str, Any] | None:
    """How a validation split was drawn from train/ (the file list itself is in val_split.json)."""
    if drawn is None:
        return None

    return {
        "from": drawn["from"],
        "seed": drawn["seed"],
        "fraction": drawn["fraction"],
        "max_per_class": drawn["max_per_class"],
        "n": len(drawn["files"]),
        "file": VAL_SPLIT_FILE,
    }


def _amp_name(dtype: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "off")  # type: ignore[arg-type]


def grad_scaler(device: torch.device, amp_dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """fp16 needs loss scaling (its exponent range is too small for small gradients); bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)


def _all_finite(params: list[nn.Parameter]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True


# -- the run ----------------------------------------------------------------------------------------------------------


class Trainer:
    """One training run; holds the loop state so each phase is a small method."""

    def __init__(
        self,
        setup: _Setup,
        emit: Progress,
        wall0: float,
        notes: list[str] | None = None,
        extended_from: int | None = None,
    ):
        self.s, self.cfg, self.info, self.emit, self.wall0 = setup, setup.cfg, setup.info, emit, wall0
        self.notes, self.extended_from = list(notes or []), extended_from
        self.device = setup.device
        self.model = setup.model
        self.state = setup.checkpoint.state if setup.checkpoint is not None else LoopState()
        self.best_params: dict[str, torch.Tensor] | None = None  # in memory when the best epoch is in this process
        self._place_model()
        self.optimizer, self.opt_names = make_optimizer(self.model, self.cfg.lr, self.cfg.weight_decay)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.scaler = grad_scaler(self.device, setup.amp_dtype)
        self._skips_in_a_row = 0
        if setup.checkpoint is not None:
            restore_optimizer(self.optimizer, self.opt_names, setup.checkpoint.optimizer)
            if setup.checkpoint.scaler and self.scaler.is_enabled():
                self.scaler.load_state_dict(setup.checkpoint.scaler)
        self.train_data = SeededSamples(setup.splits.train, self.cfg.seed)
        self.sampler = EpochSampler(
            len(self.train_data),
            self.cfg.batch_size,
            seed=self.cfg.seed,
            rank=self.info.rank,
            world_size=self.info.world_size,
        )
        full = self.sampler.batches
        if full == 0:
            raise UsageError(
                f"batch_size: {self.cfg.batch_size} is larger than the training set ({len(self.train_data)} images)",
                "use a smaller batch with --batch-size",
            )
        self.steps_per_epoch = min(full, self.cfg.limit_train_batches or full)
        self.lr_at = schedule(self.cfg, self.steps_per_epoch)
        if extended_from is not None:
            self.state.extensions.append(
                {
                    "from_epochs": extended_from,
                    "to_epochs": self.cfg.epochs,
                    "at_epoch": self.state.epoch,
                    "at_global_step": self.state.global_step,
                }
            )
        self._step_ends: list[float] = []  # this process's first steps, for the time estimate
        self._estimated = False

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
            sync: dict[str, Any] = (
                {"forward_sync_buffers": False}
                if "forward_sync_buffers" in inspect.signature(DDP).parameters
                else {"broadcast_buffers": False}
            )  # torch >= 2.14 renamed the option
            self.forward_model = DDP(self.model, device_ids=ids, find_unused_parameters=False, **sync)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _train_loader(self, epoch: int, start_batch: int) -> DataLoader:
        self.train_data.epoch = epoch
        self.sampler.set_epoch(epoch, start_batch)
        return DataLoader(
            self.train_data,
            batch_size=self.cfg.batch_size // self.info.world_size,
            sampler=self.sampler,
            drop_last=True,
            num_workers=self.cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        per_rank = max(1, self.cfg.eval_batch_size // self.info.world_size)
        return eval_loader(
            dataset, per_rank, info=self.info, num_workers=self.cfg.num_workers, pin_memory=self.device.type == "cuda"
        )

    # -- loop ---------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        sp = self.s.splits
        trainable, total = count_parameters(self.model)
        self.emit(
            ev.TrainStart(
                run_dir=str(self.s.run_dir),
                epochs=self.cfg.epochs,
                start_epoch=self.state.epoch,
                steps_per_epoch=self.steps_per_epoch,
                device=str(self.device),
                amp=_amp_name(self.s.amp_dtype),
                world_size=self.info.world_size,
                train_size=len(sp.train),
                val_size=len(sp.val),
                test_size=len(sp.test) if sp.test is not None else 0,
                trainable_params=trainable,
                total_params=total,
                resumed=self.s.checkpoint is not None,
                config=self.cfg.to_dict(),
                notes=list(self.notes),
                extended_from=self.extended_from,
                preprocessing=dict(self.s.data_cfg),
                source=sp.source,
                skipped_files=[str(p) for p in sp.skipped],
                val_drawn=_drawn_summary(sp.val_drawn),
                image_modes=dict(sp.image_modes),
                exif_rotated=sp.exif_rotated,
            )
        )

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
        self.emit(ev.EpochStart(epoch=epoch + 1, epochs=cfg.epochs, steps=self.steps_per_epoch, start_step=start))
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
            self.emit(
                ev.Step(
                    epoch=epoch + 1,
                    step=step,
                    steps=self.steps_per_epoch,
                    global_step=st.global_step,
                    loss=self._last_loss,
                    lr=lr,
                )
            )
            self._estimate(t0, done=step >= self.steps_per_epoch)
            if any_rank(bool(flag), self.device, self.info) and step < self.steps_per_epoch:
                st.partial = self._reduced_partial(loss_sum, seen, seconds + time.perf_counter() - t0)
                self._interrupted(flag, "step")
        seconds += time.perf_counter() - t0
        loss_sum, seen = all_reduce_sum([loss_sum, seen], self.device, self.info)
        self._epoch_train = {
            "train_loss": loss_sum / max(seen, 1),
            "images": int(seen),
            "train_seconds": seconds,
            "lr": lr if step > start else self.lr_at(max(st.global_step - 1, 0)),
        }

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
        self._last_loss = loss.item()
        if any_rank(not math.isfinite(self._last_loss), self.device, self.info):  # before backward: see the docstring
            raise NonFiniteError(
                f"training loss became non-finite at step {st.global_step}"
                + (f" ({self._last_loss})" if not math.isfinite(self._last_loss) else " on a rank"),
                self._nonfinite_hint(),
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.scaler.is_enabled():
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skips the step when the unscaled gradients hold inf / NaN
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale
            st.skipped_steps += int(skipped)
            self._skips_in_a_row = self._skips_in_a_row + 1 if skipped else 0
            if self._skips_in_a_row >= MAX_CONSECUTIVE_SKIPS:
                raise NonFiniteError(
                    f"gradients were non-finite in {MAX_CONSECUTIVE_SKIPS} steps in a row up to "
                    f"step {st.global_step}, down to loss scale {self.scaler.get_scale():g}",
                    self._nonfinite_hint(),
                )
        else:
            if not _all_finite(self.params):
                raise NonFiniteError(
                    f"gradients became non-finite at step {st.global_step} (loss {self._last_loss:.4g})",
                    self._nonfinite_hint(),
                )
            self.optimizer.step()
        return lr

    def _nonfinite_hint(self) -> str:
        path = checkpoint_path(self.s.run_dir)
        last = f"; the last epoch's checkpoint is {path}" if path.exists() else ""
        return f"lower the learning rate (--lr), or use --amp bf16 / off{last}"

    def _estimate(self, epoch_t0: float, done: bool) -> None:
        """Emit the time the rest of the run will take, once, from this process's first steps."""
        if self._estimated:
            return
        self._step_ends.append(time.perf_counter())
        ends = self._step_ends
        if len(ends) < ESTIMATE_AFTER_STEPS and not done:
            return
        self._estimated = True
        per_step = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else ends[0] - epoch_t0
        sp, st, cfg = self.s.splits, self.state, self.cfg
        remaining = cfg.epochs * self.steps_per_epoch - st.global_step
        # Evaluation is forward-only: about a third of a training step per image.
        per_image = per_step / cfg.batch_size / 3
        epochs_left = cfg.epochs - st.epoch
        test = len(sp.test) if sp.test is not None else 0
        eval_s = per_image * (len(sp.val) * epochs_left + test)
        self.emit(
            ev.Estimate(
                seconds_per_step=per_step,
                measured_steps=max(1, len(ends) - 1),
                steps_remaining=remaining,
                train_seconds=per_step * remaining,
                eval_seconds=eval_s,
                total_seconds=per_step * remaining + eval_s,
            )
        )

    def _reduced_partial(self, loss_sum: float, seen: float, seconds: float) -> dict[str, float]:
        loss_sum, seen = all_reduce_sum([loss_sum, seen], self.device, self.info)
        return {"loss_sum": loss_sum, "images": seen, "seconds": seconds}

    def _end_epoch(self) -> None:
        st, tr = self.state, self._epoch_train
        t0 = time.perf_counter()
        val = evaluate_model(
            self.model,
            self.val_loader,
            device=self.device,
            amp_dtype=self.s.amp_dtype,
            channels_last=self.s.channels_last,
            info=self.info,
        )
        st.epoch += 1
        st.batch, st.partial = 0, {}
        better = (
            st.best_val_accuracy is None
            or val["accuracy"] > st.best_val_accuracy
            or (val["accuracy"] == st.best_val_accuracy and val["loss"] < st.best_val_loss)
        )
        if better:  # select on validation accuracy; ties go to the lower validation loss
            st.best_epoch, st.best_val_accuracy, st.best_val_loss = st.epoch, val["accuracy"], val["loss"]
            self.best_params = _snapshot(self.model)
            if self.info.is_main:
                self._save_adapter()
        record = {
            "epoch": st.epoch,
            "train_loss": tr["train_loss"],
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "lr": tr["lr"],
            "img_per_s": tr["images"] / tr["train_seconds"] if tr["train_seconds"] > 0 else None,
            "seconds": tr["train_seconds"] + time.perf_counter() - t0,
            "global_step": st.global_step,
        }
        st.history.append(record)
        st.train_seconds += record["seconds"]
        st.step_seconds += tr["train_seconds"]
        st.train_images += round(tr["images"])  # all-reduced as a float; a count
        if self.info.is_main:
            write_metrics(
                self.s.run_dir,
                st.history,
                best_epoch=st.best_epoch,
                title=f"{self.cfg.method} on {self.cfg.model} ({Path(self.cfg.data).name})",
            )
            self._save_checkpoint("epoch")
        self.emit(
            ev.EpochEnd(
                epochs=self.cfg.epochs,
                best=better,
                best_epoch=st.best_epoch,
                best_val_accuracy=st.best_val_accuracy,
                **record,
            )
        )

    # -- files (rank 0) -----------------------------------------------------------------------------------------
    def _save_adapter(self) -> None:
        st, sp = self.state, self.s.splits
        extra = {
            "class_names": list(sp.class_names),
            "data_config": json_copy(self.s.data_cfg),
            "data": self.cfg.data,
            "data_source": sp.source,
            "seed": self.cfg.seed,
            "task": self.cfg.task,
            "best_epoch": st.best_epoch,
            "val_accuracy": st.best_val_accuracy,
            "val_loss": st.best_val_loss,
            "train_config": self.cfg.to_dict(),
            "val_split": _drawn_summary(sp.val_drawn),
        }
        self._record_val_split()
        with residual_dropout_removed(self.model):
            save_adapter(self.model, self.s.run_dir, extra=extra)

    def _record_val_split(self) -> None:
        """val_split.json, written with the run's first adapter or checkpoint (a run that fails before either
        leaves no file behind), so that eval, merge-export and --resume rebuild the drawn split."""
        drawn = self.s.splits.val_drawn
        if drawn is not None:
            write_val_split(self.s.run_dir, drawn)

    def _save_checkpoint(self, reason: str) -> Path:
        self._record_val_split()
        path = save_checkpoint(
            checkpoint_path(self.s.run_dir),
            params=_snapshot(self.model),
            optimizer=self.optimizer,
            optimizer_names=self.opt_names,
            scaler=self.scaler,
            state=self.state,
            config=self.cfg.to_dict(),
        )
        self.emit(ev.CheckpointSaved(path=str(path), epoch=self.state.epoch, step=self.state.batch, reason=reason))
        return path

    def _interrupted(self, flag: StopFlag, where: str) -> None:
        path = checkpoint_path(self.s.run_dir)
        if self.info.is_main:
            if where == "step":
                self._save_checkpoint("interrupt")
            else:  # the epoch-end checkpoint was just written
                self.emit(ev.CheckpointSaved(path=str(path), epoch=self.state.epoch, step=0, reason="interrupt"))
        st = self.state
        at = f"epoch {st.epoch + 1}, step {st.batch}" if st.batch else f"the end of epoch {st.epoch}"
        raise TrainingInterrupted(
            f"training interrupted by {flag.signal or 'a signal'} at {at}; checkpoint saved to {path}",
            f"continue with: peftx train --resume {self.s.run_dir}",
        )

    # -- end ----------------------------------------------------------------------------------------------------
    def _class_report(self, measured: dict[str, Any], split: str) -> dict[str, Any]:
        """Per-class accuracy + confusion matrix (summary.json) and confusion.png, of the selected epoch."""
        names = list(self.s.splits.class_names)
        report = {"class_report_split": split, **class_report(measured["confusion"], names)}
        if self.info.is_main:
            title = (
                f"{self.cfg.method} on {self.cfg.model}, {split} at epoch {self.state.best_epoch}: "
                f"{100 * measured['accuracy']:.1f} % of {measured['n']:,}"
            )
            path = plot_confusion(
                report["confusion_matrix"]["counts"], names, self.s.run_dir / CONFUSION_FILE, title=title
            )
            report["confusion_png"] = str(path)
        return report

    def _finish(self, trainable: int, total: int) -> dict[str, Any]:
        st, sp = self.state, self.s.splits
        best = self.best_params
        if best is None:  # the best epoch was trained before a resume: its adapter is on disk
            _, best = read_adapter(self.s.run_dir / ADAPTER_FILE)
        _load_params(self.model, best, str(self.s.run_dir / ADAPTER_FILE))
        test = {"accuracy": None, "loss": None, "n": 0}
        classes = len(sp.class_names)
        has_test = sp.test is not None and len(sp.test) > 0
        # per-class accuracy and the confusion matrix: on test at the selected epoch, else on validation
        measured = evaluate_model(
            self.model,
            self._eval_loader(sp.test if has_test else sp.val),
            device=self.device,
            amp_dtype=self.s.amp_dtype,
            channels_last=self.s.channels_last,
            info=self.info,
            num_classes=classes,
        )
        if has_test:
            test = measured
        self.emit(ev.TestResult(accuracy=test["accuracy"], loss=test["loss"], n=test["n"], best_epoch=st.best_epoch))
        report = self._class_report(measured, "test" if has_test else "val")
        peak, peak_kind = _peak_memory(self.device)
        summary = {
            "best_epoch": st.best_epoch,
            "val_accuracy": st.best_val_accuracy,
            "val_loss": st.best_val_loss,
            "test_accuracy": test["accuracy"],
            "test_loss": test["loss"],
            "test_images": test["n"],
            "selection": "best validation accuracy (ties: lower validation loss); test measured at that epoch only",
            "trainable_params": trainable,
            "total_params": total,
            "trainable_percent": 100.0 * trainable / total,
            "method": self.cfg.method,
            "model": self.cfg.model,
            "data": self.cfg.data,
            "data_source": sp.source,
            "task": self.cfg.task,
            "epochs": self.cfg.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "train_seconds": st.train_seconds,
            "wall_seconds": time.perf_counter() - self.wall0,
            "img_per_s": st.train_images / st.step_seconds if st.step_seconds > 0 else None,
            "peak_memory_mb": peak,
            "peak_memory_kind": peak_kind,
            "device": str(self.device),
            "amp": _amp_name(self.s.amp_dtype),
            "amp_skipped_steps": st.skipped_steps,
            "world_size": self.info.world_size,
            "residual_dropout_rates": self.dropout_rates,
            "run_dir": str(self.s.run_dir),
            "adapter": str(self.s.run_dir / ADAPTER_FILE),
            "resumed": self.s.checkpoint is not None,
            "extensions": st.extensions,
            "notes": self.notes,
            "val_split": _drawn_summary(sp.val_drawn),
            "skipped_files": len(sp.skipped),
            "image_modes": dict(sp.image_modes),
            **report,
            "config": self.cfg.to_dict(),
        }
        if self.info.is_main:
            write_summary(self.s.run_dir, summary)
        self.emit(ev.TrainDone(summary=summary))
        return summary
