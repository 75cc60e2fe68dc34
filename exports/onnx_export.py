"""Export a timm classifier to ONNX with a dynamic batch axis, and describe an ONNX graph (ops, parameter count).

Exporter choice: the TorchScript exporter (``dynamo=False``, opset 17, ``dynamic_axes``) is the
default because it is fast (~8 s for ViT-B/16, well under a second for test models), emits one
``LayerNormalization`` node per LayerNorm at opset 17, and its graphs pass ONNX Runtime parity at any batch size. torch
has deprecated it, so when it fails (or is gone) ``exporter="auto"`` falls back to the torch.export-based exporter
(opset 18, ``dynamic_shapes``). Either way the graph is checked with ``onnx.checker`` (full check) and the batch axis
is verified dynamic and every other input/output axis static.

RMSNorm (Eva variants): torch's ``aten::rms_norm`` has no TorchScript-exporter symbolic below opset 23, so it is
registered here as timm's own fallback formula, x · (mean(x²) + eps)^-½ · w, in Pow / ReduceMean / Add / Sqrt / Div /
Mul (ops every target's parser takes). A TorchScript graph that ONNX Runtime cannot run on the trace input (torch
writes one for timm's mixed-RoPE ViTs) counts as a failed export, so ``auto`` moves on to torch.export.

``layernorm="decomposed"`` is for TensorRT 8.5, whose parser has no LayerNormalization: the TorchScript exporter at
opset 16 writes each LayerNorm as ReduceMean/Sub/Pow/Sqrt/Div (the same function; torch.export cannot go below 18),
and the graph is checked to hold no LayerNormalization node.
"""

from __future__ import annotations

import collections
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch

from peftx.errors import ExportError, UsageError

from . import onnx_io

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_AXIS_NAME = "batch"
# LayerNorm is a single LayerNormalization node only from opset 17; below it is ReduceMean/Pow/Sqrt, the pattern that
# overflows in FP16.
MIN_OPSET = 17
DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}
DECOMPOSED_LAYERNORM_OPSET = 16  # the newest opset without LayerNormalization (it arrived in opset 17)

Exporter = Literal["auto", "torchscript", "dynamo"]
LayerNormForm = Literal["fused", "decomposed"]


def export_onnx(
    model: torch.nn.Module,
    path: str | Path,
    *,
    input_size: tuple[int, int, int],
    opset: int | None = None,
    batch_for_trace: int = 2,
    metadata: Mapping[str, str] | None = None,
    exporter: Exporter = "auto",
    layernorm: LayerNormForm = "fused",
) -> Path:
    """Export ``model`` (eval mode, built with timm ``exportable=True``) to ``path`` and return the path.

    ``input_size`` is (C, H, W); H and W are baked in, the batch axis is dynamic. ``metadata`` goes into the model's
    ``metadata_props`` together with ``onnx_exporter`` (which exporter and opset produced the graph). ``layernorm``
    is "fused" (one LayerNormalization node, opset >= 17) or "decomposed" (opset <= 16, for TensorRT 8.5).
    """
    path = Path(path)
    _check_exportable(model)
    if batch_for_trace < 2:
        # torch.export specialises size-1 dims, and a batch of 1 hides batch-mixing bugs from the trace.
        raise UsageError(f"batch_for_trace must be >= 2, got {batch_for_trace}", "use the default of 2")
    opset, exporter = _opset_for(layernorm, opset, exporter)
    example = torch.randn(batch_for_trace, *input_size)
    # The exporters write into a staging directory: past 2 GB they put every weight in a file of its own beside the
    # graph. The graph is read back with its weights and saved once, as one file or graph + model.onnx.data.
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=path.parent))
    try:
        used = _export_with_fallback(model, example, staging / path.name, opset, exporter)
        proto = onnx_io.load(staging / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _check_io_shapes(proto, input_size)
    if layernorm == "decomposed" and any(n.op_type == "LayerNormalization" for n in proto.graph.node):
        raise ExportError(
            f"{path.name} holds LayerNormalization nodes although LayerNorm was to be decomposed",
            "export at opset <= 16 with the TorchScript exporter",
        )
    props = {**(metadata or {}), "onnx_exporter": used}
    onnx.helper.set_model_props(proto, {str(k): str(v) for k, v in props.items()})
    proto.producer_name = "peftx"
    onnx_io.save(proto, path)
    try:
        onnx_io.check(path)
    except onnx.checker.ValidationError as exc:
        raise ExportError(
            f"onnx.checker rejected {path.name}: {exc}", "report this model/exporter combination"
        ) from exc
    return path


def _opset_for(layernorm: LayerNormForm, opset: int | None, exporter: Exporter) -> tuple[int | None, Exporter]:
    """The opset and exporter a LayerNorm form allows (fused: >= 17, any exporter; decomposed: <= 16, TorchScript)."""
    if layernorm == "fused":
        if opset is not None and opset < MIN_OPSET:
            raise UsageError(
                f"opset {opset} is below {MIN_OPSET}",
                "opset >= 17 keeps LayerNorm one node (FP16-safe); a TensorRT 8.5 target decomposes it",
            )
        return opset, exporter
    if layernorm != "decomposed":
        raise UsageError(f"layernorm must be 'fused' or 'decomposed', got {layernorm!r}", "use layernorm='fused'")
    opset = DECOMPOSED_LAYERNORM_OPSET if opset is None else opset
    if opset > DECOMPOSED_LAYERNORM_OPSET:
        raise UsageError(
            f"opset {opset} exports LayerNorm as one LayerNormalization node",
            f"a decomposed LayerNorm needs opset <= {DECOMPOSED_LAYERNORM_OPSET}",
        )
    if exporter == "dynamo":
        raise UsageError(
            "the torch.export-based exporter starts at opset 18, where LayerNorm is one node",
            "use exporter='torchscript' (or 'auto') for a decomposed LayerNorm",
        )
    return opset, "torchscript"


def op_histogram(onnx_path: str | Path) -> dict[str, int]:
    """Node count per op type (main graph), most frequent first: two exports of one architecture must agree."""
    graph = onnx_io.load(onnx_path, weights=False).graph
    counts = collections.Counter(node.op_type for node in graph.node)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def param_count(onnx_path: str | Path) -> int:
    """Number of stored floating-point weight elements: initialisers plus tensors held by ``Constant`` nodes.

    Exporters put folded weights in either place, so both are counted; integer shape constants are not weights.
    Exporters store bit-identical tensors once (e.g. freshly initialised LayerNorm weights), so this can be below the
    module's parameter count; compare exports with exports.
    """
    graph = onnx_io.load(onnx_path, weights=False).graph
    tensors = list(graph.initializer)
    tensors += [
        attr.t for node in graph.node if node.op_type == "Constant" for attr in node.attribute if attr.name == "value"
    ]
    return sum(int(np.prod(t.dims, dtype=np.int64)) for t in tensors if _is_float(t.data_type))


def _is_float(elem_type: int) -> bool:
    t = onnx.TensorProto
    return elem_type in (t.FLOAT, t.FLOAT16, t.BFLOAT16, t.DOUBLE)


def _check_exportable(model: torch.nn.Module) -> None:
    """Refuse training mode and fused-SDPA attention (timm models built without ``exportable=True``)."""
    if model.training:
        raise UsageError("the model is in training mode", "call model.eval() before exporting")
    fused = [name for name, module in model.named_modules() if getattr(module, "fused_attn", False)]
    if fused:
        raise UsageError(
            f"{len(fused)} attention module(s) use fused SDPA (first: {fused[0]})",
            "build the model with timm.create_model(..., exportable=True)",
        )


def _export_with_fallback(
    model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int | None, exporter: Exporter
) -> str:
    """Run the chosen exporter; with ``auto`` try TorchScript, then torch.export. Returns 'name opset N'."""
    order = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
    errors: list[str] = []
    for name in order:
        # torch.export's translator starts at opset 18; an explicit opset is honoured where the exporter allows it.
        chosen = opset or DEFAULT_OPSET[name]
        if name == "dynamo":
            chosen = max(chosen, DEFAULT_OPSET["dynamo"])
        try:
            _EXPORTERS[name](model, example, path, chosen)
            return f"{name} opset {chosen}"
        except Exception as exc:  # noqa: BLE001 - any exporter failure is reported, and with auto, retried
            errors.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    raise ExportError("ONNX export failed: " + "; ".join(errors), "check the model was built with exportable=True")


def _rms_norm_symbolic(g, x, normalized_shape, weight, eps):  # noqa: ANN001 - torch.onnx symbolic protocol
    """aten::rms_norm as timm's fallback computes it: x * (mean(x^2 over the normalized dims) + eps)^-1/2 * weight."""
    from torch.onnx import symbolic_helper

    dims = symbolic_helper._get_const(normalized_shape, "is", "normalized_shape")
    eps_value = None if symbolic_helper._is_none(eps) else symbolic_helper._get_const(eps, "f", "eps")
    if eps_value is None:  # torch's default: the input dtype's machine epsilon
        eps_value = float(torch.finfo(torch.float32).eps)
    axes = list(range(-len(dims), 0))
    square = g.op("Pow", x, g.op("Constant", value_t=torch.tensor(2.0, dtype=torch.float32)))
    mean = g.op("ReduceMean", square, axes_i=axes, keepdims_i=1)
    rms = g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(eps_value, dtype=torch.float32))))
    out = g.op("Div", x, rms)
    return out if symbolic_helper._is_none(weight) else g.op("Mul", out, weight)


_SYMBOLICS_REGISTERED: set[int] = set()


def _register_symbolics(opset: int) -> None:
    """Symbolics the TorchScript exporter lacks (once per opset; ReduceMean keeps ``axes`` as an attribute < 18)."""
    if opset in _SYMBOLICS_REGISTERED or opset >= 18:
        return
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm_symbolic, opset)
    _SYMBOLICS_REGISTERED.add(opset)


def _runs_in_onnxruntime(path: Path, example: torch.Tensor) -> str | None:
    """None when ONNX Runtime loads ``path`` and runs it on ``example``, else why not (first line)."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        session.run(None, {session.get_inputs()[0].name: example.numpy()})
    except Exception as exc:  # noqa: BLE001 - ORT raises many types for one outcome: the graph does not run
        return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
    return None


def _export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    _register_symbolics(opset)
    with warnings.catch_warnings(), torch.no_grad():
        # Tracer warnings (Python numbers taken from shapes) are expected for timm models; the batch-size parity
        # checks at 1/3/7 are what proves the trace generalises, so the warnings are noise here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: BATCH_AXIS_NAME}, OUTPUT_NAME: {0: BATCH_AXIS_NAME}},
            do_constant_folding=True,
        )
    problem = _runs_in_onnxruntime(path, example)
    if problem is not None:
        raise ExportError(f"the graph it wrote does not run in ONNX Runtime ({problem})")


def _export_dynamo(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    batch = torch.export.Dim(BATCH_AXIS_NAME, min=1, max=4096)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
    if program is None:  # torch returns None only for the legacy exporter, which this call does not use
        raise ExportError("torch.onnx.export returned no ONNX program", "report this with your torch version")
    program.save(str(path), external_data=None)  # None: external data only past protobuf's 2 GB (then re-saved)


_EXPORTERS = {"torchscript": _export_torchscript, "dynamo": _export_dynamo}


def _check_io_shapes(proto: onnx.ModelProto, input_size: tuple[int, int, int]) -> None:
    """One input of shape [batch, *input_size] and a dynamic batch axis on every output; all else static."""
    inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    if len(inputs) != 1:
        raise ExportError(f"expected one graph input, found {len(inputs)}", "export a single-image-tensor model")
    dims = _dims(inputs[0])
    if not isinstance(dims[0], str) or dims[1:] != list(input_size):
        raise ExportError(
            f"input shape {dims} is not [batch, {', '.join(map(str, input_size))}]",
            "the batch axis must be dynamic and C/H/W static",
        )
    for out in proto.graph.output:
        out_dims = _dims(out)
        if not out_dims or not isinstance(out_dims[0], str) or any(not isinstance(d, int) for d in out_dims[1:]):
            raise ExportError(f"output {out.name!r} has shape {out_dims}", "only the batch axis may be dynamic")


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    """Static dims as ints, symbolic ones as their names ('?' when unnamed)."""
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim]


def read_metadata(onnx_path: str | Path) -> dict[str, str]:
    """The model's ``metadata_props`` as a dict."""
    return {p.key: p.value for p in onnx_io.load(onnx_path, weights=False).metadata_props}
