"""validate_bundle: re-check a written bundle (hashes, readiness, every artifact against the unmerged model) and
rewrite its reports."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from peftx.errors import ExportError
from peftx.tolerances import (
    ACCURACY_INT8,
    FP16,
    INT8,
    Tolerance,
)

from ..accuracy import AccuracySet, measure_accuracy
from ..parity import (
    ParityReport,
    compare,
    make_input_sets,
    reference_outputs,
)
from ..runners import OnnxRuntimeRunner, Runner, TensorRTRunner, TorchRunner
from ..targets import TargetProfile
from ..tensorrt import (
    TensorRTMode,
    check_engine_for_machine,
    machine_facts,
    probe,
    resolve_mode,
    resolve_target_here,
)
from ..tensorrt_ops import check_target_readiness
from .checks import (
    _accuracy_tolerance,
    _checker,
    _fp16_runners,
    _fp32_bounds,
    _int8_kernels,
    _int8_runners,
    _parity_error,
)
from .format import (
    ENGINE_FILE,
    FP16_FILE,
    INFER_FILE,
    INT8_FILE,
    METADATA_FILE,
    ONNX_FILE,
    PARITY_FILE,
    READINESS_FILE,
    _accuracy_summary,
    _first_problems,
    _now,
    _parity_summary,
    _recorded_target,
    _shipped_onnx,
    read_bundle,
    verify_artifacts,
)
from .precision import engine_tolerance
from .publish import _write_json_atomic
from .request import RANDOM_BATCH, Progress, _images_array, parity_batches


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
        tolerance = engine_tolerance(engine_precision)
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
