"""Step: model_int8.onnx, calibrated on the bundle's own preprocessing; its accuracy gate with the sensitivity
fallback (which replaces the INT8 rows of the report when it passes), and the rules the shipped INT8 graph must hold."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from peftx.errors import ExportError
from peftx.tolerances import (
    ACCURACY_INT8,
)

from .. import int8 as int8_mod
from .. import int8_fp16, onnx_io
from ..accuracy import AccuracyReport, load_infer_module, result_for
from ..parity import (
    ParityResult,
)
from ..targets import TargetProfile
from .artifacts import INT8_FUSED_KERNELS, INT8_ONNX, _int8_runners
from .checks import _int8_parity
from .export_step import _target_fp32_nodes
from .format import INFER_FILE, INT8_EXACT, INT8_FILE, INT8_FUSED, _first_problems
from .request import FP16_CALIBRATION_IMAGES, BundleRequest, Progress


def _int8_step(
    work: Path, onnx_path: Path, opt: BundleRequest, scratch: Path, timings: dict[str, float], say: Progress
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


def _half_int8_floats(path: Path, onnx_path: Path, opt: BundleRequest, calibration: int8_mod.Calibration) -> int:
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
    opt: BundleRequest,
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
        rule = INT8_FUSED_KERNELS if fused else INT8_ONNX
        return result_for(
            runner.name,
            rule.accuracy("int8"),
            rule.accuracy_required("int8"),
            pred,
            labels,
            ref_pred,
            accuracy.reference_accuracy,
        )

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


def _check_int8_graph(path: Path, target: TargetProfile, fp32_nodes: Sequence[str]) -> None:
    """What must hold of the shipped INT8 graph (zero points 0, INT8, placement, opset), and TensorRT 8.5's FP32
    LayerNorm layers still present by name: a violation is peftx's bug, so the export stops."""
    problems = int8_mod.graph_problems(path, target)
    names = {n.name for n in onnx_io.load(path, weights=False).graph.node}
    missing = [n for n in fp32_nodes if n not in names]
    if missing:
        problems.append(f"{len(missing)} FP32 LayerNorm node(s) of {target.name} are gone (first: {missing[0]})")
    if problems:
        raise ExportError(
            f"{path.name} breaks the INT8 rules for {target.requested or target.name}: {_first_problems(problems)}",
            "report this model; use --precision fp16 meanwhile",
        )
