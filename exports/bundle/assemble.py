"""write_bundle: the bundle's steps in order over one BundleRequest, in a work directory published atomically."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.layers import RmsNorm

from peftx.errors import OutputError
from peftx.fsutil import sha256_file

from .. import deepstream as deepstream_mod
from .. import int8 as int8_mod
from .. import onnx_io
from ..accuracy import AccuracySet, Candidate, measure_accuracy
from ..parity import (
    ParityReport,
    make_input_sets,
    reference_outputs,
)
from ..runners import TorchRunner
from ..targets import TargetProfile
from ..tensorrt import (
    TensorRTMode,
    resolve_mode,
    resolve_target_here,
)
from ..tensorrt_ops import check_target_readiness
from .artifacts import ENGINE, FP16_ONNX, INT8_FUSED_KERNELS, INT8_ONNX, ONNX, _int8_runners, accuracy_candidate
from .checks import _checker, _fp32_bounds, _handle_readiness, _int8_parity, _parity_error
from .deepstream_step import _write_deepstream
from .engine_step import _tensorrt_step
from .export_step import _export_ready_onnx, _simplified_or_original, _target_fp32_nodes
from .format import (
    BENCH_FILE,
    BUILD_SCRIPT_FILE,
    DECODING_FILE,
    FP16_FILE,
    INFER_FILE,
    INT8_FILE,
    METADATA_FILE,
    ONNX_FILE,
    PARITY_FILE,
    READINESS_FILE,
    README_FILE,
    _metadata,
    _preprocessing,
    _shipped_onnx,
)
from .fp16_step import _fp16_step
from .int8_step import _check_int8_graph, _int8_gate, _int8_step
from .precision import Precision, quantized
from .publish import _check_destination, _make_workdir, _move_into_place, _write_json_atomic, _write_text
from .reference_step import REFERENCE_FILE, _reference_step
from .render import _check_atol, _decoding_source, _template, render_build_script, render_readme
from .request import (
    RANDOM_BATCH,
    BundleReport,
    BundleRequest,
    Progress,
    _check_class_count,
    _check_int8_request,
    _validate_inputs,
    parity_batches,
)


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
    precision: Precision = "fp32",
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
    # every LayerNorm and RMSNorm module: each must be found (decomposed) in a TensorRT 8.5 graph to be pinned FP32
    layernorms = sum(isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm, RmsNorm)) for m in merged.modules())
    options = BundleRequest(
        input_size=(input_size[0], input_size[1], input_size[2]),
        preprocessing=_preprocessing(data_config),
        class_names=list(class_names),
        provenance=provenance,
        batch=(batch[0], batch[1], batch[2]),
        precision=precision,
        tensorrt=tensorrt,
        use_trt=use_trt,
        trt_message=trt_message,
        simplify=simplify,
        parity_max_batch=parity_max_batch,
        timing_cache=timing_cache,
        target=profile,
        layernorms=layernorms,
        accuracy_set=accuracy_set,
        int8=int8,
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
    report = dataclasses.replace(report, out_dir=out_dir)
    say(f"bundle written to {out_dir} (status {report.status})")
    if report.status != "ok":
        raise _parity_error(report.parity, out_dir)
    return report


def _assemble(
    work: Path,
    reference: torch.nn.Module,
    merged: torch.nn.Module,
    images: np.ndarray,
    opt: BundleRequest,
    say: Progress,
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
    check = _checker(expected, inputs, say, {ONNX.parity(opt.precision): onnx_tol})
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
    fp16_rule = FP16_ONNX.parity(opt.precision), FP16_ONNX.parity_required(opt.precision)
    results += [check(runner, fp16_rule[0], required=fp16_rule[1]) for runner in fp16_runners]
    if not fp16_rule[1]:
        notes.append(f"FP16 checks are advisory for an {opt.precision} bundle: reported, not required")
    _write_text(work / INFER_FILE, _template("infer.py"))  # before INT8: calibration runs its preprocessing
    _write_text(work / DECODING_FILE, _decoding_source())  # infer.py imports it: the image decoding, peftx's own file
    _write_text(work / BENCH_FILE, _template(BENCH_FILE))  # infer.py --bench: times every artifact on the device
    int8_graph, calibration = None, None
    int8_kernels: dict[str, Any] = {}
    if quantized(opt.precision):
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
        results.append(check(trt_runner, ENGINE.parity(opt.precision), required=ENGINE.parity_required(opt.precision)))

    accuracy = None
    int8_info = None
    try:
        if opt.accuracy_set is not None:
            started = time.perf_counter()
            precision = opt.precision
            candidates: list[Candidate] = [
                *(accuracy_candidate(ONNX, runner, precision) for runner in ONNX.runners(work, scratch, precision)),
                *(accuracy_candidate(FP16_ONNX, runner, precision) for runner in fp16_runners),
            ]
            if int8_graph is not None:
                exact, fused = _int8_runners(int8_graph.path)
                candidates += [
                    accuracy_candidate(INT8_ONNX, exact, precision),
                    accuracy_candidate(INT8_FUSED_KERNELS, fused, precision),
                ]
            if trt_runner is not None:
                candidates.append(accuracy_candidate(ENGINE, trt_runner, precision))
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
    reference_set = _reference_step(work, reference, opt, images, onnx_tol, say)
    _write_text(work / README_FILE, render_readme(opt.preprocessing, opt.class_names, opt.precision, opt.target))
    # The engine is device-specific and is rebuilt on the device: it is tied to the bundle by model.engine.json (sha256
    # of the engine and of its source ONNX), not by metadata.json, so a rebuild with build_engine.sh keeps it valid.
    shipped = (
        ONNX_FILE,
        FP16_FILE,
        *((INT8_FILE,) if int8_graph is not None else ()),
        INFER_FILE,
        DECODING_FILE,
        BENCH_FILE,
        BUILD_SCRIPT_FILE,
        deepstream_mod.DEEPSTREAM_ONNX,
    )
    # an ONNX graph past 2 GB ships with its external-data file, hashed like the graph
    files = [p for name in shipped for p in (onnx_io.files(work / name) if name.endswith(".onnx") else [work / name])]
    sha = {path.name: sha256_file(path) for path in files}
    # the reference set is hashed like the models: --check trusts it
    sha.update({name: sha256_file(work / name) for name in (REFERENCE_FILE, *reference_set["raw_files"])})
    report = BundleReport(
        out_dir=work,
        status="ok" if parity.passed else "failed",
        parity=parity,
        readiness=readiness,
        sha256=sha,
        tensorrt=trt_info,
        simplify=simplify_info,
        fp16=fp16,
        timings={k: round(v, 3) for k, v in timings.items()},
        warnings=warnings,
        fp32_nodes=fp32_nodes,
        reference_set=reference_set,
        deepstream=deepstream,
        int8=int8_info,
    )
    _write_json_atomic(work / PARITY_FILE, parity.to_json())
    _write_json_atomic(work / READINESS_FILE, readiness.to_json())
    _write_json_atomic(work / METADATA_FILE, _metadata(report, onnx_path, opt))
    return report
