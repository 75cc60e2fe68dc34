"""validate_bundle: re-check a written bundle (hashes, readiness, every artifact against the unmerged model) and
rewrite its reports."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from peftx.errors import ExportError

from ..accuracy import AccuracySet, measure_accuracy
from ..parity import (
    ParityReport,
    compare,
    make_input_sets,
    reference_outputs,
)
from ..runners import Runner, TorchRunner
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
from .artifacts import ENGINE, FP16_ONNX, INT8_FUSED_KERNELS, INT8_ONNX, ONNX, Artifact, accuracy_candidate
from .checks import (
    _checker,
    _fp32_bounds,
    _int8_kernels,
    _parity_error,
)
from .format import (
    ENGINE_FILE,
    INFER_FILE,
    INT8_FILE,
    METADATA_FILE,
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
from .precision import Precision
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
    precision = meta["precision"]
    scratch = Path(tempfile.mkdtemp())
    # (artifact, runner, the precision its rules are read at): the artifacts present, in the table's order; the INT8
    # graph's fused kernels are checked against its exact arithmetic, after the others
    checked: list[tuple[Artifact, Runner, Precision]] = []
    for artifact in (ONNX, FP16_ONNX, INT8_ONNX):
        if (bundle_dir / artifact.file).exists():
            checked += [(artifact, runner, precision) for runner in artifact.runners(bundle_dir, scratch, precision)]
    if engine.exists() and use_trt:
        engine_precision = (meta.get("tensorrt", {}).get("build") or {}).get("precision", precision)
        checked += [
            (ENGINE, runner, engine_precision) for runner in ENGINE.runners(bundle_dir, scratch, engine_precision)
        ]
    results = []
    accuracy = None
    try:
        for artifact, runner, at in checked:
            say(f"checking {runner.name}")
            results.append(
                compare(
                    expected,
                    runner,
                    inputs,
                    onnx_tol if artifact is ONNX else artifact.parity(at),
                    reference_name="reference (unmerged PyTorch)",
                    required=artifact.parity_required(at),
                )
            )
        accuracy_candidates = [accuracy_candidate(artifact, runner, at) for artifact, runner, at in checked]
        if (bundle_dir / INT8_FUSED_KERNELS.file).exists():  # against the exact arithmetic: advisory, with the reason
            row, kernels = _int8_kernels(bundle_dir / INT8_FILE, _checker(expected, inputs, say))
            results.append(row)
            if kernels["note"]:
                notes.append(kernels["note"])
            accuracy_candidates += [
                accuracy_candidate(INT8_FUSED_KERNELS, runner, precision)
                for runner in INT8_FUSED_KERNELS.runners(bundle_dir, scratch, precision)
            ]
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
