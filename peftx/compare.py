"""Which method for my data: train several methods on the same data, backbone, seed and schedule, side by side.

``compare(CompareConfig(...))`` is the library side of ``peftx compare``. One comparison = one directory::

    <output>/<method>/seed<S>/    an ordinary ``peftx train`` run directory (``peftx merge-export`` takes it as is),
                                  plus compare_run.json (what compare asked for, and how it ended) and compare.log
    <output>/compare.json         every run, the per-method summary (mean and spread over seeds), the merged latency
    <output>/compare.png          accuracy per method, and accuracy against trainable parameters

What is the same for every method, and what is not:

* The same :class:`~peftx.train.TrainConfig` for every run except ``method``, ``method_options`` and the three
  per-method hyper-parameters ``lr``, ``weight_decay``, ``dropout``. So the seed, the data (and its split), the data
  order (a function of seed and epoch in the trainer), augmentation, batch size, image size and the schedule's shape
  (epochs, warm-up, cool-down, min lr) are shared. ``compare.json`` records each run's resolved config and names any
  other field that differs (there must be none; a test checks it).
* The learning rate: RLRR, LoRA and full fine-tuning want different ones. Each method gets, in this order: an
  explicit per-method value (``--set full.lr=1e-4``), else the shared ``--lr``, else the recipe's (the VTAB task's,
  the demo's or the generic one — RLRR's values from the paper) times the method's ``recipe_lr_scale`` (declared in
  its module, :class:`peftx.methods.Method`; full fine-tuning takes a hundredth), which the trainer applies itself
  when no lr is given. The table prints each method's lr and where it came from.

Each run trains in its own Python process (``python -m peftx.compare_worker``): on CPU, peak memory is the process's
max RSS, which never goes down, so runs sharing one process would each report the largest peak so far; a crash, a
divergence or an out-of-memory kill of one method also stays in its process and becomes a row with its reason.

Interrupting (Ctrl-C / SIGTERM) forwards the signal to the running trainer, which writes its resumable checkpoint;
finished runs are never touched again. Re-running the same command skips finished runs, keeps failed ones as rows
(``retry_failed`` trains them again), resumes an interrupted run from its checkpoint (``peftx train --resume``) and
starts the rest. A run directory written with other settings is refused, not mixed in.

The merged model's latency: every method merges into the same plain timm model (the same class, state-dict keys and
shapes: checked here for every finished run, and op by op in tests/test_deploy.py), so it is timed once per distinct
merged graph — once per backbone in practice — on a real merged run, not once per method.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import events as ev
from ._util import first_line
from .adapter import merge_and_unload
from .compare_report import plot_compare
from .deploy import load_reference
from .errors import OutputError, PeftxError, TrainingInterrupted, UsageError
from .evaluate import resolve_device, use_fused_attention
from .fsutil import ensure_dir, write_text_atomic
from .methods import METHOD_NAMES, get_method, method_names
from .train import TrainConfig

# The default line-up. linear (head only) and full (all weights) join as soon as the method registry registers them:
# the default is this list filtered by what peftx.methods registers, so nothing here changes when they land.
DEFAULT_METHODS = ("rlrr", "aoft", "lora", "linear", "full")

# TrainConfig fields a method may set for itself; every other field is shared (same data, order and schedule).
PER_METHOD_FIELDS = ("lr", "weight_decay", "dropout")
# TrainConfig fields compare owns: set per run, never by the caller.
_OWNED_FIELDS = frozenset({"method", "method_options", "output", "resume", "overwrite", "data"})
# Recorded config fields that may legitimately differ between the runs of one comparison.
_MAY_DIFFER = frozenset({"method", "method_options", "output", "resume", "overwrite", *PER_METHOD_FIELDS})

COMPARE_FILE = "compare.json"
CHART_FILE = "compare.png"
RUN_RECORD = "compare_run.json"
RUN_LOG = "compare.log"
FORMAT = "peftx-compare"
FORMAT_VERSION = 1
_SUMMARY = "summary.json"
_ADAPTER = "adapter.safetensors"
_CHECKPOINT = Path("checkpoint") / "last.safetensors"
_RUN_FILES = (_SUMMARY, _ADAPTER, "adapter_config.json", "metrics.jsonl", str(_CHECKPOINT))
_METHOD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # a method name is also a directory name


# -- config -----------------------------------------------------------------------------------------------------------


@dataclass
class CompareConfig:
    """A comparison: the methods, the shared training settings, per-method overrides, where to write."""

    output: str  # the comparison directory (created; re-running with the same settings resumes it)
    data: str = "demo"  # what peftx train --data takes
    methods: list[str] | None = None  # None: DEFAULT_METHODS that are registered
    seeds: int = 1  # runs per method, with seeds seed, seed+1, ...
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields shared by every run (model, epochs...)
    per_method: dict[str, dict[str, Any]] = field(default_factory=dict)  # {method: {lr/weight_decay/dropout/option}}
    force: bool = False  # start every run afresh, replacing what the directory holds
    retry_failed: bool = False  # train failed runs again instead of keeping their rows
    latency: bool = True  # time the merged model once per backbone
    latency_batches: tuple[int, ...] = (1,)

    def __post_init__(self) -> None:
        if not isinstance(self.seeds, int) or isinstance(self.seeds, bool) or self.seeds < 1:
            raise UsageError(f"seeds: {self.seeds!r} must be an integer >= 1", "e.g. --seeds 3")
        if not isinstance(self.train, dict) or not isinstance(self.per_method, dict):
            raise UsageError("train and per_method must be mappings")
        owned = sorted(set(self.train) & _OWNED_FIELDS)
        if owned:
            raise UsageError(
                f"compare sets {', '.join(owned)} itself for every run",
                "pass the data as data=..., the methods as methods=[...], per-method values as "
                "per_method={method: {...}}",
            )
        if self.methods is not None:
            self.methods = [str(m).strip() for m in self.methods if str(m).strip()]
            if not self.methods:
                raise UsageError("methods: the list is empty", "e.g. --methods rlrr,lora")
            if len(set(self.methods)) != len(self.methods):
                raise UsageError(f"methods: {', '.join(self.methods)} names a method twice", "list each method once")
        for m in [*(self.methods or []), *self.per_method]:
            if not _METHOD_NAME.match(m):
                raise UsageError(f"method name {m!r} is not a plain name", "method names are like rlrr, lora, full")

        train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
        for m, values in self.per_method.items():
            shared = sorted((set(values) & train_fields) - set(PER_METHOD_FIELDS))
            if shared:
                raise UsageError(
                    f"{m}.{shared[0]}: {shared[0]} is shared by every method (one data order and schedule for all)",
                    f"set it once for all methods (--{shared[0].replace('_', '-')})",
                )
        unused = sorted(set(self.per_method) - set(self.method_names()))
        if unused:
            raise UsageError(
                f"per-method settings for {', '.join(unused)}, which is not compared",
                f"compared: {', '.join(self.method_names())}",
            )
        if any(not isinstance(b, int) or b < 1 for b in self.latency_batches):
            raise UsageError(f"latency_batches: {self.latency_batches!r} must be positive integers")

    def method_names(self) -> list[str]:
        return list(self.methods) if self.methods is not None else default_methods()

    def seed_list(self) -> list[int]:
        base = self.train.get("seed", 42)
        return [base + i for i in range(self.seeds)]


def default_methods() -> list[str]:
    """DEFAULT_METHODS that this peftx registers, in that order (the registry adds linear and full)."""
    return [m for m in DEFAULT_METHODS if m in METHOD_NAMES]


def parse_set(items: list[str] | tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``["full.lr=1e-4", "lora.r=4", "lora.targets=q,v"]`` -> ``{"full": {"lr": 1e-4}, "lora": {...}}``.

    A value is read as JSON (numbers, true/false, lists), else as a comma list when it has commas, else as text.
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        method, dot, name = key.strip().partition(".")
        if not sep or not dot or not method or not name:
            raise UsageError(f"--set {item!r} is not METHOD.FIELD=VALUE", "e.g. --set full.lr=1e-4 --set lora.r=4")
        raw = raw.strip()
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = [v.strip() for v in raw.split(",") if v.strip()] if "," in raw else raw
        out.setdefault(method, {})[name.strip()] = value
    return out


def method_lr_scale(method: str) -> float:
    """The factor the trainer applies to the recipe's lr for ``method`` when none is given (1 for unknown names)."""
    return get_method(method).recipe_lr_scale if method in method_names() else 1.0


# -- plan -------------------------------------------------------------------------------------------------------------


@dataclass
class RunPlan:
    """One (method, seed) run: the TrainConfig it trains with, or why it cannot."""

    method: str
    seed: int
    run_dir: Path
    request: dict[str, Any] | None  # TrainConfig.to_dict() (unresolved: None = the recipe's value)
    sources: dict[str, str]  # per-method field -> where its value came from
    error: dict[str, str] | None = None  # {"reason", "error_type"} when the config cannot even be built
    action: str = ""  # new | resume | skip | failed (kept) | invalid


def _absolute_if_path(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() not in ("demo", "digits"):
        p = Path(value).expanduser()
        if p.exists():
            return str(p.absolute())
    return value


def _shared_config(cfg: CompareConfig) -> dict[str, Any]:
    """The TrainConfig fields every run gets (before the method's own), validated once through TrainConfig."""
    shared = dict(cfg.train)
    shared["data"] = _absolute_if_path(cfg.data)
    if shared.get("weights") is not None:
        shared["weights"] = str(Path(shared["weights"]).expanduser().absolute())
    try:
        TrainConfig(**shared, method=METHOD_NAMES[0])  # a bad shared value fails the whole comparison, now
    except TypeError as e:
        raise UsageError(f"train settings: {e}", "use TrainConfig field names") from None
    return shared


def plan_runs(cfg: CompareConfig) -> list[RunPlan]:
    """Every (method, seed) run with its exact TrainConfig, and for each a reason if it cannot run."""
    shared = _shared_config(cfg)
    out = Path(cfg.output)
    plans = []
    for method in cfg.method_names():
        own = dict(cfg.per_method.get(method, {}))
        fields = {k: own.pop(k) for k in PER_METHOD_FIELDS if k in own}
        sources: dict[str, str] = {}
        for name in PER_METHOD_FIELDS:
            if name in fields:
                sources[name] = "set"
            elif shared.get(name) is not None:
                sources[name] = "shared"
            elif name == "lr" and method_lr_scale(method) != 1:
                sources[name] = "recipe x method"  # the trainer scales the recipe's lr (Method.recipe_lr_scale)
            else:
                sources[name] = "recipe"
        for seed in cfg.seed_list():
            run_dir = out / method / f"seed{seed}"
            kwargs = {
                **shared,
                **fields,
                "seed": seed,
                "method": method,
                "method_options": own,
                "output": str(run_dir.absolute()),
            }
            plan = RunPlan(method, seed, run_dir, None, sources)
            if method not in METHOD_NAMES:
                plan.error = {
                    "reason": f"unknown method {method!r} (this peftx registers {', '.join(METHOD_NAMES)})",
                    "error_type": "UsageError",
                }
            else:
                try:
                    plan.request = TrainConfig(**kwargs).to_dict()
                except PeftxError as e:
                    plan.error = {
                        "reason": e.message + (f" ({e.hint})" if e.hint else ""),
                        "error_type": type(e).__name__,
                    }
            plans.append(plan)
    return plans


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def decide_action(plan: RunPlan, *, force: bool, retry_failed: bool) -> str:
    """What this invocation does with ``plan``'s directory: new | resume | skip | failed | invalid.

    Refuses (OutputError) a directory holding a run that compare did not start, or one started with other settings.
    """
    if plan.error is not None:
        return "invalid"
    d = plan.run_dir
    record = _read_json(d / RUN_RECORD)
    has_run = any((d / f).exists() for f in _RUN_FILES)
    if record is None:
        if has_run:
            raise OutputError(
                f"{d} holds a training run that peftx compare did not start",
                "choose another --output, or move that run away",
            )
        return "new"
    if force:
        return "new"
    diff = [k for k in _differences(record.get("request") or {}, plan.request or {}) if k != "output"]
    if diff:  # (the output path may differ: a comparison directory can be moved)
        raise OutputError(
            f"{d} holds a {plan.method} run with other settings ({', '.join(diff[:6])} differ)",
            "re-run with the options it was started with, pass --force to start over, or choose another --output",
        )
    if (d / _SUMMARY).exists():
        return "skip"
    if record.get("status") == "failed" and not retry_failed:
        return "failed"
    if (d / _CHECKPOINT).exists() and record.get("status") != "failed":
        return "resume"
    return "new"


# -- running one run in its own process -------------------------------------------------------------------------------


class _Signals:
    """While a comparison runs: SIGINT / SIGTERM are forwarded to the running trainer (which checkpoints), and the
    comparison stops after it. A second signal is forwarded too (the trainer then stops at once)."""

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.received: str | None = None

    def handle(self, signum: int, _frame: Any) -> None:
        self.received = signal.Signals(signum).name
        child = self.child
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    @contextmanager
    def installed(self) -> Iterator[_Signals]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _write_record(plan: RunPlan, **fields: Any) -> dict[str, Any]:
    path = plan.run_dir / RUN_RECORD
    record = _read_json(path) or {}
    record.update(
        {
            "format": FORMAT + "-run",
            "method": plan.method,
            "seed": plan.seed,
            "request": plan.request,
            "sources": plan.sources,
            **fields,
        }
    )
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")
    return record


def _worker_argv(request: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "peftx.compare_worker", json.dumps(request)]


def _run_one(plan: RunPlan, signals: _Signals, emit: ev.Progress) -> dict[str, Any]:
    """Train ``plan`` in a child process; returns its updated record (status ok / failed / interrupted)."""
    ensure_dir(plan.run_dir)
    request = dict(plan.request or {})
    if plan.action == "resume":
        request["resume"] = request["output"]
    else:
        request["overwrite"] = True  # a "new" run replaces only the files of an earlier, unfinished attempt
    attempts = (_read_json(plan.run_dir / RUN_RECORD) or {}).get("attempts", 0) + 1
    _write_record(plan, status="running", reason=None, error_type=None, attempts=attempts)
    result: dict[str, Any] = {}
    t0 = time.perf_counter()
    with open(plan.run_dir / RUN_LOG, "a", encoding="utf-8") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {plan.action} {plan.method} seed {plan.seed}\n")
        log.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(
            _worker_argv(request), stdout=subprocess.PIPE, stderr=log, text=True, env=env, start_new_session=True
        )  # its own group: a terminal's Ctrl-C reaches it once, via us
        signals.child = proc
        if signals.received:  # the signal came while the process was being started
            proc.send_signal(signal.SIGINT)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                try:
                    message = json.loads(line)
                except ValueError:
                    log.write(line)
                    continue
                train_event = ev.from_message(message)
                event = message.pop("event", None)
                if event == "result":
                    result = message
                elif train_event is not None:
                    emit(ev.CompareTrain(method=plan.method, seed=plan.seed, event=train_event))
                elif event == "worker" and message.get("baseline_rss_mb") is not None:
                    _write_record(plan, baseline_rss_mb=message["baseline_rss_mb"])
            code = proc.wait()
        finally:
            if proc.poll() is None:  # we are unwinding from an error of our own: do not leave a trainer behind
                proc.send_signal(signal.SIGTERM)
                proc.wait()
            signals.child = None
    status = result.get("status")
    if status is None:  # no result line: the process died (killed, out of memory, a crash in native code)
        if code < 0:
            name = signal.Signals(-code).name
            why = " (out of memory?)" if name == "SIGKILL" else ""
            reason = f"the training process was killed by {name}{why}"
        else:
            reason = f"the training process exited with code {code} without a result (see {plan.run_dir / RUN_LOG})"
        status, result = (
            ("interrupted" if signals.received else "failed"),
            {"reason": reason, "error_type": "ProcessDied"},
        )
    return _write_record(
        plan,
        status=status,
        reason=result.get("reason"),
        error_type=result.get("error_type"),
        exit_code=code,
        seconds=time.perf_counter() - t0,
        cpu_seconds=result.get("cpu_seconds"),
    )


# -- rows and summary -------------------------------------------------------------------------------------------------


def _run_row(plan: RunPlan, record: dict[str, Any] | None, action: str) -> dict[str, Any]:
    row: dict[str, Any] = {
        "method": plan.method,
        "seed": plan.seed,
        "run_dir": str(plan.run_dir),
        "action": action,
        "sources": plan.sources,
    }
    if plan.error is not None:
        return {**row, "status": "failed", **plan.error}
    record = record or {}
    summary = _read_json(plan.run_dir / _SUMMARY)
    if summary is None:
        return {
            **row,
            "status": record.get("status") or "pending",
            "reason": record.get("reason"),
            "error_type": record.get("error_type"),
        }
    adapter = plan.run_dir / _ADAPTER
    config = summary.get("config") or {}
    return {
        **row,
        "status": "ok",
        "reason": None,
        "test_accuracy": summary.get("test_accuracy"),
        "val_accuracy": summary.get("val_accuracy"),
        "test_images": summary.get("test_images"),
        "best_epoch": summary.get("best_epoch"),
        "epochs": summary.get("epochs"),
        "steps_per_epoch": summary.get("steps_per_epoch"),
        "trainable_params": summary.get("trainable_params"),
        "total_params": summary.get("total_params"),
        "adapter_bytes": adapter.stat().st_size if adapter.exists() else None,
        "train_seconds": summary.get("train_seconds"),
        "img_per_s": summary.get("img_per_s"),
        "peak_memory_mb": summary.get("peak_memory_mb"),
        "peak_memory_kind": summary.get("peak_memory_kind"),
        "baseline_rss_mb": record.get("baseline_rss_mb"),
        "device": summary.get("device"),
        "process_seconds": record.get("seconds"),
        "cpu_seconds": record.get("cpu_seconds"),
        "lr": config.get("lr"),
        "weight_decay": config.get("weight_decay"),
        "dropout": config.get("dropout"),
        "resumed": summary.get("resumed"),
        "config": config,
    }


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def aggregate(rows: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    """One entry per method: mean and spread (sample sd, min, max) over its successful seeds; reasons of the rest."""
    out = []
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        ok = [r for r in mine if r["status"] == "ok"]
        acc = [r["test_accuracy"] for r in ok if r.get("test_accuracy") is not None]
        entry: dict[str, Any] = {
            "method": method,
            "runs": len(mine),
            "ok": len(ok),
            "failures": [
                {"seed": r["seed"], "status": r["status"], "reason": r.get("reason")}
                for r in mine
                if r["status"] != "ok"
            ],
        }
        if ok:
            first = ok[0]
            entry.update(
                {
                    "test_accuracy": _mean(acc),
                    "test_accuracy_sd": statistics.stdev(acc) if len(acc) > 1 else None,
                    "test_accuracy_min": min(acc) if acc else None,
                    "test_accuracy_max": max(acc) if acc else None,
                    "val_accuracy": _mean([r["val_accuracy"] for r in ok if r.get("val_accuracy") is not None]),
                    "best_epochs": [r.get("best_epoch") for r in ok],
                    "epochs": first.get("epochs"),
                    "trainable_params": first.get("trainable_params"),
                    "total_params": first.get("total_params"),
                    "adapter_bytes": first.get("adapter_bytes"),
                    "lr": first.get("lr"),
                    "lr_source": first["sources"].get("lr"),
                    **{
                        k: _mean([r[k] for r in ok if r.get(k) is not None])
                        for k in ("train_seconds", "img_per_s", "peak_memory_mb", "baseline_rss_mb")
                    },
                    "peak_memory_kind": first.get("peak_memory_kind"),
                }
            )
        out.append(entry)
    return out


def config_differences(rows: list[dict[str, Any]]) -> list[str]:
    """Recorded TrainConfig fields that differ between finished runs beyond the method and its own
    hyper-parameters: should be empty. Runs of one seed are compared on everything else, seed included; runs of
    different seeds on everything but the seed."""
    ok = [r for r in rows if r["status"] == "ok"]
    fields: set[str] = set()
    for r in ok[1:]:
        diff = set(_differences(ok[0]["config"], r["config"])) - _MAY_DIFFER
        fields |= diff if r["seed"] == ok[0]["seed"] else diff - {"seed"}
        same_seed = next(o for o in ok if o["seed"] == r["seed"])
        fields |= set(_differences(same_seed["config"], r["config"])) - _MAY_DIFFER
    return sorted(fields)


def _shared_settings(rows: list[dict[str, Any]], cfg: CompareConfig) -> dict[str, Any]:
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return {"data": cfg.data, "seeds": cfg.seed_list(), **{k: v for k, v in cfg.train.items()}}
    c = ok[0]["config"]
    keys = (
        "model",
        "data",
        "task",
        "img_size",
        "epochs",
        "batch_size",
        "warmup_epochs",
        "cooldown_epochs",
        "min_lr",
        "hflip",
        "amp",
        "device",
    )
    return {
        **{k: c.get(k) for k in keys},
        "seeds": cfg.seed_list(),
        "steps_per_epoch": ok[0].get("steps_per_epoch"),
        "test_images": ok[0].get("test_images"),
    }


def _result(
    cfg: CompareConfig, plans: list[RunPlan], rows: list[dict[str, Any]], latency: dict[str, Any] | None, state: str
) -> dict[str, Any]:
    methods = cfg.method_names()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "state": state,
        "output": str(cfg.output),
        "methods": methods,
        "seeds": cfg.seed_list(),
        "shared": _shared_settings(rows, cfg),
        "per_method": cfg.per_method,
        "differing_fields": config_differences(rows),
        "summary": aggregate(rows, methods),
        "runs": rows,
        "latency": latency,
        "chart": str(Path(cfg.output) / CHART_FILE),
    }


def _save(result: dict[str, Any]) -> None:
    write_text_atomic(Path(result["output"]) / COMPARE_FILE, json.dumps(result, indent=2, default=str) + "\n")


# -- merged latency ---------------------------------------------------------------------------------------------------


def merged_signature(model: Any) -> str:
    """What makes two merged models the same graph: the class, and every state-dict key with its shape."""
    import hashlib

    items = [f"{type(model).__module__}.{type(model).__qualname__}"]
    items += [f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items()]
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]


def measure_merged_latency(
    run_dirs: list[str | Path], *, batches: tuple[int, ...] = (1,), device: str = "auto", min_run_time: float = 2.0
) -> dict[str, Any]:
    """Merge each finished run, group them by merged graph, time one model per group (torch.utils.benchmark).

    Eager PyTorch, float32, fused SDPA attention (as ``peftx eval`` runs it), torch's thread count; ONNX Runtime and
    TensorRT figures are ``peftx bench``'s. Returns {"graphs": [...], "same_graph": bool}.
    """
    import logging

    import torch

    # torch.utils.benchmark imports cpp_extension, which logs a CUDA_HOME warning on machines without CUDA
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import benchmark

    dev = resolve_device(device)
    groups: dict[str, dict[str, Any]] = {}
    problems = []
    for run_dir in run_dirs:
        try:
            loaded = load_reference(run_dir)
            merged = merge_and_unload(loaded.model)
        except Exception as e:  # noqa: BLE001 - a run that will not merge is reported, it does not stop the others
            problems.append({"run_dir": str(run_dir), "reason": first_line(f"{type(e).__name__}: {e}")})
            continue
        sig = merged_signature(merged)
        group = groups.setdefault(
            sig,
            {
                "signature": sig,
                "runs": [],
                "model": merged,
                "data_config": loaded.data_config,
                "class": type(merged).__name__,
            },
        )
        group["runs"].append(str(run_dir))
    graphs = []
    for group in groups.values():
        model = group.pop("model").to(dev).eval()
        use_fused_attention(model)
        _, h, w = group["data_config"]["input_size"]
        timings = []
        for b in batches:
            x = torch.randn(b, 3, int(h), int(w), device=dev)
            with torch.inference_mode():
                model(x)  # warm-up (allocations, kernels)
                t = benchmark.Timer(
                    stmt="model(x)", globals={"model": model, "x": x}, num_threads=torch.get_num_threads()
                ).blocked_autorange(min_run_time=min_run_time)
            timings.append(
                {
                    "batch": b,
                    "median_ms": 1e3 * t.median,
                    "iqr_ms": 1e3 * t.iqr,
                    "img_per_s": b / t.median,
                    "measurements": len(t.times),
                }
            )
        graphs.append(
            {
                **{k: v for k, v in group.items() if k != "data_config"},
                "input_size": list(group["data_config"]["input_size"]),
                "timings": timings,
            }
        )
    return {
        "graphs": graphs,
        "same_graph": len(graphs) <= 1,
        "problems": problems,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "backend": "pytorch eager fp32",
        "note": "every method merges into the plain timm model; timed once per distinct merged graph",
    }


# -- the comparison ---------------------------------------------------------------------------------------------------


def _interrupted(
    cfg: CompareConfig, plans: list[RunPlan], rows: list[dict[str, Any]], plan: RunPlan, signals: _Signals
) -> TrainingInterrupted:
    _save(_result(cfg, plans, rows, None, "interrupted"))
    done = sum(r["status"] == "ok" for r in rows)
    return TrainingInterrupted(
        f"comparison interrupted by {signals.received or 'a signal'} at {plan.method} seed {plan.seed}; "
        f"{done} finished run(s) kept in {cfg.output}",
        "re-run the same command to continue: finished runs are skipped, an interrupted one resumes from its "
        "checkpoint",
    )


def compare(cfg: CompareConfig, progress: ev.Progress | None = None) -> dict[str, Any]:
    """Run (or resume) the comparison ``cfg`` describes; returns what ``compare.json`` holds.

    ``progress`` receives typed events (:mod:`peftx.events`): ``ComparePlan``, ``CompareRunStart``,
    ``CompareTrain`` (the running trainer's own events), ``CompareRunEnd``, ``CompareLatency``, ``CompareDone``.
    Raises TrainingInterrupted after SIGINT / SIGTERM, once the running
    trainer has written its checkpoint and compare.json holds every finished run.
    """
    emit = progress or ev.quiet
    plans = plan_runs(cfg)
    for plan in plans:  # every refusal before anything runs
        plan.action = decide_action(plan, force=cfg.force, retry_failed=cfg.retry_failed)
    out = ensure_dir(Path(cfg.output))
    emit(ev.ComparePlan(runs=[{"method": p.method, "seed": p.seed, "action": p.action} for p in plans]))
    rows = [_run_row(p, _read_json(p.run_dir / RUN_RECORD), p.action) for p in plans]
    signals = _Signals()
    with signals.installed():
        for i, plan in enumerate(plans):
            if signals.received:
                raise _interrupted(cfg, plans, rows, plan, signals)
            if plan.action in ("new", "resume"):
                _save(_result(cfg, plans, rows, None, "running"))
                emit(
                    ev.CompareRunStart(
                        method=plan.method, seed=plan.seed, index=i, total=len(plans), action=plan.action
                    )
                )
                record = _run_one(plan, signals, emit)
                rows[i] = _run_row(plan, record, plan.action)
            emit(ev.CompareRunEnd(row=rows[i], index=i, total=len(plans)))
            if signals.received or rows[i]["status"] == "interrupted":
                raise _interrupted(cfg, plans, rows, plan, signals)
        _save(_result(cfg, plans, rows, None, "running"))
    latency = None
    ok_dirs = [r["run_dir"] for r in rows if r["status"] == "ok"]
    if cfg.latency and ok_dirs:
        latency = measure_merged_latency(
            ok_dirs, batches=cfg.latency_batches, device=str(cfg.train.get("device", "auto"))
        )
        emit(ev.CompareLatency(latency=latency))
    result = _result(cfg, plans, rows, latency, "done")

    plot_compare(result, out / CHART_FILE)
    _save(result)
    emit(ev.CompareDone(result=result))
    return result


def load_result(output: str | Path) -> dict[str, Any]:
    """A comparison's compare.json."""
    path = Path(output) / COMPARE_FILE
    data = _read_json(path)
    if data is None or data.get("format") != FORMAT:
        raise OutputError(f"{path} is not a peftx compare result", "run peftx compare --output DIR first")
    return data


__all__ = [
    "CompareConfig",
    "compare",
    "default_methods",
    "parse_set",
    "plan_runs",
    "decide_action",
    "aggregate",
    "config_differences",
    "measure_merged_latency",
    "merged_signature",
    "load_result",
    "DEFAULT_METHODS",
    "PER_METHOD_FIELDS",
    "COMPARE_FILE",
    "CHART_FILE",
    "RUN_RECORD",
]
