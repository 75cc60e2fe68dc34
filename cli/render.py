"""The CLI's one view of the library's progress events (:mod:`peftx.events`), on stderr.

On a terminal: rich bars (an epoch bar and a step bar while a run trains), with the run's configuration and time
estimate printed above them. Anywhere else (``nohup``, CI, ``2> log``): plain lines as they happen, one per epoch
(epoch, losses, validation accuracy, time left), each flushed at once, so a log shows a run's progress while it runs
rather than a bar drawn once at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from peftx import events as ev
from peftx.preprocess import DECODE_RULE, MODE_NAMES, describe

from .output import duration, err_console

LONG_RUN_S = 20 * 60  # an estimate above this says how to make the run shorter


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def start_lines(f: dict[str, Any]) -> list[str]:
    """The effective configuration of a run (the library's ``TrainStart`` event), before its first step."""
    c = f["config"]
    size = f"{c['img_size']} px" if c.get("img_size") else "the backbone's size"
    lines = [
        f"{c['method']} on {c['model']}: {f['trainable_params']:,} of {f['total_params']:,} parameters trained",
        f"data {c['data']}: {f['train_size']:,} train / {f['val_size']:,} val / {f['test_size']:,} test images at "
        f"{size}, batch {c['batch_size']} ({f['steps_per_epoch']} steps per epoch)",
        f"schedule: {_count(c['epochs'], 'epoch')}, AdamW lr {c['lr']:g}, warm-up {c['warmup_epochs']:g} from "
        f"{c['warmup_lr']:g}, cosine to {c['min_lr']:g}, cool-down {c['cooldown_epochs']}",
        *(
            [f"preprocessing: {describe(f['preprocessing'])}; eval and the bundle's infer.py apply the same"]
            if f.get("preprocessing")
            else []
        ),
        f"regularisation: weight decay {c['weight_decay']:g}, residual dropout {c['dropout']:g}, flip "
        f"{'on' if c['hflip'] else 'off'}; seed {c['seed']}",
        f"device {f['device']}, AMP {f['amp']}, {_count(f['world_size'], 'process', 'processes')}; run directory "
        f"{f['run_dir']}",
    ]
    drawn = f.get("val_drawn")
    if drawn:
        lines.append(
            f"validation: {drawn['n']:,} images drawn from train/ (no val/ folder): {drawn['fraction']:.0%} "
            f"of each class, at most {drawn['max_per_class']}, seed {drawn['seed']}; the list is "
            f"{drawn['file']} in the run directory"
        )
    skipped = f.get("skipped_files") or []
    if skipped:
        names = ", ".join(Path(p).name for p in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        lines.append(f"skipped {_count(len(skipped), 'non-image file')} in the dataset ({names})")
    lines += image_lines(f.get("image_modes") or {}, f.get("exif_rotated") or 0)
    if f["resumed"]:
        lines.append(f"resumed after epoch {f['start_epoch']} of {f['epochs']}")
    lines += [f"note: {n}" for n in f["notes"]]
    return lines


def image_lines(modes: dict[str, int], rotated: int) -> list[str]:
    """The data's image files per PIL mode, when they are not all 8-bit RGB or some are turned by their EXIF
    orientation: what peftx.preprocess.to_rgb (training, eval and the bundle's infer.py alike) makes of them."""
    if not modes or (set(modes) == {"RGB"} and not rotated):
        return []
    counts = ", ".join(
        f"{n:,} {MODE_NAMES.get(m, m)}" + (f" ({m})" if m in MODE_NAMES else "") for m, n in modes.items()
    )
    line = f"{'mixed image modes' if len(modes) > 1 else 'image mode'}: {counts}"
    if rotated:
        line += f"; {_count(rotated, 'file')} turned by an EXIF orientation"
    how = [
        what
        for present, what in (
            (any(m.startswith("I") for m in modes), "16-bit / 257"),
            ("F" in modes, "float as 0..1"),
            (bool({"RGBA", "LA", "P"} & set(modes)), "transparency over white"),
            ("CMYK" in modes, "CMYK without ICC"),
            (rotated > 0, "EXIF orientation applied"),
        )
        if present
    ]
    return [
        line,
        f"decoded to 8-bit RGB by rule {DECODE_RULE}{' (' + ', '.join(how) + ')' if how else ''}, the same in eval "
        "and the bundle's infer.py (docs/images.md)",
    ]


def estimate_lines(f: dict[str, Any]) -> list[str]:
    """The library's ``Estimate`` event: the time the rest of the run will take."""
    lines = [
        f"estimate: about {duration(f['total_seconds'])} to go ({f['steps_remaining']:,} steps x "
        f"{f['seconds_per_step']:.2f} s, measured on {f['measured_steps']} step(s), + about "
        f"{duration(f['eval_seconds'])} of evaluation)"
    ]
    if f["total_seconds"] > LONG_RUN_S:
        lines.append(
            "that is a long run: --epochs N and --img-size PX shorten it (half the size is about 4x "
            "cheaper); Ctrl-C stops it with a resumable checkpoint"
        )
    return lines


def epoch_line(e: ev.EpochEnd, seconds_left: float | None) -> str:
    """One finished epoch, as a plain line (what a log shows where there are no bars)."""
    left = f", about {duration(seconds_left)} left" if seconds_left is not None else ""
    return (
        f"epoch {e.epoch}/{e.epochs}: train loss {e.train_loss:.4f}, val loss {e.val_loss:.4f}, "
        f"val accuracy {100 * e.val_accuracy:.1f} %{_best(e)}, {e.seconds:.1f} s{left}"
    )


def _best(e: ev.EpochEnd) -> str:
    if e.best_val_accuracy is None:
        return ""
    return f" (best {100 * e.best_val_accuracy:.1f} % @ {e.best_epoch})"


class _TrainView:
    """One training run's events: bars on a terminal, plain lines elsewhere."""

    def __init__(self, renderer: Renderer, *, bar: Progress | None, brief: bool, indent: str) -> None:
        """``brief``: a run inside a comparison (no configuration or estimate lines, shorter bar descriptions)."""
        self.r, self.bar, self.brief, self.indent = renderer, bar, brief, indent
        self.epochs: TaskID | None = None
        self.steps: TaskID | None = None
        self.epoch_seconds: list[float] = []

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.TrainStart):
            if self.bar is not None:
                self.epochs = self.bar.add_task("epochs", total=event.epochs, completed=event.start_epoch)
        elif isinstance(event, ev.Estimate):
            if not self.brief:
                self.r.note_lines(estimate_lines(event.fields()))
        elif isinstance(event, ev.EpochStart) and self.bar is not None:
            if self.steps is not None:
                self.bar.remove_task(self.steps)
            self.steps = self.bar.add_task(
                f"epoch {event.epoch}/{event.epochs}", total=event.steps, completed=event.start_step
            )
        elif isinstance(event, ev.Step) and self.bar is not None and self.steps is not None:
            extra = "" if self.brief else f" lr {event.lr:.2e}"
            self.bar.update(
                self.steps, completed=event.step, description=f"epoch {event.epoch} loss {event.loss:.4f}{extra}"
            )
        elif isinstance(event, ev.EpochEnd):
            self.epoch_seconds.append(event.seconds)
            if self.bar is not None and self.epochs is not None:
                best = (
                    f", best {100 * event.best_val_accuracy:.1f} % @ {event.best_epoch}"
                    if not self.brief and event.best_val_accuracy is not None
                    else ""
                )
                self.bar.update(
                    self.epochs,
                    completed=event.epoch,
                    description=f"epochs (val {100 * event.val_accuracy:.1f} %{best})",
                )
            elif self.bar is None:
                mean = sum(self.epoch_seconds) / len(self.epoch_seconds)
                self.r.line(self.indent + epoch_line(event, mean * (event.epochs - event.epoch)))


class Renderer:
    """The callback the CLI hands the library: ``progress=renderer``. Use it as a context manager (bars are stopped on
    the way out, also when the call fails); ``live=None``: bars only when the console is a terminal."""

    def __init__(self, console: Console | None = None, *, live: bool | None = None) -> None:
        self.console = console or err_console
        self.live = self.console.is_terminal if live is None else live
        self.bar: Progress | None = None
        self.view: _TrainView | None = None

    def __enter__(self) -> Renderer:
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()

    # -- output --------------------------------------------------------------------------------------------------
    def note_lines(self, lines: list[str]) -> None:
        for line in lines:
            self.console.print(f"· {line}", style="dim", markup=False, highlight=False, soft_wrap=True)

    def line(self, text: str) -> None:
        """One plain line, written (and flushed: rich flushes after each print) as it happens."""
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def _open_bar(self, *, transient: bool, indent: str) -> Progress | None:
        if not self.live:
            return None
        self.close()
        if transient:
            columns: tuple[Any, ...] = (
                TextColumn(indent + "{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
            )
        else:
            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
        self.bar = Progress(*columns, console=self.console, transient=transient)
        self.bar.start()
        return self.bar

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    # -- events --------------------------------------------------------------------------------------------------
    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.ExportStep):
            self.console.print(f"[dim]· {event.message}[/]")
        elif isinstance(event, ev.TrainStart):  # a run of its own (train, demo): its bar shows from here on
            self.note_lines(start_lines(event.fields()))
            self.view = _TrainView(self, bar=self._open_bar(transient=False, indent=""), brief=False, indent="")
            self.view(event)
        elif isinstance(event, ev.TrainDone):
            self.close()  # the bar's last state stays on screen; what follows (demo's export) prints below it
            self.view = None
        elif isinstance(event, ev.TRAIN_EVENTS):
            if self.view is not None:
                self.view(event)
        elif isinstance(event, ev.CompareTrain):
            if self.view is not None:
                self.view(event.event)
        else:
            self._compare(event)

    def _compare(self, event: ev.Event) -> None:
        if isinstance(event, ev.ComparePlan):
            actions = [r["action"] for r in event.runs]
            counts = {a: actions.count(a) for a in ("new", "resume", "skip", "failed", "invalid")}
            self.console.print(
                f"{len(actions)} run(s): {counts['new'] + counts['resume']} to train "
                f"({counts['resume']} resuming), {counts['skip']} finished earlier, "
                f"{counts['failed']} failed earlier (--retry-failed), {counts['invalid']} cannot run"
            )
        elif isinstance(event, ev.CompareRunStart):
            self.console.print(
                f"[{event.index + 1}/{event.total}] {event.method} seed {event.seed}"
                f"{' (resuming)' if event.action == 'resume' else ''}"
            )
            bar = self._open_bar(transient=True, indent="  ")
            self.view = _TrainView(self, bar=bar, brief=True, indent="  ")
        elif isinstance(event, ev.CompareRunEnd):
            self.close()
            self.view = None
            row = event.row
            if row["status"] == "ok":
                acc = row.get("test_accuracy")
                what = f"test {100 * acc:.2f} %" if acc is not None else "no test split"
                self.console.print(
                    f"  {row['method']} seed {row['seed']}: {what}"
                    f"{' (finished earlier)' if row.get('action') == 'skip' else ''}"
                )
            else:
                self.console.print(
                    f"  {row['method']} seed {row['seed']}: {row['status']}: {row.get('reason')}", markup=False
                )
        elif isinstance(event, ev.CompareLatency):
            self.console.print("timing the merged model")


__all__ = ["Renderer", "start_lines", "image_lines", "estimate_lines", "epoch_line", "LONG_RUN_S"]
