"""INT8 by explicit quantization: a Q/DQ graph (model_int8.onnx) calibrated on the run's own training images.

Why this form: implicit calibration is deprecated in TensorRT 10.1 and gone in 11, Q/DQ graphs build
on 8.5 to 11, and TensorRT needs zero points of 0 (symmetric INT8). Where: only the inputs of MatMul / Gemm / Conv
(weights per-channel, activations per-tensor); LayerNorm (fused or decomposed), Softmax, GELU and the residual Adds
stay float, since quantizing them collapses ViT accuracy. The graph is made by ``onnxruntime.quantization``'s
``quantize_static`` (QuantFormat.QDQ), which keeps the FP32 graph's opset (so the target's ceiling holds) and its node
names (so TensorRT 8.5's FP32 LayerNorm pinning still finds its layers). NVIDIA ModelOpt writes opset >= 19 INT8
graphs (TensorRT >= 10 only) and pins onnx/onnxruntime versions: see docs/guide.md "INT8" for what was measured.

The calibration images go through the preprocessing the bundle ships (its own infer.py), so the ranges are those of
what the device feeds. The gate is task accuracy (``accuracy.py``) with :data:`~peftx.tolerances.ACCURACY_INT8`;
when it fails, :func:`sensitivity` ranks the quantized nodes on calibration images (each one quantized ALONE, its
logits error against FP32) and :func:`fallback` keeps the most sensitive ones float, fewest first, within a bound.

The gate, the ranking and ``validate`` measure the Q/DQ arithmetic TensorRT performs, not this CPU's int8 kernels:
they run the graph with ONNX Runtime's graph optimisations disabled (:func:`exact_session_options`). The fused,
optimised session is what infer.py runs and ``bench`` times; where it disagrees with the exact one,
:func:`cpu_int8_kernels` says why (see ``docs/int8-gate.md``).
"""

from __future__ import annotations

import json
import logging
import math
import platform
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime
from onnxruntime import quantization as oq

from peftx.data import raw_sample
from peftx.errors import DataError, ExportError, UsageError

from . import onnx_io
from .fp16 import activation_bytes, images_per_run
from .targets import TargetProfile

CalibrationMethod = Literal["minmax", "entropy", "percentile"]
CALIBRATION_METHODS: tuple[str, ...] = ("minmax", "entropy", "percentile")
QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
# Default calibration images: PTQ4ViT and ONNX Runtime's examples calibrate ViTs on a few hundred; 256 are 8 batches of
# 32, a few seconds at the demo's size, and the demo's training split (1,077) holds them 4 times over.
CALIBRATION_IMAGES = 256
# Fewer images give per-tensor activation ranges set by a handful of images' extremes: refused, not silently used.
MIN_CALIBRATION_IMAGES = 32
CALIBRATION_BATCH = 32
# Calibration folds each batch's intermediate outputs into the ranges (histograms) before running the next
# (CalibStridedMinMax=1): peak memory is one batch of activations, every MatMul/Gemm/Conv input of the network at
# once (ViT-B/16 at 224 px: ~0.3 GB an image; measured peak RSS 15 GB with batches of 32), so batches are small.
# (CalibMaxIntermediateOutputs is not used: in onnxruntime 1.32 MinMax it clears the collected outputs without merging
# them, so only the last group counted.)
_CALIBRATION_READ_BATCH = 4
_STRIDE_BATCHES = 1
# ... and fewer where a batch of 4 would hold more than this many bytes of float activations (ViT-H/14: ~3 GB an
# image: one at a time; measured peak RSS 17 GB with 4). The ranges do not depend on the batching.
_CALIBRATION_BYTES = 4 << 30
# Sensitivity runs each quantized node alone on this many calibration images: one FP32-speed forward per node.
SENSITIVITY_IMAGES = 32
# The fallback keeps 1, 2, 3, ... of the most sensitive nodes float, checking the gate after each; at most this share of
# the quantized nodes (beyond it the graph is mostly float and INT8 buys little), at most len(_FALLBACK_STEPS) trials.
MAX_FLOAT_FRACTION = 0.25
_FALLBACK_STEPS = (1, 2, 3, 4, 6, 8, 12, 16)
_INT8 = onnx.TensorProto.INT8


@dataclass
class Calibration:
    """Calibration inputs [N, C, H, W] (float32, preprocessed as shipped) and where they came from."""

    inputs: np.ndarray
    source: str
    seed: int
    per_class: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"images": len(self.inputs), "source": self.source, "seed": self.seed, "per_class": self.per_class}


@dataclass(frozen=True)
class Int8Request:
    """What merge-export asks for: the images to calibrate on (raw, preprocessed by the bundle's infer.py), the
    calibration method, and whether the sensitivity fallback may run."""

    dataset: Any  # yields raw samples through peftx.data.raw_sample, with labels (for stratification)
    indices: list[int]
    source: str
    seed: int
    method: CalibrationMethod = "minmax"
    fallback: bool = True


def check_method(method: str) -> CalibrationMethod:
    if method not in CALIBRATION_METHODS:
        raise UsageError(
            f"--calibration-method {method!r} is not one of {', '.join(CALIBRATION_METHODS)}",
            "use minmax (the default), entropy or percentile",
        )
    return method  # type: ignore[return-value]


def check_target(target: TargetProfile) -> None:
    """A target that cannot take a Q/DQ graph with per-channel weights is refused before anything is done."""
    name = target.requested or target.name
    if not target.int8.qdq or not target.int8.zero_point_zero:
        raise UsageError(
            f"--precision int8: target {name} takes no symmetric Q/DQ (explicitly quantized) graph",
            "choose a target with INT8 (see `peftx targets`), or --precision fp16",
        )
    if target.export_opset < target.int8.per_channel_min_opset:
        raise UsageError(
            f"--precision int8: target {name} exports at opset {target.export_opset}, per-channel "
            f"weight scales need opset >= {target.int8.per_channel_min_opset}",
            "choose a newer target (see `peftx targets`)",
        )


def select_calibration(
    dataset: Any, labels: Sequence[int], n: int, seed: int, source: str, method: str = "minmax"
) -> Int8Request:
    """``n`` images of ``dataset`` (its TRAINING split), seeded and class-stratified: each class gives its share of
    ``n`` (largest remainders), drawn by one generator; fewer than MIN_CALIBRATION_IMAGES available is a DataError."""
    method = check_method(method)
    if n < MIN_CALIBRATION_IMAGES:
        raise UsageError(
            f"--calibration {n}: at least {MIN_CALIBRATION_IMAGES} images are needed for activation "
            "ranges that are not set by a few images' extremes",
            f"pass --calibration {CALIBRATION_IMAGES} (the default) or more",
        )
    label_array = np.asarray(labels)
    if len(label_array) < MIN_CALIBRATION_IMAGES:
        raise DataError(
            f"{source} has {len(label_array)} images, fewer than the {MIN_CALIBRATION_IMAGES} INT8 calibration needs",
            "pass --calibration-data DIR with more training images",
        )
    rng = np.random.default_rng(seed)
    n = min(n, len(label_array))
    classes, counts = np.unique(label_array, return_counts=True)
    share = counts / counts.sum() * n
    take = np.floor(share).astype(int)
    for i in np.argsort(-(share - take))[: n - take.sum()]:
        take[i] += 1
    chosen = [
        int(j)
        for c, k in zip(classes, take, strict=True)
        for j in rng.permutation(np.flatnonzero(label_array == c))[:k]
    ]
    return Int8Request(
        dataset,
        sorted(chosen),
        f"{source} ({n:,} of {len(labels):,} images, class-stratified, seed {seed})",
        seed,
        method,
    )


def calibration_inputs(request: Int8Request, shipped: Any, preprocessing: dict[str, Any]) -> Calibration:
    """The request's images through the bundle's own infer.py (``shipped``: its load_image / preprocess_image)."""
    arrays: list[np.ndarray] = []
    per_class: dict[str, int] = {}
    for index in request.indices:
        raw, label = raw_sample(request.dataset, index)
        image = shipped.load_image(raw) if isinstance(raw, (str, Path)) else raw.convert("RGB")
        arrays.append(np.asarray(shipped.preprocess_image(image, preprocessing), dtype=np.float32))
        per_class[str(label)] = per_class.get(str(label), 0) + 1
    return Calibration(
        np.ascontiguousarray(np.stack(arrays)), request.source, request.seed, dict(sorted(per_class.items()))
    )


# --- quantization -------------------------------------------------------------------------------------------------


@dataclass
class Int8Graph:
    path: Path
    method: str
    tool: dict[str, str]
    quantized: list[str]  # MatMul/Gemm/Conv nodes whose inputs are quantized
    float_nodes: list[str]  # MatMul/Gemm/Conv nodes kept float (excluded)
    opset: int
    seconds: float
    process_peak_rss_mb: float  # this process's peak resident memory so far (ru_maxrss), after calibrating

    def to_json(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in asdict(self).items() if k != "path"},
            "file": self.path.name,
            "quantized_count": len(self.quantized),
        }


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader protocol over an array, in batches; ``set_range`` (batch
    indices) is how quantize_static's strided calibration walks it one group at a time."""

    def __init__(self, input_name: str, inputs: np.ndarray, batch: int = CALIBRATION_BATCH):
        self.input_name, self.inputs, self.batch = input_name, inputs, batch
        self._it: Iterator[dict[str, np.ndarray]] = self._batches(0, len(self))

    def _batches(self, start: int, end: int) -> Iterator[dict[str, np.ndarray]]:
        for b in range(start, min(end, len(self))):
            yield {self.input_name: np.ascontiguousarray(self.inputs[b * self.batch : (b + 1) * self.batch])}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def __len__(self) -> int:
        return math.ceil(len(self.inputs) / self.batch)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = self._batches(start_index, end_index)


def quantizable_nodes(onnx_path: str | Path) -> list[str]:
    """Names of the MatMul/Gemm/Conv nodes of an FP32 graph, in graph order (what quantize_static may quantize)."""
    model = onnx_io.load(onnx_path, weights=False)
    return [n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS]


def quantize(
    onnx_path: str | Path,
    out_path: str | Path,
    calibration: np.ndarray | None,
    *,
    method: CalibrationMethod = "minmax",
    exclude: Sequence[str] = (),
    only: Sequence[str] | None = None,
    cache: str | Path | None = None,
) -> Int8Graph:
    """Write the symmetric INT8 Q/DQ graph of ``onnx_path`` to ``out_path``.

    ``calibration`` may be None when ``cache`` (onnxruntime's calibration cache JSON) already holds the ranges: the
    sensitivity search and the fallback re-quantize from it without calibrating again. ``exclude`` keeps those nodes
    float; ``only`` quantizes those nodes alone (sensitivity).
    """
    methods = {
        "minmax": oq.CalibrationMethod.MinMax,
        "entropy": oq.CalibrationMethod.Entropy,
        "percentile": oq.CalibrationMethod.Percentile,
    }
    method = check_method(method)
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    model = onnx_io.load(onnx_path, weights=False)
    initializers = {t.name for t in model.graph.initializer}
    input_name = next(i.name for i in model.graph.input if i.name not in initializers)
    per_image = sum(activation_bytes(onnx.shape_inference.infer_shapes(onnx_io.graph_only(model))).values())
    read_batch = images_per_run(per_image, _CALIBRATION_BYTES, _CALIBRATION_READ_BATCH)
    reader = _Reader(input_name, calibration, read_batch) if calibration is not None else None
    extra = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        # the bias stays FP32: TensorRT's DequantizeLinear takes INT8 only (8.5/8.6 operators.md), and an INT32
        # bias is ONNX Runtime's convention, not TensorRT's (it fuses the bias into the INT8 GEMM itself)
        "QuantizeBias": False,
        "CalibStridedMinMax": _STRIDE_BATCHES,
        "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS),
    }  # inputs only: outputs feed float ops
    started = time.perf_counter()
    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # quantize_static warns at root level that the graph was not "pre-processed"
    try:
        oq.quantize_static(
            str(onnx_path),
            str(out_path),
            reader,
            quant_format=oq.QuantFormat.QDQ,
            activation_type=oq.QuantType.QInt8,
            weight_type=oq.QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=list(QUANTIZED_OPS),
            nodes_to_exclude=list(exclude),
            nodes_to_quantize=list(only) if only is not None else None,
            calibrate_method=methods[method],
            extra_options=extra,
            calibration_cache_path=str(cache) if cache is not None else None,
            use_external_data_format=onnx_io.has_external_data(model),  # past 2 GB: its calibration copy too
        )
    except (ValueError, RuntimeError, onnx.checker.ValidationError) as exc:
        raise ExportError(
            f"INT8 quantization of {onnx_path.name} failed: {exc}",
            "report this model; pass --precision fp32 or fp16 meanwhile",
        ) from exc
    finally:
        quiet.setLevel(level)
    seconds = time.perf_counter() - started
    _finish(model, out_path, method)
    placement = qdq_placement(out_path)
    return Int8Graph(
        out_path,
        method,
        {"name": "onnxruntime.quantization.quantize_static (QuantFormat.QDQ)", "version": onnxruntime.__version__},
        placement["quantized"],
        placement["float"],
        _opset(onnx_io.load(out_path, weights=False)),
        seconds,
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )


def _finish(source: onnx.ModelProto, out_path: Path, method: str) -> None:
    """Float consumers get their float tensor back, and model.onnx's metadata_props (preprocessing, classes, target)
    plus which tool made the Q/DQ graph are carried over."""

    out = onnx_io.load(out_path)
    _float_consumers_back(out)
    have = {p.key for p in out.metadata_props}
    for prop in source.metadata_props:
        if prop.key not in have:
            out.metadata_props.add(key=prop.key, value=prop.value)
    out.metadata_props.add(
        key="peftx_int8",
        value=json.dumps(
            {
                "tool": "onnxruntime.quantization.quantize_static",
                "version": onnxruntime.__version__,
                "format": "QDQ",
                "symmetric": True,
                "per_channel_weights": True,
                "calibration_method": method,
                "ops": list(QUANTIZED_OPS),
            }
        ),
    )
    onnx_io.save(out, out_path)


def _float_consumers_back(model: onnx.ModelProto) -> int:
    """quantize_static redirects EVERY consumer of a quantized tensor to its DequantizeLinear output (unless two or
    more quantized nodes share it), so a LayerNorm, residual Add or Shape reading the same tensor as a MatMul would
    compute on fake-quantized values. Those consumers read the original float tensor again; returns how many."""
    producer = {o: n for n in model.graph.node for o in n.output}
    float_of = {}
    for node in model.graph.node:
        if (
            node.op_type == "DequantizeLinear"
            and node.input[0] in producer
            and producer[node.input[0]].op_type == "QuantizeLinear"
        ):
            float_of[node.output[0]] = producer[node.input[0]].input[0]
    moved = 0
    for node in model.graph.node:
        if node.op_type in QUANTIZED_OPS or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            if name in float_of:
                node.input[i] = float_of[name]
                moved += 1
    return moved


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


# --- what must hold of the graph ---------------------------------------------------------------------------------


def qdq_placement(path: str | Path) -> dict[str, list[str]]:
    """From the graph itself: the MatMul/Gemm/Conv nodes with every non-bias input dequantized ("quantized"), those
    with none ("float"), and every other node fed by a DequantizeLinear ("elsewhere": must be empty)."""
    model = onnx_io.load(path, weights=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    dq = lambda name: name in producer and producer[name].op_type == "DequantizeLinear"  # noqa: E731
    out: dict[str, list[str]] = {"quantized": [], "float": [], "partial": [], "elsewhere": []}
    for node in model.graph.node:
        if node.op_type in QUANTIZED_OPS:
            data = [i for i in node.input[:2] if i]  # the bias (Gemm/Conv input 2) stays float by design
            flags = [dq(i) for i in data]
            out["quantized" if all(flags) else "float" if not any(flags) else "partial"].append(node.name)
        elif node.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(dq(i) for i in node.input):
            out["elsewhere"].append(f"{node.op_type} {node.name}")
    return out


def graph_problems(path: str | Path, target: TargetProfile) -> list[str]:
    """What must hold of an INT8 graph for ``target``; each violation named (an empty list: it holds).

    Every Q/DQ zero point is 0 and INT8, every scale positive and finite, Q/DQ only on MatMul/Gemm/Conv inputs, no
    QOperator or dynamic quantization ops, the opset within the target's ceiling, at least one node quantized.
    """
    model = onnx_io.load(path, weights=False)
    inits = {t.name: t for t in model.graph.initializer}
    consts = {
        n.output[0]: next(a.t for a in n.attribute if a.name == "value")
        for n in model.graph.node
        if n.op_type == "Constant" and any(a.name == "value" for a in n.attribute)
    }
    tensors = {**consts, **inits}
    problems = []
    opset = _opset(model)
    if opset > target.opset_max or opset < target.int8.per_channel_min_opset:
        problems.append(
            f"opset {opset} is outside {target.int8.per_channel_min_opset}..{target.opset_max} ({target.name})"
        )
    for node in model.graph.node:
        where = f"{node.op_type} {node.name}"
        if node.op_type in target.int8.unsupported_ops:
            problems.append(f"{where}: {node.op_type} is not a Q/DQ graph op ({target.name} rejects it)")
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zp_name = node.input[2] if len(node.input) > 2 else ""
        if not zp_name or zp_name not in tensors:
            problems.append(f"{where}: no constant zero point (an implicit one is UINT8)")
            continue
        zp = tensors[zp_name]
        if zp.data_type != _INT8:
            problems.append(f"{where}: zero point is {onnx.TensorProto.DataType.Name(zp.data_type)}, not INT8")
        if np.any(onnx.numpy_helper.to_array(zp) != 0):
            problems.append(f"{where}: zero point is not 0 (TensorRT needs symmetric INT8)")
        scale = tensors.get(node.input[1])
        if scale is None:
            problems.append(f"{where}: scale is not a constant")
        else:
            values = onnx.numpy_helper.to_array(scale)
            if not (np.isfinite(values).all() and (values > 0).all()):
                problems.append(f"{where}: scale has non-positive or non-finite values")
        if (
            node.op_type == "DequantizeLinear"
            and node.input[0] in tensors
            and tensors[node.input[0]].data_type != _INT8
        ):
            problems.append(
                f"{where}: quantized weight is "
                f"{onnx.TensorProto.DataType.Name(tensors[node.input[0]].data_type)}, not INT8"
            )
    placement = qdq_placement(path)
    problems += [f"{n}: Q/DQ feeds a node that must stay float" for n in placement["elsewhere"]]
    problems += [f"{n}: only some of its inputs are quantized" for n in placement["partial"]]
    if not placement["quantized"]:
        problems.append("no MatMul/Gemm/Conv node is quantized")
    return problems


# --- the gate's fallback ---------------------------------------------------------------------------------------


@dataclass
class Sensitivity:
    node: str
    error: float  # mean over images of |int8 - fp32|^2 / |fp32|^2 of the logits, this node alone quantized


def sensitivity(
    onnx_path: Path,
    calibration: np.ndarray,
    cache: Path,
    scratch: Path,
    method: CalibrationMethod = "minmax",
    nodes: Sequence[str] | None = None,
) -> list[Sensitivity]:
    """Every quantizable node quantized ALONE (ranges from ``cache``), its logits error against FP32 on the first
    SENSITIVITY_IMAGES calibration images; most sensitive first. Cost: one graph rewrite and one FP32-speed forward
    of SENSITIVITY_IMAGES images per node (ViT-S: 74 nodes). Both sides run unoptimised (:func:`exact_session_options`):
    the ranking is that of TensorRT's arithmetic on every processor, not of this CPU's int8 kernels."""
    x = np.ascontiguousarray(calibration[:SENSITIVITY_IMAGES])
    reference = _session_run(onnxruntime, onnx_path, x)
    norm = np.maximum((reference**2).sum(axis=1), 1e-12)
    out = []
    for name in nodes if nodes is not None else quantizable_nodes(onnx_path):
        trial = scratch / "sensitivity.onnx"
        quantize(onnx_path, trial, None, method=method, only=[name], cache=cache)
        got = _session_run(onnxruntime, trial, x)
        out.append(Sensitivity(name, float((((got - reference) ** 2).sum(axis=1) / norm).mean())))
        onnx_io.remove(trial)
    return sorted(out, key=lambda s: -s.error)


def _session_run(ort, path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), exact_session_options(ort), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate(
        [session.run(None, {name: x[i : i + CALIBRATION_BATCH]})[0] for i in range(0, len(x), CALIBRATION_BATCH)]
    ).astype(np.float64)


@dataclass
class FallbackTrial:
    float_nodes: list[str]
    accuracy: float
    passed: bool


@dataclass
class Fallback:
    ran: bool
    passed: bool
    float_nodes: list[str]  # the chosen ones (passed), else those of the best trial
    trials: list[FallbackTrial]
    ranking: list[Sensitivity]
    bound: str
    seconds: float
    best_accuracy: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "ran": self.ran,
            "passed": self.passed,
            "float_nodes": self.float_nodes,
            "best_accuracy": self.best_accuracy,
            "bound": self.bound,
            "seconds": round(self.seconds, 2),
            "trials": [asdict(t) for t in self.trials],
            "ranking": [asdict(s) for s in self.ranking[:16]],
        }


def fallback_steps(quantizable: int) -> list[int]:
    """How many float nodes each trial keeps: 1, 2, 3, 4, 6, ... up to MAX_FLOAT_FRACTION of the quantizable."""
    cap = max(1, int(MAX_FLOAT_FRACTION * quantizable))
    return [k for k in _FALLBACK_STEPS if k <= cap]


def fallback(
    onnx_path: Path,
    out_path: Path,
    calibration: np.ndarray,
    cache: Path,
    method: CalibrationMethod,
    gate: Callable[[Path], tuple[float, bool]],
    scratch: Path,
    progress: Callable[[str], None] | None = None,
) -> Fallback:
    """Keep the fewest most-sensitive nodes float until ``gate`` (path -> (accuracy, passed)) passes.

    On success ``out_path`` holds the passing graph; otherwise it is left as it was (the full INT8 graph) and the
    result names the best trial. Bounded: len(fallback_steps) gate checks, the sensitivity pass once.
    """
    say = progress or (lambda _m: None)
    started = time.perf_counter()
    say(
        f"INT8 gate failed: ranking quantized nodes by sensitivity on {min(len(calibration), SENSITIVITY_IMAGES)} "
        "calibration images"
    )
    ranking = sensitivity(onnx_path, calibration, cache, scratch, method)
    steps = fallback_steps(len(ranking))
    bound = (
        f"{len(steps)} gate checks at most (float nodes {', '.join(map(str, steps))}: at most "
        f"{int(MAX_FLOAT_FRACTION * 100)} % of the {len(ranking)} quantizable nodes), after one sensitivity pass "
        f"of {len(ranking)} single-node graphs on {min(len(calibration), SENSITIVITY_IMAGES)} images"
    )
    trials = []
    for k in steps:
        names = [s.node for s in ranking[:k]]
        trial = scratch / "fallback.onnx"
        say(f"INT8 fallback: {k} node(s) float ({names[-1]}{' ...' if k > 1 else ''})")
        quantize(onnx_path, trial, None, method=method, exclude=names, cache=cache)
        accuracy, passed = gate(trial)
        trials.append(FallbackTrial(names, accuracy, passed))
        if passed:
            onnx_io.replace(trial, out_path)
            return Fallback(True, True, names, trials, ranking, bound, time.perf_counter() - started, accuracy)
        onnx_io.remove(trial)
    best = max(trials, key=lambda t: t.accuracy) if trials else None
    return Fallback(
        True,
        False,
        best.float_nodes if best else [],
        trials,
        ranking,
        bound,
        time.perf_counter() - started,
        best.accuracy if best else None,
    )


# --- the exact Q/DQ arithmetic, and this CPU's fused int8 kernels ---------------------------------------------------


def exact_session_options(ort: Any) -> Any:
    """ONNX Runtime session options that run a Q/DQ graph as the arithmetic TensorRT performs, on every processor.

    With graph optimisations disabled (``ORT_DISABLE_ALL``) ONNX Runtime executes the graph node by node as written:
    QuantizeLinear (x / s, rounded half to even, saturated to [-128, 127]), DequantizeLinear (q * s, in float32) and
    the float MatMul / Gemm / Conv kernels on the dequantized values. Nothing is fused into MatMulIntegerToFloat or
    QLinearMatMul (tests/test_int8.py reads the executed node kinds from ONNX Runtime's profile). Each product
    q_x s_x q_w s_w is formed from exactly representable int8 values and float32 scales, and the sum runs in float32,
    so the result is sum(q_x q_w) s_x s_w up to float32 rounding (measured: 5e-7 of the output scale on a K = 768
    MatMul against an exact integer evaluation; tests/test_int8.py), the same rounding the FP32 graph has on any
    processor. TensorRT's INT8 kernels compute sum(q_x q_w) exactly in 32-bit integers and rescale in float: the
    same function.

    The optimised session instead fuses each DQ -> MatMul into an int8 kernel. On x86 CPUs without VNNI (AVX2,
    AVX-512 without VNNI) ONNX Runtime's kernels multiply u8 x s8 pairs with ``vpmaddubsw``, whose pair sums saturate
    at 16 bits: on such a CPU its outputs are not TensorRT's (measured on an AMD EPYC with AVX2: 12 % of the output
    scale on that MatMul). A gate on those outputs measures the validating CPU, not the device.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


def cpu_int8_kernels(cpuinfo: str | None = None) -> dict[str, Any]:
    """What this CPU's int8 dot products accumulate in, from /proc/cpuinfo (``cpuinfo``: its text, for tests).

    ``accumulation``: "32-bit" (x86 VNNI / AMX, Arm dot product), "16-bit pairs (saturating)" (x86 without VNNI:
    ONNX Runtime's AVX2 / AVX-512BW int8 kernels use ``vpmaddubsw``), or "unknown".
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    model, flags = "", set[str]()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    vnni = sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8", "avx_vnni_int8"})
    if vnni or "asimddp" in flags:
        accumulation = "32-bit"
    elif "avx2" in flags or "avx512bw" in flags:
        accumulation = "16-bit pairs (saturating)"
    else:
        accumulation = "unknown"
    isa = [f for f in ("avx2", "avx512f", "avx512bw", *vnni, "asimddp") if f in flags]
    return {"cpu": model or platform.processor() or platform.machine(), "isa": isa, "accumulation": accumulation}


def fused_kernels_note(max_abs: float, bound: float, kernels: dict[str, Any]) -> str:
    """The report's line when ONNX Runtime's fused int8 kernels disagree with the exact Q/DQ arithmetic here."""
    why = {
        "16-bit pairs (saturating)": (
            "this CPU has no VNNI, so ONNX Runtime's int8 kernels sum u8 x s8 pairs in 16 bits, which saturates"
        ),
        "32-bit": "this CPU accumulates int8 products in 32 bits, so the cause is not 16-bit saturation: report it",
    }.get(kernels.get("accumulation", ""), "unknown cause on this CPU")
    return (
        f"ONNX Runtime's fused int8 CPU kernels differ from the exact Q/DQ arithmetic by max |Δ| {max_abs:.3g} "
        f"(INT8 bound {bound:.3g}) on {kernels.get('cpu') or 'this CPU'}: {why}. TensorRT accumulates in 32 bits, "
        "so the gate measures the exact arithmetic; infer.py --precision int8 under ONNX Runtime and bench's timings "
        "on this CPU use the fused kernels (advisory, not a failure of the bundle)"
    )
