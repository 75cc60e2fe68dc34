"""Deployment bundle: ONNX (+FP16, +engine), preprocessing, a standalone infer.py, build script and parity evidence.

Layout of a bundle directory::

    model.onnx          FP32, dynamic batch; metadata_props carry preprocessing, class names and provenance
    model_fp16.onnx     always written: TensorRT 11's FP16 build input and the FP16 emulation ONNX Runtime checks
    model_int8.onnx     --precision int8 only: symmetric Q/DQ graph calibrated on the run's training images (int8.py)
    model.engine        only when TensorRT built one here (+ model.engine.json: what it was built for)
    build_engine.sh     trtexec for TensorRT 8.5 / 8.6 / 10.x / 11.x, each with its own flags, on the target device
    infer.py            standalone (no peftx import): metadata.json preprocessing -> engine or ONNX -> top-5
    metadata.json       every fact above, the deployment target, sha256 of every artifact, status "ok" | "failed"
    parity.json         each backend vs the UNMERGED reference model, on real images and random inputs
    trt_readiness.json  the target's TensorRT parser readiness of model.onnx and model_fp16.onnx AS SHIPPED
    reference_set.npz   real preprocessed images + the UNMERGED model's outputs (+ reference/ raw files):
                        what infer.py --check runs
    model_deepstream.onnx, config_infer_primary.txt, labels.txt   DeepStream: the model with its normalisation and a
                        softmax inside, its Gst-nvinfer config and labels (deepstream.py)
    README.md           for the person at the device: what to install per JetPack, build, check, run

The export follows the deployment target (``targets.py``): its opset, its LayerNorm form (decomposed for TensorRT
8.5, whose FP16 build and FP16 ONNX keep that subgraph FP32), its op list. The target is recorded in metadata.json
and in the ONNX metadata_props (``peftx_target``).

The bundle is assembled in a temporary directory next to ``out_dir`` (same filesystem) and renamed into place only
when complete. A parity failure still writes it (for inspection) with status "failed", then raises ParityError.
parity.json and trt_readiness.json are reports that ``validate_bundle`` regenerates, so they are not hashed; neither
is model.engine, which build_engine.sh rebuilds on the device (model.engine.json ties it to its source ONNX).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import glob
import json
import os
import platform
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

import peftx
from peftx.errors import ExportError, OutputError, ParityError, UsageError
from peftx.fsutil import sha256_file, write_text_atomic
from peftx.preprocess import DECODE_DESCRIPTION, DECODE_RULE, contract
from peftx.tolerances import (
    ACCURACY_FP16,
    ACCURACY_FP32,
    ACCURACY_INT8,
    FP16,
    INT8,
    MERGE_FP32,
    MERGE_FP32_MEASURED,
    ONNX_FP32,
    ONNX_FP32_MEASURED,
    TENSORRT_FP32,
    Tolerance,
)

from . import deepstream as deepstream_mod
from . import int8 as int8_mod
from . import int8_fp16
from .accuracy import AccuracyReport, AccuracySet, Candidate, load_infer_module, measure_accuracy, result_for
from .fp16 import convert_to_fp16, strict_fp16_emulation
from .layernorm import decomposed_layernorms, fp32_node_names, unsafe_layer_names
from .onnx_export import INPUT_NAME, OUTPUT_NAME, export_onnx, op_histogram, param_count, read_metadata
from .parity import (
    ParityReport,
    ParityResult,
    compare,
    float64_outputs,
    fp32_noise,
    make_input_sets,
    reference_outputs,
)
from .reference_set import REFERENCE_FILE, write_reference_set
from .runners import OnnxRuntimeRunner, Runner, TensorRTRunner, TorchRunner
from .simplify import simplify_onnx
from .targets import TargetProfile, resolve_target
from .tensorrt import (
    MANIFEST_FILE,
    TensorRTMode,
    build_engine,
    check_engine_for_machine,
    machine_facts,
    probe,
    resolve_mode,
    resolve_target_here,
)
from .tensorrt_ops import TargetReadiness, check_target_readiness, check_tensorrt_readiness

FORMAT = "peftx-bundle"
FORMAT_VERSION = 1
ONNX_FILE, FP16_FILE, ENGINE_FILE = "model.onnx", "model_fp16.onnx", "model.engine"
INT8_FILE = "model_int8.onnx"
# model_int8.onnx under ONNX Runtime twice: unoptimised, the exact Q/DQ arithmetic TensorRT performs (what the gate,
# the fallback's ranking and validate measure: int8.exact_session_options), and optimised, this CPU's fused int8
# kernels (what infer.py runs and bench times; advisory: on a CPU without VNNI they saturate, TensorRT does not).
INT8_EXACT, INT8_FUSED = "onnxruntime int8", "onnxruntime int8 fused kernels"
INFER_FILE, BUILD_SCRIPT_FILE = "infer.py", "build_engine.sh"
README_FILE = "README.md"  # for the person at the device: install per JetPack, build, check, run
BENCH_FILE = "device_bench.py"
METADATA_FILE, PARITY_FILE, READINESS_FILE = "metadata.json", "parity.json", "trt_readiness.json"
# Odd batch sizes catch batch-mixing reshapes and padding bugs that even sizes can hide.
PARITY_BATCHES = (1, 3, 7)
RANDOM_BATCH = 3
# Images used to find FP16 large-magnitude nodes: enough for the activation range; bounds memory (~1.5 GB, ViT-B).
FP16_CALIBRATION_IMAGES = 8
_DATA_CONFIG_KEYS = ("input_size", "interpolation", "crop_pct", "mean", "std")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class _Options:
    """write_bundle's settings, resolved and validated."""

    input_size: tuple[int, int, int]
    preprocessing: dict[str, Any]
    class_names: list[str]
    provenance: Mapping[str, Any]
    batch: tuple[int, int, int]
    precision: Literal["fp32", "fp16", "int8"]
    tensorrt: TensorRTMode
    use_trt: bool
    trt_message: str
    simplify: bool
    parity_max_batch: int
    timing_cache: str | Path | None
    target: TargetProfile
    layernorms: int  # LayerNorm modules of the model: a decomposed export must show exactly this many
    accuracy_set: AccuracySet | None = None  # labelled images for the accuracy gate (None: not measured)
    int8: int8_mod.Int8Request | None = None  # calibration images and method (precision "int8")


@dataclass
class BundleReport:
    out_dir: Path
    status: Literal["ok", "failed"]
    parity: ParityReport
    readiness: TargetReadiness
    sha256: dict[str, str]
    tensorrt: dict[str, Any]
    simplify: dict[str, Any] | None
    fp16: dict[str, Any]
    timings: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    fp32_nodes: list[str] = field(default_factory=list)  # the target's FP32 nodes in FP16 builds
    reference_set: dict[str, Any] = field(default_factory=dict)  # metadata.json's entry (reference_set.py)
    deepstream: dict[str, Any] = field(default_factory=dict)  # metadata.json's entry (deepstream.py)
    int8: dict[str, Any] | None = None  # how model_int8.onnx was made (precision "int8")

    @property
    def target(self) -> TargetProfile:
        return self.readiness.target

    def to_json(self) -> dict:
        return {
            "out_dir": str(self.out_dir),
            "status": self.status,
            "target": target_summary(self.target),
            "parity": self.parity.to_json(),
            "readiness": self.readiness.to_json(),
            "sha256": self.sha256,
            "tensorrt": self.tensorrt,
            "simplify": self.simplify,
            "fp16": self.fp16,
            "int8": self.int8,
            "timings": self.timings,
            "warnings": self.warnings,
        }


def write_bundle(
    reference: torch.nn.Module,
    merged: torch.nn.Module,
    out_dir: str | Path,
    *,
    input_size: tuple[int, int, int],
    data_config: Mapping[str, Any],
    class_names: Sequence[str],
    provenance: Mapping[str, Any],
    images: torch.Tensor | np.ndarray,
    batch: tuple[int, int, int] = (1, 8, 32),
    precision: Literal["fp32", "fp16", "int8"] = "fp32",
    tensorrt: TensorRTMode = "auto",
    simplify: bool = True,
    force: bool = False,
    progress: Progress | None = None,
    parity_max_batch: int = 32,
    timing_cache: str | Path | None = None,
    target: TargetProfile | str | None = None,
    accuracy_set: AccuracySet | None = None,
    int8: int8_mod.Int8Request | None = None,
) -> BundleReport:
    """Export ``merged``, check every artifact against ``reference`` on ``images``, and write the bundle to ``out_dir``.

    ``images`` are REAL preprocessed images [N, *input_size]. Parity runs at batch sizes 1, 3, 7 and max(batch)
    (capped at ``parity_max_batch``), clamped into the engine's batch profile. ``timing_cache`` is an optional
    TensorRT timing-cache file to reuse across builds (it is not part of the bundle). ``target`` is a deployment
    target name (``peftx targets``), "auto", a TargetProfile, or None for the default. ``accuracy_set`` (labelled
    images, ``accuracy.select``) adds the accuracy gate: the unmerged model on the training-side transform against
    every artifact on the bundle's own infer.py preprocessing of the raw images (``accuracy.py``). ``precision``
    "int8" also writes model_int8.onnx, calibrated on ``int8``'s images (``int8.py``; it needs ``accuracy_set``:
    task accuracy is its gate, with the sensitivity fallback when it fails).
    Raises OutputError (exists, not writable), UsageError (also: an unknown target), BackendUnavailableError
    (tensorrt="on" without a TensorRT that can build the target), ExportError (export or TensorRT readiness failed)
    before anything is written, and ParityError after the bundle is written with status "failed".
    """
    out_dir = Path(out_dir).absolute()
    say = progress or (lambda message: None)
    profile = target if isinstance(target, TargetProfile) else resolve_target_here(target)
    array = _validate_inputs(input_size, data_config, class_names, images, batch, precision, parity_max_batch)
    _check_int8_request(precision, int8, accuracy_set, profile)
    _check_destination(out_dir, force)
    use_trt, trt_message = resolve_mode(tensorrt, profile)  # fails here, before any work, when it must
    layernorms = sum(isinstance(m, torch.nn.LayerNorm) for m in merged.modules())
    options = _Options(
        (input_size[0], input_size[1], input_size[2]),
        _preprocessing(data_config),
        list(class_names),
        provenance,
        (batch[0], batch[1], batch[2]),
        precision,
        tensorrt,
        use_trt,
        trt_message,
        simplify,
        parity_max_batch,
        timing_cache,
        profile,
        layernorms,
        accuracy_set,
        int8,
    )
    work = _make_workdir(out_dir)
    try:
        report = _assemble(work, reference, merged, array, options, say)
        _move_into_place(work, out_dir, force)
    except OSError as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise OutputError(f"writing the bundle failed: {exc}", "check free disk space and permissions") from exc
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    report.out_dir = out_dir
    say(f"bundle written to {out_dir} (status {report.status})")
    if report.status != "ok":
        raise _parity_error(report.parity, out_dir)
    return report


def read_bundle(bundle_dir: str | Path) -> dict[str, Any]:
    """The bundle's metadata.json, after checking it is a peftx bundle of a known format version."""
    path = Path(bundle_dir) / METADATA_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(
            f"{path} is missing or unreadable: {exc}", "point at a bundle directory written by `peftx merge-export`"
        ) from exc
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ExportError(
            f"{path} is not a {FORMAT} v{FORMAT_VERSION} metadata file", "re-create the bundle with this peftx version"
        )
    return meta


def verify_artifacts(bundle_dir: str | Path, meta: Mapping[str, Any] | None = None) -> None:
    """Check every artifact's sha256 against metadata.json; ExportError names each changed or missing file."""
    bundle_dir = Path(bundle_dir)
    meta = meta or read_bundle(bundle_dir)
    changed = []
    for name, expected in meta["sha256"].items():
        path = bundle_dir / name
        if not path.is_file():
            changed.append(f"{name} (missing)")
        elif sha256_file(path) != expected:
            changed.append(f"{name} (sha256 differs)")
    if changed:
        raise ExportError(
            f"bundle {bundle_dir} was modified after it was written: {', '.join(changed)}",
            "re-create the bundle; never edit its artifacts in place",
        )


def validate_bundle(
    bundle_dir: str | Path,
    reference: torch.nn.Module,
    images: torch.Tensor | np.ndarray,
    *,
    tensorrt: TensorRTMode = "auto",
    progress: Progress | None = None,
    parity_max_batch: int = 32,
    target: TargetProfile | str | None = None,
    accuracy_set: AccuracySet | None = None,
) -> ParityReport:
    """Verify artifact hashes and TensorRT readiness, re-run parity of every artifact against ``reference``, rewrite
    parity.json and trt_readiness.json.

    ``target`` (default: the bundle's own) is the deployment target the shipped files are checked against; a bundle
    not ready for it is an ExportError naming the fix. A model.engine built later on the device (by build_engine.sh)
    is checked too when TensorRT is usable, after its model.engine.json is compared with this machine (an engine
    built for another GPU or TensorRT is refused with one line). ``accuracy_set`` re-measures the accuracy gate
    through the bundle's own infer.py (see ``write_bundle``). On a parity failure parity.json and metadata.json's
    status are updated first, then ParityError is raised.
    """
    bundle_dir = Path(bundle_dir)
    say = progress or (lambda message: None)
    meta = read_bundle(bundle_dir)
    say("verifying artifact hashes")
    verify_artifacts(bundle_dir, meta)
    recorded = _recorded_target(meta)
    profile = target if isinstance(target, TargetProfile) else (resolve_target_here(target) if target else recorded)
    say(f"checking TensorRT readiness for {profile.requested or profile.name}")
    readiness = check_target_readiness(_shipped_onnx(bundle_dir), profile)
    if not readiness.ok:
        shown = _first_problems(readiness.problems)
        raise ExportError(
            f"bundle {bundle_dir} is not TensorRT-ready for {profile.requested or profile.name}: {shown}",
            f"re-export it: peftx merge-export RUN --target {profile.requested or profile.name}",
        )
    use_trt, trt_message = resolve_mode(tensorrt, profile)
    notes = [trt_message]
    engine = bundle_dir / ENGINE_FILE
    if engine.exists() and use_trt:
        say("comparing model.engine.json with this machine")
        notes += check_engine_for_machine(engine, machine_facts(probe().version))
    input_size = tuple(meta["preprocessing"]["input_size"])
    batch = (meta["batch"]["min"], meta["batch"]["opt"], meta["batch"]["max"])
    array = _images_array(images, input_size)
    inputs = make_input_sets(array, parity_batches(batch, parity_max_batch), random_batch=RANDOM_BATCH)
    say("running the reference model")
    expected = reference_outputs(TorchRunner(reference, name="reference (unmerged PyTorch)"), inputs)
    _, onnx_tol, noise_note = _fp32_bounds(reference, inputs, expected, say)
    notes.append(noise_note)
    fp16_required = meta["precision"] == "fp16"
    scratch = Path(tempfile.mkdtemp())
    candidates: list[tuple[Runner, Tolerance, bool]] = [
        (OnnxRuntimeRunner(bundle_dir / ONNX_FILE, name="onnxruntime fp32"), onnx_tol, True)
    ]
    if (bundle_dir / FP16_FILE).exists():
        candidates += [
            (runner, FP16, fp16_required)
            for runner in _fp16_runners(bundle_dir / ONNX_FILE, bundle_dir / FP16_FILE, scratch)
        ]
    int8_runners = _int8_runners(bundle_dir / INT8_FILE) if (bundle_dir / INT8_FILE).exists() else None
    if int8_runners:  # logits advisory (they move by design); the exact arithmetic's accuracy gate is required
        candidates.append((int8_runners[0], INT8, False))
    if engine.exists() and use_trt:
        engine_precision = (meta.get("tensorrt", {}).get("build") or {}).get("precision", meta["precision"])
        tolerance = {"fp16": FP16, "int8": INT8}.get(engine_precision, TENSORRT_FP32)
        candidates.append(
            (TensorRTRunner(engine, name=f"tensorrt {engine_precision}"), tolerance, engine_precision != "int8")
        )  # an INT8 engine: logits advisory, accuracy required
    results = []
    accuracy = None
    try:
        for runner, tolerance, required in candidates:
            say(f"checking {runner.name}")
            results.append(
                compare(
                    expected,
                    runner,
                    inputs,
                    tolerance,
                    reference_name="reference (unmerged PyTorch)",
                    required=required,
                )
            )
        accuracy_candidates = [
            (runner, _accuracy_tolerance(tol), req or tol is INT8) for runner, tol, req in candidates
        ]
        if int8_runners:  # this CPU's fused int8 kernels against the exact arithmetic: advisory, with the reason
            row, kernels = _int8_kernels(bundle_dir / INT8_FILE, _checker(expected, inputs, say))
            results.append(row)
            if kernels["note"]:
                notes.append(kernels["note"])
            accuracy_candidates.append((int8_runners[1], ACCURACY_INT8, False))
        if accuracy_set is not None:
            accuracy = measure_accuracy(
                TorchRunner(reference, name="unmerged PyTorch"),
                accuracy_candidates,
                accuracy_set,
                meta["preprocessing"],
                bundle_dir / INFER_FILE,
                batch=(batch[0], batch[2]),
                progress=say,
            )
        else:
            notes.append("accuracy not re-measured: no labelled images were given")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report = ParityReport(results, notes, accuracy)
    _write_json_atomic(bundle_dir / PARITY_FILE, report.to_json())
    if profile.name == recorded.name:
        _write_json_atomic(bundle_dir / READINESS_FILE, readiness.to_json())
    meta = {
        **meta,
        "status": "ok" if report.passed else "failed",
        "validated_at": _now(),
        "parity": _parity_summary(report),
        "accuracy": _accuracy_summary(report.accuracy) if report.accuracy is not None else meta.get("accuracy"),
    }
    _write_json_atomic(bundle_dir / METADATA_FILE, meta)
    if not report.passed:
        raise _parity_error(report, bundle_dir)
    return report


def _recorded_target(meta: Mapping[str, Any]) -> TargetProfile:
    """The target a bundle was made for (bundles from before targets existed were checked against TensorRT 10)."""
    recorded = (meta.get("target") or {}).get("requested") or (meta.get("target") or {}).get("name") or "trt10"
    return resolve_target_here(recorded)


def _shipped_onnx(bundle_dir: Path) -> dict[str, Path]:
    names = (ONNX_FILE, FP16_FILE, INT8_FILE, deepstream_mod.DEEPSTREAM_ONNX)
    return {name: bundle_dir / name for name in names if (bundle_dir / name).exists()}


def _first_problems(problems: list[str], n: int = 3) -> str:
    """The problems as one short line: the same finding on many nodes is said once, with the count."""
    counts: dict[str, int] = {}
    for problem in problems:
        file, sep, rest = problem.partition(": ")
        if not file.endswith(".onnx"):
            file, sep, rest = "", "", problem
        match = re.match(r"\w+ node \S+: (.*)", rest)
        key = f"{file}{sep}{match[1] if match else rest}"
        counts[key] = counts.get(key, 0) + 1
    items = [f"{key} ({count} nodes)" if count > 1 else key for key, count in counts.items()]
    return "; ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def target_summary(target: TargetProfile) -> dict[str, Any]:
    """What metadata.json and reports record of the target (the full profile is `peftx targets --json`)."""
    ops = target.operators()
    return {
        "name": target.name,
        "requested": target.requested or target.name,
        "tensorrt": target.tensorrt,
        "tensorrt_min": target.tensorrt_min,
        "export_opset": target.export_opset,
        "layernorm": target.layernorm,
        "fp16": target.fp16,
        "op_list": {
            "source": ops["source"],
            "ref": ops["ref"],
            "commit": ops["commit"],
            "tensorrt_version": ops["tensorrt_version"],
        },
    }


def parity_batches(batch: tuple[int, int, int], parity_max_batch: int = 32) -> list[int]:
    """1, 3, 7 and the profile's max (capped for CPU cost), clamped into the batch profile [min, max]."""
    low, _, high = batch
    wanted = (*PARITY_BATCHES, min(high, parity_max_batch))
    return sorted({min(max(b, low), high) for b in wanted})


# --- assembling -------------------------------------------------------------------------------------------------


def _assemble(
    work: Path, reference: torch.nn.Module, merged: torch.nn.Module, images: np.ndarray, opt: _Options, say: Progress
) -> BundleReport:
    """Write every file of the bundle into ``work``; return the report (its status reflects parity)."""
    timings: dict[str, float] = {}
    warnings: list[str] = []
    onnx_path = _export_ready_onnx(work, merged, opt, warnings, timings, say)
    inputs = make_input_sets(images, parity_batches(opt.batch, opt.parity_max_batch), random_batch=RANDOM_BATCH)
    say("running the reference model")
    expected = reference_outputs(TorchRunner(reference, name="reference (unmerged PyTorch)"), inputs)
    _check_class_count(expected, opt.class_names)
    merge_tol, onnx_tol, noise_note = _fp32_bounds(reference, inputs, expected, say)
    check = _checker(expected, inputs, say, {ONNX_FP32: onnx_tol})
    notes = [
        f"reference: unmerged PyTorch; {len(images)} real images (cycled to fill larger batches)",
        noise_note,
        f"target: {opt.target.requested or opt.target.name} (TensorRT >= {opt.target.tensorrt_min}, "
        f"opset {opt.target.export_opset}, LayerNorm {opt.target.layernorm})",
        opt.trt_message,
    ]
    results = [check(TorchRunner(merged, name="merged PyTorch"), merge_tol)]
    started = time.perf_counter()
    simplify_info, ort_result = _simplified_or_original(work, onnx_path, opt, check, notes)
    results.append(ort_result)
    timings["simplify_and_ort_s"] = time.perf_counter() - started
    fp32_nodes = _target_fp32_nodes(onnx_path, opt)
    scratch = Path(tempfile.mkdtemp(dir=work))  # the FP16 emulation graph: checked, not shipped
    fp16, fp16_runners = _fp16_step(work, onnx_path, images, opt, fp32_nodes, scratch, timings, say)
    results += [check(runner, FP16, required=opt.precision == "fp16") for runner in fp16_runners]
    if opt.precision != "fp16":
        notes.append(f"FP16 checks are advisory for an {opt.precision} bundle: reported, not required")
    _write_text(work / INFER_FILE, _template("infer.py"))  # before INT8: calibration runs its preprocessing
    _write_text(work / BENCH_FILE, _template(BENCH_FILE))  # infer.py --bench: times every artifact on the device
    int8_graph, calibration = None, None
    int8_kernels: dict[str, Any] = {}
    if opt.precision == "int8":
        int8_graph, calibration = _int8_step(work, onnx_path, opt, scratch, timings, say)
        int8_rows, int8_kernels = _int8_parity(int8_graph.path, check)
        results += int8_rows
        notes.append(
            "INT8 logits are advisory (they move by design); the INT8 artifact is gated on task accuracy, measured "
            "on the exact Q/DQ arithmetic TensorRT performs (ONNX Runtime unoptimised)"
        )
    say(f"checking TensorRT readiness of the shipped files for {opt.target.requested or opt.target.name}")
    readiness = check_target_readiness(_shipped_onnx(work), opt.target)
    _handle_readiness(readiness.problems, opt.tensorrt, warnings, opt.target)
    warnings += [
        f"not ready for the newer target {name}: {problems[0]}"
        for name, problems in readiness.newer.items()
        if problems
    ]
    trt_info, trt_runner = _tensorrt_step(work, onnx_path, opt, fp32_nodes, timings, say)
    if trt_runner is not None:
        tolerance = {"fp16": FP16, "int8": INT8}.get(opt.precision, TENSORRT_FP32)
        results.append(check(trt_runner, tolerance, required=opt.precision != "int8"))

    accuracy = None
    int8_info = None
    try:
        if opt.accuracy_set is not None:
            started = time.perf_counter()
            candidates: list[Candidate] = [
                (OnnxRuntimeRunner(onnx_path, name="onnxruntime fp32"), ACCURACY_FP32, True),
                *((runner, ACCURACY_FP16, opt.precision == "fp16") for runner in fp16_runners),
            ]
            if int8_graph is not None:
                exact, fused = _int8_runners(int8_graph.path)
                candidates += [(exact, ACCURACY_INT8, True), (fused, ACCURACY_INT8, False)]
            if trt_runner is not None:
                gate = {"fp16": ACCURACY_FP16, "int8": ACCURACY_INT8}.get(opt.precision, ACCURACY_FP32)
                candidates.append((trt_runner, gate, True))
            accuracy = measure_accuracy(
                TorchRunner(reference, name="unmerged PyTorch"),
                candidates,
                opt.accuracy_set,
                json.loads(json.dumps(opt.preprocessing)),
                work / INFER_FILE,
                batch=(opt.batch[0], opt.batch[2]),
                progress=say,
                keep=len(opt.accuracy_set) if int8_graph is not None else 0,
            )
            timings["accuracy_s"] = time.perf_counter() - started
            if int8_graph is not None and calibration is not None:
                int8_info = _int8_gate(
                    work, onnx_path, int8_graph, calibration, accuracy, opt, scratch, timings, say, results, check
                )
                int8_kernels = int8_info.pop("_kernels", int8_kernels)
                if trt_runner is not None and int8_info["fallback"]["ran"]:
                    warnings.append(
                        "model.engine was built from the INT8 graph before the fallback changed it: "
                        "rebuild it with build_engine.sh int8"
                    )
        else:
            notes.append(
                "accuracy not measured: no labelled images (the run's data are not on disk; "
                "--images ROOT/<class>/... measures it)"
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if int8_graph is not None:
        int8_info = {**(int8_info or {}), "cpu_kernels": int8_kernels}
        if int8_kernels.get("note"):
            notes.append(int8_kernels["note"])
    parity = ParityReport(results, notes, accuracy)
    if int8_graph is not None:  # the graph as shipped (after any fallback) is what must hold
        _check_int8_graph(work / INT8_FILE, opt.target, fp32_nodes)
        if int8_info and int8_info["fallback"].get("passed"):  # the fallback replaced it: check it again
            readiness = check_target_readiness(_shipped_onnx(work), opt.target)
            _handle_readiness(readiness.problems, opt.tensorrt, warnings, opt.target)
    deepstream = _write_deepstream(work, opt, readiness, images, warnings, say)
    script = render_build_script(
        onnx_path,
        opt.batch,
        opt.precision,
        target=opt.target,
        ready=readiness.ok,
        fp32_layers=fp32_nodes,
        check_atol=_check_atol(ort_result),
    )
    _write_text(work / BUILD_SCRIPT_FILE, script, executable=True)
    say("writing the reference set (infer.py --check)")
    reference_set = write_reference_set(
        work, reference, json.loads(json.dumps(opt.preprocessing)), opt.accuracy_set, images, fp32=onnx_tol
    )
    _write_text(work / README_FILE, render_readme(opt.preprocessing, opt.class_names, opt.precision, opt.target))
    # The engine is device-specific and is rebuilt on the device: it is tied to the bundle by model.engine.json (sha256
    # of the engine and of its source ONNX), not by metadata.json, so a rebuild with build_engine.sh keeps it valid.
    shipped = (
        ONNX_FILE,
        FP16_FILE,
        *((INT8_FILE,) if int8_graph is not None else ()),
        INFER_FILE,
        BENCH_FILE,
        BUILD_SCRIPT_FILE,
        deepstream_mod.DEEPSTREAM_ONNX,
    )
    sha = {name: sha256_file(work / name) for name in shipped}
    report = BundleReport(
        work,
        "ok" if parity.passed else "failed",
        parity,
        readiness,
        sha,
        trt_info,
        simplify_info,
        fp16,
        {k: round(v, 3) for k, v in timings.items()},
        warnings,
        fp32_nodes,
        int8=int8_info,
    )
    report.reference_set, report.deepstream = reference_set, deepstream  # hashed like the models: --check trusts them
    report.sha256.update({name: sha256_file(work / name) for name in (REFERENCE_FILE, *reference_set["raw_files"])})
    _write_json_atomic(work / PARITY_FILE, parity.to_json())
    _write_json_atomic(work / READINESS_FILE, readiness.to_json())
    _write_json_atomic(work / METADATA_FILE, _metadata(report, onnx_path, opt))
    return report


def _write_deepstream(
    work: Path, opt: _Options, readiness: TargetReadiness, images: np.ndarray, warnings: list[str], say: Progress
) -> dict[str, Any]:
    """model_deepstream.onnx + config_infer_primary.txt + labels.txt (deepstream.py), made from the ONNX file the
    target's engine of this precision is built from (build_engine.sh's choice), and checked for the target."""
    source = work / deepstream_mod.source_file(opt.precision, opt.target)
    say(f"writing the DeepStream model and config (from {source.name})")
    entry, more = deepstream_mod.write(
        work,
        source,
        opt.preprocessing,
        opt.class_names,
        precision=opt.precision,
        batch=opt.batch[1],
        target=opt.target,
        images=images,
    )
    warnings.extend(more)
    checked = check_target_readiness(
        {deepstream_mod.DEEPSTREAM_ONNX: work / deepstream_mod.DEEPSTREAM_ONNX}, opt.target
    )
    readiness.files.update(checked.files)  # trt_readiness.json covers it like the other shipped graphs
    for name, problems in checked.newer.items():
        readiness.newer.setdefault(name, []).extend(problems)
    _handle_readiness(checked.problems, opt.tensorrt, warnings, opt.target)
    return entry


def _export_ready_onnx(
    work: Path, merged: torch.nn.Module, opt: _Options, warnings: list[str], timings: dict[str, float], say: Progress
) -> Path:
    """Export model.onnx the way the target wants it and check its readiness at once: an unready graph fails before
    the costly checks (the files as shipped are checked again at the end)."""
    onnx_path = work / ONNX_FILE
    say(
        f"exporting ONNX for {opt.target.requested or opt.target.name} (opset {opt.target.export_opset}, "
        f"LayerNorm {opt.target.layernorm})"
    )
    started = time.perf_counter()
    export_onnx(
        merged,
        onnx_path,
        input_size=opt.input_size,
        opset=opt.target.export_opset,
        layernorm=opt.target.layernorm,
        metadata=_onnx_metadata(opt.preprocessing, opt.class_names, opt.provenance, opt.target),
    )
    timings["export_s"] = time.perf_counter() - started
    if opt.tensorrt != "off":  # with TensorRT off, the shipped files' problems become warnings once, at the end
        say("checking TensorRT readiness")
        _handle_readiness(
            check_tensorrt_readiness(onnx_path, target=opt.target).problems, opt.tensorrt, warnings, opt.target
        )
    return onnx_path


def _target_fp32_nodes(onnx_path: Path, opt: _Options) -> list[str]:
    """The shipped graph's nodes the target keeps FP32 in FP16 builds, checked against the model: every LayerNorm
    module must show up as one decomposed subgraph, or the FP32 pinning would miss some."""
    if not opt.target.fp16_fp32_nodes:
        return []
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    found = len(decomposed_layernorms(model))
    if "layernorm" in opt.target.fp16_fp32_nodes and found != opt.layernorms:
        raise ExportError(
            f"found {found} decomposed LayerNorm subgraphs in {onnx_path.name}, the model has "
            f"{opt.layernorms} LayerNorm modules: the FP32 pinning for {opt.target.name} would miss some",
            "report this model; export for a target with LayerNormalization (--target trt8.6)",
        )
    names = fp32_node_names(model, opt.target.fp16_fp32_nodes)
    unsafe = unsafe_layer_names(names)
    if unsafe:
        raise ExportError(
            f"node name {unsafe[0]!r} cannot be passed to trtexec --layerPrecisions",
            "report this model; its exporter named nodes with ',', ':' or spaces",
        )
    return names


def _fp16_step(
    work: Path,
    onnx_path: Path,
    images: np.ndarray,
    opt: _Options,
    fp32_nodes: list[str],
    scratch: Path,
    timings: dict[str, float],
    say: Progress,
) -> tuple[dict, list[OnnxRuntimeRunner]]:
    """Write model_fp16.onnx (the target's FP32 nodes kept FP32); return its runners (ORT run, strict emulation in
    ``scratch``) for the parity and accuracy checks."""
    say("converting to FP16")
    started = time.perf_counter()
    fp16 = convert_to_fp16(
        onnx_path, work / FP16_FILE, calibration=images[:FP16_CALIBRATION_IMAGES], keep_fp32_nodes=fp32_nodes
    )
    timings["fp16_s"] = time.perf_counter() - started
    return fp16.to_json(), _fp16_runners(onnx_path, fp16.path, scratch)


def _tensorrt_step(
    work: Path, onnx_path: Path, opt: _Options, fp32_nodes: list[str], timings: dict[str, float], say: Progress
) -> tuple[dict[str, Any], TensorRTRunner | None]:
    """Build model.engine (+ model.engine.json) when TensorRT is in use and return its runner; else record why not."""
    info: dict[str, Any] = {"mode": opt.tensorrt, "used": opt.use_trt, "message": opt.trt_message, "build": None}
    if not opt.use_trt:
        return info, None
    say(f"building the TensorRT {opt.precision} engine")
    build = build_engine(
        onnx_path,
        work / ENGINE_FILE,
        batch=opt.batch,
        precision=opt.precision,
        timing_cache_path=opt.timing_cache,
        fp16_onnx_path=work / FP16_FILE,
        int8_onnx_path=work / INT8_FILE,
        fp32_layers=fp32_nodes,
        target=opt.target.name,
    )
    info["build"] = build.to_json()
    timings["tensorrt_build_s"] = build.seconds
    return info, TensorRTRunner(build.path, name=f"tensorrt {opt.precision}")


def _check_int8_request(
    precision: str, request: int8_mod.Int8Request | None, accuracy_set: AccuracySet | None, target: TargetProfile
) -> None:
    """precision "int8" needs calibration images, labelled images for its gate, and a target that takes Q/DQ."""
    if precision != "int8":
        return
    int8_mod.check_target(target)
    if request is None:
        raise UsageError("precision 'int8' needs calibration images", "pass int8=int8.select_calibration(...)")
    if accuracy_set is None:
        raise UsageError(
            "--precision int8 needs labelled images: task accuracy is the only honest INT8 gate",
            "drop --accuracy-images 0, or pass --images DIR/<class>/... with labelled images",
        )


def _int8_step(
    work: Path, onnx_path: Path, opt: _Options, scratch: Path, timings: dict[str, float], say: Progress
) -> tuple[int8_mod.Int8Graph, int8_mod.Calibration]:
    """Calibrate on the request's images AS SHIPPED (the bundle's infer.py preprocessing) and write model_int8.onnx.
    The calibrated ranges stay in ``scratch`` for the fallback's re-quantizations."""
    request = opt.int8
    assert request is not None
    say(f"preprocessing {len(request.indices)} calibration images with the bundle's infer.py")
    started = time.perf_counter()
    calibration = int8_mod.calibration_inputs(
        request, load_infer_module(work / INFER_FILE), json.loads(json.dumps(opt.preprocessing))
    )
    say(f"calibrating INT8 ({request.method}) on {len(calibration.inputs)} images of {request.source}")
    graph = int8_mod.quantize(
        onnx_path, work / INT8_FILE, calibration.inputs, method=request.method, cache=_int8_cache(scratch)
    )
    if int8_fp16.strongly_typed(opt.target):  # TensorRT 11 builds the ONNX types: the float parts FP16 (int8_fp16.py)
        say(f"{opt.target.name} builds strongly typed: the INT8 graph's float parts in FP16")
        graph = dataclasses.replace(graph, opset=_half_int8_floats(work / INT8_FILE, onnx_path, opt, calibration))
    timings["int8_calibration_s"] = time.perf_counter() - started
    return graph, calibration


def _half_int8_floats(path: Path, onnx_path: Path, opt: _Options, calibration: int8_mod.Calibration) -> int:
    """int8_fp16.half_float_parts with model_fp16.onnx's rules (its FP32 nodes, its calibration size); the opset."""
    info = int8_fp16.half_float_parts(
        path,
        opt.target,
        calibration=calibration.inputs[:FP16_CALIBRATION_IMAGES],
        keep_fp32_nodes=_target_fp32_nodes(onnx_path, opt),
    )
    return int(info["opset"])


def _int8_cache(scratch: Path) -> Path:
    return scratch / "int8_calibration.json"


def _int8_gate(
    work: Path,
    onnx_path: Path,
    graph: int8_mod.Int8Graph,
    calibration: int8_mod.Calibration,
    accuracy: AccuracyReport,
    opt: _Options,
    scratch: Path,
    timings: dict[str, float],
    say: Progress,
    results: list[ParityResult],
    check,
) -> dict[str, Any]:
    """The INT8 accuracy gate's outcome; when it failed, the sensitivity fallback (``int8.fallback``) and, when that
    passes, the report's INT8 rows replaced by the shipped graph's. Returns metadata.json's "int8" section."""
    name = INT8_EXACT
    index = next(i for i, r in enumerate(accuracy.results) if r.candidate == name)
    first = accuracy.results[index]
    kept = accuracy.kept or {}
    info: dict[str, Any] = {
        **graph.to_json(),
        "calibration": calibration.to_json(),
        "tolerance": asdict(ACCURACY_INT8),
        "gate": {
            "accuracy": first.accuracy,
            "drop": first.drop,
            "passed": first.passed,
            "session": "onnxruntime, graph optimisations disabled: the exact Q/DQ arithmetic TensorRT performs",
        },
        "float_parts": int8_fp16.float_parts(work / INT8_FILE),  # "fp16" for strongly typed targets (int8_fp16.py)
        "fallback": {"ran": False},
    }
    if first.passed or not opt.int8 or not opt.int8.fallback:
        if not first.passed:
            info["fallback"] = {"ran": False, "reason": "disabled"}
        return info
    labels, ref_pred = kept["labels"], kept["reference_logits"].argmax(axis=1)

    def result(path: Path, fused: bool = False):
        runner = _int8_runners(path)[1 if fused else 0]
        with runner:
            pred = np.concatenate(
                [runner.infer(kept["inputs"][i : i + 32]).argmax(axis=1) for i in range(0, len(labels), 32)]
            )
        return result_for(runner.name, ACCURACY_INT8, not fused, pred, labels, ref_pred, accuracy.reference_accuracy)

    started = time.perf_counter()

    def gate(path: Path) -> tuple[float, bool]:
        if int8_fp16.strongly_typed(opt.target):  # each trial is gated (and shipped) as the device will build it
            _half_int8_floats(path, onnx_path, opt, calibration)
        verdict = result(path)
        return verdict.accuracy, verdict.passed

    outcome = int8_mod.fallback(
        onnx_path,
        work / INT8_FILE,
        calibration.inputs,
        _int8_cache(scratch),
        opt.int8.method,
        gate,
        scratch,
        progress=say,
    )
    timings["int8_fallback_s"] = time.perf_counter() - started
    info["fallback"] = outcome.to_json()
    if outcome.passed:
        accuracy.results[index] = result(work / INT8_FILE)
        for i, r in enumerate(accuracy.results):
            if r.candidate == INT8_FUSED:
                accuracy.results[i] = result(work / INT8_FILE, fused=True)
        placement = int8_mod.qdq_placement(work / INT8_FILE)
        info.update(
            quantized=placement["quantized"],
            float_nodes=placement["float"],
            quantized_count=len(placement["quantized"]),
        )
        rows, info["_kernels"] = _int8_parity(work / INT8_FILE, check)
        results[:] = [r for r in results if r.candidate not in (INT8_EXACT, INT8_FUSED)] + rows
        say(f"INT8 gate passes with {len(outcome.float_nodes)} node(s) float: {', '.join(outcome.float_nodes)}")
    else:
        accuracy.notes.append(
            f"INT8 fallback found no graph that passes within its bound ({outcome.bound}); "
            f"best accuracy {100 * (outcome.best_accuracy or 0):.2f} % with "
            f"{len(outcome.float_nodes)} node(s) float"
        )
    return info


def _int8_runners(path: Path) -> tuple[OnnxRuntimeRunner, OnnxRuntimeRunner]:
    """(exact, fused): model_int8.onnx unoptimised (the Q/DQ arithmetic TensorRT performs, the gate's) and optimised
    (this CPU's fused int8 kernels, infer.py's and bench's)."""
    return (
        OnnxRuntimeRunner(path, name=INT8_EXACT, session_options=int8_mod.exact_session_options(_ort())),
        OnnxRuntimeRunner(path, name=INT8_FUSED),
    )


def _ort():
    import onnxruntime

    return onnxruntime


def _int8_parity(path: Path, check) -> tuple[list[ParityResult], dict[str, Any]]:
    """The INT8 graph's logit rows (both advisory): the exact arithmetic against the unmerged model, and this CPU's
    fused kernels against the exact arithmetic (``_int8_kernels``); and what metadata.json records of the latter."""
    row, facts = _int8_kernels(path, check)
    return [check(_int8_runners(path)[0], INT8, required=False), row], facts


def _int8_kernels(path: Path, check) -> tuple[ParityResult, dict[str, Any]]:
    """This CPU's fused int8 kernels against the exact Q/DQ arithmetic at the INT8 bound (advisory), and the facts
    metadata.json's ``int8.cpu_kernels`` records: the CPU, what its int8 products accumulate in, the figures, and
    the report's note when they disagree."""
    exact, fused = _int8_runners(path)
    kernels = check(fused, INT8, required=False, against=exact)
    facts = int8_mod.cpu_int8_kernels()
    s = kernels.overall
    return kernels, {
        **facts,
        "agree": kernels.passed,
        "max_abs": s.max_abs,
        "bound": s.bound,
        "top1_agreement": s.top1_agreement,
        "note": "" if kernels.passed else int8_mod.fused_kernels_note(s.max_abs, s.bound, facts),
    }


def _check_int8_graph(path: Path, target: TargetProfile, fp32_nodes: Sequence[str]) -> None:
    """What must hold of the shipped INT8 graph (zero points 0, INT8, placement, opset), and TensorRT 8.5's FP32
    LayerNorm layers still present by name: a violation is peftx's bug, so the export stops."""
    import onnx

    problems = int8_mod.graph_problems(path, target)
    names = {n.name for n in onnx.load(str(path), load_external_data=False).graph.node}
    missing = [n for n in fp32_nodes if n not in names]
    if missing:
        problems.append(f"{len(missing)} FP32 LayerNorm node(s) of {target.name} are gone (first: {missing[0]})")
    if problems:
        raise ExportError(
            f"{path.name} breaks the INT8 rules for {target.requested or target.name}: {_first_problems(problems)}",
            "report this model; use --precision fp16 meanwhile",
        )


def _checker(
    expected: dict[str, np.ndarray],
    inputs: dict[str, np.ndarray],
    say: Progress,
    measured: Mapping[Tolerance, Tolerance] | None = None,
):
    """compare() bound to the cached reference outputs and input sets; ``measured`` replaces a constant tolerance by
    the one derived from this run's FP32 noise (``_fp32_bounds``)."""

    def check(runner, tolerance, *, required: bool = True, against: Runner | None = None) -> ParityResult:
        tolerance = (measured or {}).get(tolerance, tolerance)
        say(f"checking {runner.name}")
        if against is not None:  # another artifact as the reference (INT8's fused kernels vs its exact arithmetic)
            return compare(against, runner, inputs, tolerance, reference_name=against.name, required=required)
        return compare(
            expected, runner, inputs, tolerance, reference_name="reference (unmerged PyTorch)", required=required
        )

    return check


def _fp32_bounds(
    reference: torch.nn.Module, inputs: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], say: Progress
) -> tuple[Tolerance, Tolerance, str]:
    """(merged PyTorch's, ONNX Runtime FP32's tolerance, the report's note) from the rounding noise measured here: the
    unmerged model in float64 on the same inputs is the reference its FP32 outputs are measured against
    (``tolerances.NoiseBound``). A model that cannot run in float64 keeps the constant bounds, and the note says so."""
    say("measuring FP32 rounding noise (the unmerged model in float64)")
    expected64 = float64_outputs(reference, inputs)
    if expected64 is None:
        return MERGE_FP32, ONNX_FP32, "FP32 noise not measured (the model does not run in float64): constant bounds"
    noise = fp32_noise(expected, expected64)
    scale = max(float(np.abs(v).max(initial=0.0)) for v in expected64.values())
    merge_tol, onnx_tol = MERGE_FP32_MEASURED.tolerance(noise), ONNX_FP32_MEASURED.tolerance(noise)
    return (
        merge_tol,
        onnx_tol,
        f"FP32 rounding noise of the unmerged model here (FP32 vs its float64 evaluation, same inputs): max |Δ| "
        f"{noise:.3g} at logit scale {scale:.3g}; merged PyTorch bound {merge_tol.bound(scale):.3g} "
        f"({MERGE_FP32_MEASURED.factor:g} x noise + {merge_tol.rel_to_max:g} x scale), ONNX Runtime FP32 bound "
        f"{onnx_tol.bound(scale):.3g}",
    )


def _fp16_runners(onnx_path: Path, fp16_path: Path, scratch: Path) -> list[OnnxRuntimeRunner]:
    """The FP16 ONNX as ONNX Runtime runs it, and the strict rounding emulation (see fp16.py for why both)."""
    emulation = strict_fp16_emulation(onnx_path, fp16_path, scratch / "fp16_emulation.onnx")
    return [
        OnnxRuntimeRunner(fp16_path, name="onnxruntime fp16"),
        OnnxRuntimeRunner(emulation, name="fp16 emulation (strict rounding)"),
    ]


def _simplified_or_original(work: Path, onnx_path: Path, opt: _Options, check, notes: list[str]):
    """Try onnxslim; keep its graph only if it passes ONNX Runtime parity and adds no readiness problem for the
    target (a simplifier that re-fused LayerNorm would break TensorRT 8.5). Returns (simplify info, ORT result)."""
    if not opt.simplify:
        return None, check(OnnxRuntimeRunner(onnx_path, name="onnxruntime fp32"), ONNX_FP32)
    slim_path = work / "model.slim.onnx"
    info = simplify_onnx(onnx_path, slim_path)
    if info.applied:
        added = set(check_tensorrt_readiness(slim_path, target=opt.target).problems) - set(
            check_tensorrt_readiness(onnx_path, target=opt.target).problems
        )
        result = check(OnnxRuntimeRunner(slim_path, name="onnxruntime fp32"), ONNX_FP32)
        if result.passed and not added:
            os.replace(slim_path, onnx_path)
            return info.to_json(), result
        why = "failed parity" if not result.passed else f"not ready for {opt.target.name}: {sorted(added)[0]}"
        notes.append(f"the onnxslim graph was rejected ({why}); the graph as exported was kept")
        slim_path.unlink()
        info.applied, info.reason = False, f"{info.reason}: rejected, {why}"
    else:
        notes.append(f"simplify skipped: {info.reason}")
    return info.to_json(), check(OnnxRuntimeRunner(onnx_path, name="onnxruntime fp32"), ONNX_FP32)


def _handle_readiness(problems: list[str], tensorrt: str, warnings: list[str], target: TargetProfile) -> None:
    """Readiness problems are an ExportError, or warnings when TensorRT is off (build_engine.sh then refuses)."""
    if not problems:
        return
    name = target.requested or target.name
    if tensorrt == "off":
        warnings.extend(f"TensorRT readiness ({name}): {p}" for p in problems)
        return
    raise ExportError(
        f"the ONNX graph is not TensorRT-ready for {name}: {_first_problems(problems)}",
        "choose another --target (see `peftx targets`), pass --tensorrt off for an ONNX-only bundle, "
        "or change the model",
    )


def _check_atol(ort_result: ParityResult) -> dict[str, float]:
    """Polygraphy re-check bounds (engine vs ONNX Runtime) from peftx's tolerances at this model's logit scale."""
    scale = ort_result.overall.ref_max_abs
    return {"fp32": TENSORRT_FP32.bound(scale), "fp16": FP16.bound(scale), "int8": INT8.bound(scale)}


def render_build_script(
    onnx_path: str | Path,
    batch: tuple[int, int, int],
    precision: str,
    *,
    target: TargetProfile | None = None,
    ready: bool = True,
    fp32_layers: Sequence[str] = (),
    check_atol: Mapping[str, float] | None = None,
) -> str:
    """build_engine.sh for this graph: input name and C/H/W from the ONNX, min/opt/max from ``batch``, the target's
    floor and FP32 layers, and whether its readiness passed (the script refuses to build an unready bundle)."""
    import onnx

    target = target or resolve_target_here(None)
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    tensor = next(i for i in graph.input if i.name not in initializers)
    rest = [d.dim_value for d in tensor.type.tensor_type.shape.dim][1:]
    shape = lambda n: "x".join(str(d) for d in (n, *rest))  # noqa: E731 - trtexec's NxCxHxW
    atol = {"fp32": 1e-3, "fp16": 1e-2, "int8": 1e-1, **(check_atol or {})}
    label = _target_label(target)
    values = {
        "INPUT_NAME": tensor.name,
        "INPUT_DIMS": "batch x " + " x ".join(map(str, rest)),
        "PRECISION": precision,
        "MIN_BATCH": batch[0],
        "OPT_BATCH": batch[1],
        "MAX_BATCH": batch[2],
        "MIN_SHAPE": shape(batch[0]),
        "OPT_SHAPE": shape(batch[1]),
        "MAX_SHAPE": shape(batch[2]),
        "OPT_BATCH_DIMS": ",".join(str(d) for d in (batch[1], *rest)),
        "TARGET": target.name,
        "TARGET_LABEL": label,
        "TARGET_MIN": target.tensorrt_min,
        "READY": int(bool(ready)),
        "LAYER_SPEC": ",".join(f"{name}:fp32" for name in fp32_layers),
        "FP32_LAYER_COUNT": len(fp32_layers),
        "INT8_FLAGS": " ".join(_int8_trtexec_flags(target)),
        "DS_ONNX": deepstream_mod.DEEPSTREAM_ONNX,
        "DS_ENGINE": deepstream_mod.engine_file(batch[1], precision),
        "DS_SOURCE": deepstream_mod.source_file(precision, target),
        "CHECK_ATOL_FP32": f"{atol['fp32']:.3g}",
        "CHECK_ATOL_FP16": f"{atol['fp16']:.3g}",
        # An INT8 engine is compared with its own Q/DQ graph under ONNX Runtime (model.onnx is the FP32 function it
        # approximates; its task accuracy is what `infer.py --check` and the bundle's gate judge).
        "INT8_CHECK": (
            "  # int8 engine: against the Q/DQ graph it was built from (logits move by design; accuracy: "
            "infer.py --check)\n"
            f"  polygraphy run {INT8_FILE} --onnxrt --load-inputs check_inputs.json "
            "--save-outputs check_onnxrt_int8.json\n"
            "  polygraphy run model.engine --model-type engine --trt --load-inputs check_inputs.json "
            f"--load-outputs check_onnxrt_int8.json --check-error-stat max --atol {atol['int8']:.3g} --rtol 0\n"
            if precision == "int8"
            else ""
        ),
    }
    text = _template("build_engine.sh.in")
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    return text


def _target_label(target: TargetProfile) -> str:
    return (
        target.name
        if not target.requested or target.requested == target.name
        else f"{target.requested} ({target.name})"
    )


def render_readme(
    preprocessing: Mapping[str, Any], class_names: Sequence[str], precision: str, target: TargetProfile
) -> str:
    """README.md for the person at the device (templates/README.md.in): what to install per JetPack, how to build,
    check and run this bundle, and what only the device can tell (and the ``infer.py --check`` line that tells it)."""
    _, height, width = (int(v) for v in preprocessing["input_size"])
    int8 = precision == "int8"
    values = {
        "CLASSES": len(class_names),
        "INPUT": f"{height}x{width}",
        "INTERPOLATION": preprocessing.get("interpolation") or "bilinear",
        "CROP_PCT": preprocessing.get("crop_pct") or 1.0,
        "CROP_MODE": preprocessing.get("crop_mode") or "center",
        "PRECISION": precision,
        "TARGET_LABEL": _target_label(target),
        "TARGET_MIN": target.tensorrt_min,
        "INT8_FILE_ROW": f", `{INT8_FILE}`" if int8 else "",
        "INT8_WORD": "; INT8 Q/DQ" if int8 else "",
        "INT8_ARG": "|int8" if int8 else "",
    }
    text = _template("README.md.in")
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    return text


def _int8_trtexec_flags(target: TargetProfile) -> tuple[str, ...]:
    """trtexec's INT8 flags on 8.x/10.x (the 8.x/10.x profiles agree: --int8); 11 has none and is handled apart."""
    flags = target.int8.trtexec_flags if target.int8.trtexec_flags else resolve_target("trt10").int8.trtexec_flags
    return flags


# --- metadata ---------------------------------------------------------------------------------------------------


def _preprocessing(data_config: Mapping[str, Any]) -> dict[str, Any]:
    """The run's preprocessing contract as metadata.json and infer.py carry it (``peftx.preprocess.contract``)."""
    return contract(data_config)


def _onnx_metadata(
    preprocessing: dict, class_names: list[str], provenance: Mapping[str, Any], target: TargetProfile
) -> dict[str, str]:
    return {
        "preprocessing": json.dumps(preprocessing),
        "class_names": json.dumps(class_names),
        "num_classes": str(len(class_names)),
        "provenance": json.dumps(provenance, default=str, sort_keys=True),
        "peftx_version": peftx.__version__,
        "peftx_target": target.requested or target.name,
        "peftx_target_profile": target.name,
        "peftx_target_tensorrt_min": target.tensorrt_min,
    }


def _metadata(report: BundleReport, onnx_path: Path, opt: _Options) -> dict[str, Any]:
    props = read_metadata(onnx_path)
    batch, prep, class_names = opt.batch, opt.preprocessing, opt.class_names
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "status": report.status,
        "created_at": _now(),
        "precision": opt.precision,
        "input": {"name": INPUT_NAME, "shape": ["batch", *prep["input_size"]], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(class_names)], "dtype": "float32"},
        "batch": {"min": batch[0], "opt": batch[1], "max": batch[2]},
        "preprocessing": prep,
        "image_decoding": {"rule": DECODE_RULE, "description": DECODE_DESCRIPTION},  # infer.py's to_rgb applies it
        "num_classes": len(class_names),
        "class_names": class_names,
        "provenance": json.loads(json.dumps(opt.provenance, default=str)),
        "artifacts": {
            "onnx": ONNX_FILE,
            "onnx_fp16": FP16_FILE,
            "onnx_int8": INT8_FILE if (report.out_dir / INT8_FILE).exists() else None,
            "engine": ENGINE_FILE if (report.out_dir / ENGINE_FILE).exists() else None,
            "engine_manifest": MANIFEST_FILE if (report.out_dir / MANIFEST_FILE).exists() else None,
            "infer": INFER_FILE,
            "build_script": BUILD_SCRIPT_FILE,
        },
        "sha256": report.sha256,
        "onnx": {
            "exporter": props.get("onnx_exporter"),
            "ops": op_histogram(onnx_path),
            "params": param_count(onnx_path),
            "simplify": report.simplify,
        },
        "target": {
            **target_summary(opt.target),
            "ready": report.readiness.ok,
            "fp32_nodes_in_fp16_builds": len(report.fp32_nodes),
        },
        "fp16": report.fp16,
        "int8": report.int8,
        "tensorrt": report.tensorrt,
        "trt_readiness": {
            "ok": report.readiness.ok,
            "problems": len(report.readiness.problems),
            "target": opt.target.name,
            "tensorrt_version_checked": report.readiness.tensorrt_version,
            "files": sorted(report.readiness.files),
            "file": READINESS_FILE,
        },
        "parity": _parity_summary(report.parity),
        "accuracy": _accuracy_summary(report.parity.accuracy),
        "reference_set": report.reference_set,
        "deepstream": report.deepstream,
        "timings": report.timings,
        "warnings": report.warnings,
        "versions": _versions(),
    }


def _parity_summary(parity: ParityReport) -> dict[str, Any]:
    return {
        "passed": parity.passed,
        "failed": [r.candidate for r in parity.failed],
        "checked": [r.candidate for r in parity.results],
        "file": PARITY_FILE,
        "accuracy_failures": parity.accuracy.failures() if parity.accuracy is not None else [],
    }


def _accuracy_summary(accuracy: AccuracyReport | None) -> dict[str, Any]:
    return accuracy.summary() if accuracy is not None else {"measured": False}


def _accuracy_tolerance(parity_tolerance) -> Any:
    """The accuracy tolerance for an artifact checked with ``parity_tolerance`` (FP16: FP16's, INT8: INT8's)."""
    return ACCURACY_FP16 if parity_tolerance is FP16 else ACCURACY_INT8 if parity_tolerance is INT8 else ACCURACY_FP32


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import PIL

    # numpy and Pillow made the reference set's tensors: a device that preprocesses differently is told which ones
    versions = {
        "python": platform.python_version(),
        "peftx": peftx.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
    }
    try:
        import timm

        versions["timm"] = timm.__version__
    except ImportError:
        pass
    return versions


def _parity_error(report: ParityReport, where: Path) -> ParityError:
    return ParityError(
        f"parity failed for {'; '.join(report.failure_lines())}",
        f"inspect {where / PARITY_FILE}; the bundle is marked failed",
    )


# --- validation of arguments ------------------------------------------------------------------------------------


def _validate_inputs(input_size, data_config, class_names, images, batch, precision, parity_max_batch) -> np.ndarray:
    if precision not in ("fp32", "fp16", "int8"):
        raise UsageError(f"precision must be 'fp32', 'fp16' or 'int8', got {precision!r}", "use precision='fp32'")
    if len(batch) != 3 or not 1 <= batch[0] <= batch[1] <= batch[2]:
        raise UsageError(
            f"batch must be (min, opt, max) with 1 <= min <= opt <= max, got {batch}", "e.g. batch=(1, 8, 32)"
        )
    if parity_max_batch < 1:
        raise UsageError(f"parity_max_batch must be >= 1, got {parity_max_batch}", "use the default of 32")
    missing = [key for key in _DATA_CONFIG_KEYS if key not in data_config]
    if missing:
        raise UsageError(f"data_config lacks {', '.join(missing)}", "pass timm.data.resolve_data_config(model=...)")
    contract(data_config)  # a crop mode, interpolation or crop_pct the shipped infer.py cannot reproduce fails here
    if tuple(data_config["input_size"]) != tuple(input_size):
        raise UsageError(
            f"data_config input_size {tuple(data_config['input_size'])} != input_size {tuple(input_size)}",
            "export at the size the preprocessing produces",
        )
    if not class_names:
        raise UsageError("class_names is empty", "pass one name per output class")
    return _images_array(images, input_size)


def _images_array(images: torch.Tensor | np.ndarray, input_size: Sequence[int]) -> np.ndarray:
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.ndim != 4 or tuple(array.shape[1:]) != tuple(input_size) or len(array) == 0:
        raise UsageError(
            f"images must be [N, {', '.join(map(str, input_size))}] with N >= 1, got {list(array.shape)}",
            "pass real images preprocessed with the bundle's data_config",
        )
    if not np.isfinite(array).all():
        raise UsageError("images contain NaN or Inf", "check the preprocessing")
    return np.ascontiguousarray(array, dtype=np.float32)


def _check_class_count(expected: Mapping[str, np.ndarray], class_names: Sequence[str]) -> None:
    width = next(iter(expected.values())).shape[-1]
    if width != len(class_names):
        raise UsageError(
            f"the model has {width} outputs but {len(class_names)} class names were given",
            "pass one name per output class",
        )


# --- files ------------------------------------------------------------------------------------------------------


def _check_destination(out_dir: Path, force: bool) -> None:
    if not out_dir.exists():
        return
    if not force:
        raise OutputError(f"{out_dir} already exists", "pass --force to replace it, or choose another --output")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / METADATA_FILE).exists():
        # force replaces bundles, never an arbitrary non-empty directory someone pointed us at by mistake
        raise OutputError(
            f"{out_dir} exists and is not a peftx bundle; refusing to replace it",
            "remove it yourself or choose another path",
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but is not ours (EPERM): alive
        return True
    return True


def remove_stale_workdirs(out_dir: Path) -> list[Path]:
    """Delete ``.<name>.pid<N>.*.partial`` siblings of ``out_dir`` left by a writer that was killed (SIGKILL, power
    loss): its PID no longer exists. A live PID, even a recycled one, keeps its directory (the safe side)."""
    removed = []
    for p in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.pid*.partial"):
        pid = p.name[len(out_dir.name) + 5 :].split(".", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _make_workdir(out_dir: Path) -> Path:
    """A temporary directory beside ``out_dir``, so the final rename stays on one filesystem. Its name carries our
    PID so a later run can tell an abandoned one (see :func:`remove_stale_workdirs`)."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_workdirs(out_dir)
        work = Path(
            tempfile.mkdtemp(prefix=f".{out_dir.name}.pid{os.getpid()}.", suffix=".partial", dir=out_dir.parent)
        )
    except OSError as exc:
        raise OutputError(f"cannot create a directory in {out_dir.parent}: {exc}", "check permissions") from exc
    work.chmod(0o755)  # mkdtemp makes it 0700; a bundle is meant to be shared
    return work


def _move_into_place(work: Path, out_dir: Path, force: bool) -> None:
    """Rename ``work`` to ``out_dir``; an existing one (force) is moved aside first and deleted only afterwards."""
    if not out_dir.exists():
        os.rename(work, out_dir)
        return
    if not force:  # it appeared while we worked
        raise OutputError(f"{out_dir} appeared while the bundle was being written", "pass force=True to replace it")
    old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out_dir, old)
    os.rename(work, out_dir)
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()


def _write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def _write_text(path: Path, text: str, *, executable: bool = False) -> None:
    path.write_text(text, encoding="utf-8")
    if executable:
        path.chmod(0o755)


def _template(name: str) -> str:
    return resources.files(__package__).joinpath("templates").joinpath(name).read_text(encoding="utf-8")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
