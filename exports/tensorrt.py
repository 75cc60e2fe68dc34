"""TensorRT engine building and inference. ``import tensorrt`` happens only inside functions.

TensorRT 10.x: FP16 is a builder flag (``BuilderFlag.FP16``) over the FP32 ONNX. TensorRT >= 11 removed the flag
(every network is strongly typed), so FP16 means parsing the FP16 ONNX made by ``fp16.py`` (LayerNorm/Softmax/large
values kept FP32 there). FP32 builds turn TF32 off so an "FP32" engine really computes in FP32. Engines are not
portable across GPUs or TensorRT versions: bundles also ship ``build_engine.sh`` to build on the target device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal

import numpy as np

from peftx.errors import BackendUnavailableError, ExportError, UsageError

Precision = Literal["fp32", "fp16"]
TensorRTMode = Literal["auto", "on", "off"]


def unavailable_reason() -> str | None:
    """Why TensorRT cannot run here (None when it can): it needs the ``tensorrt`` package AND a CUDA GPU."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"the tensorrt package is not importable ({exc})"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


def tensorrt_available() -> bool:
    return unavailable_reason() is None


def resolve_mode(mode: TensorRTMode) -> tuple[bool, str]:
    """(use TensorRT?, message for the report). ``on`` without TensorRT raises BackendUnavailableError."""
    if mode not in ("auto", "on", "off"):
        raise UsageError(f"tensorrt must be 'auto', 'on' or 'off', got {mode!r}", "use --tensorrt auto (tensorrt='auto' from Python)")
    if mode == "off":
        return False, "TensorRT disabled (tensorrt='off')"
    reason = unavailable_reason()
    if reason is None:
        return True, "TensorRT available"
    if mode == "on":
        raise BackendUnavailableError(f"TensorRT was required but {reason}",
                                      "install TensorRT >= 10 on a machine with an NVIDIA GPU, or use --tensorrt auto")
    return False, f"TensorRT skipped: {reason}; build on the device with build_engine.sh"


def _import_tensorrt() -> ModuleType:
    reason = unavailable_reason()
    if reason is not None:
        raise BackendUnavailableError(f"TensorRT is unavailable: {reason}", "install TensorRT >= 10 on a CUDA machine")
    import tensorrt

    return tensorrt


def tensorrt_major(trt: ModuleType) -> int:
    return int(str(trt.__version__).split(".")[0])


@dataclass
class EngineBuild:
    path: Path
    source_onnx: Path
    precision: Precision
    tensorrt_version: str
    batch: tuple[int, int, int]
    seconds: float

    def to_json(self) -> dict:
        return {"path": self.path.name, "source_onnx": self.source_onnx.name, "precision": self.precision,
                "tensorrt_version": self.tensorrt_version, "batch": list(self.batch), "seconds": round(self.seconds, 2)}


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    batch: tuple[int, int, int] = (1, 8, 32),
    precision: Precision = "fp32",
    timing_cache_path: str | Path | None = None,
    workspace_gb: float = 4.0,
    fp16_onnx_path: str | Path | None = None,
) -> EngineBuild:
    """Build and serialise an engine for the dynamic-batch ``onnx_path`` with batch profile (min, opt, max).

    ``fp16_onnx_path`` is the FP16 ONNX that TensorRT >= 11 parses for ``precision="fp16"``.
    """
    trt = _import_tensorrt()
    major = tensorrt_major(trt)
    source = _engine_source(Path(onnx_path), fp16_onnx_path, precision, major)
    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT >= 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT's ONNX parser rejected {source.name}: {errors}",
                          "see trt_readiness.json; an unsupported op needs a plugin or a different export")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    _set_precision(trt, config, precision, major)
    config.add_optimization_profile(_batch_profile(builder, network, batch))
    _load_timing_cache(config, timing_cache_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {source.name}",
                          "see the TensorRT log above; try a larger workspace_gb")
    engine_path = Path(engine_path)
    engine_path.write_bytes(memoryview(serialized))
    _save_timing_cache(config, timing_cache_path)
    return EngineBuild(engine_path, source, precision, str(trt.__version__), batch, time.perf_counter() - started)


def _engine_source(onnx_path: Path, fp16_onnx_path: str | Path | None, precision: Precision, major: int) -> Path:
    if precision not in ("fp32", "fp16"):
        raise UsageError(f"precision must be 'fp32' or 'fp16', got {precision!r}", "use fp32 or fp16")
    if precision == "fp16" and major >= 11:
        if fp16_onnx_path is None:
            raise UsageError("TensorRT >= 11 has no FP16 builder flag: an FP16 build needs the FP16 ONNX",
                             "pass fp16_onnx_path (made by peftx.exports.fp16.convert_to_fp16)")
        return Path(fp16_onnx_path)
    return onnx_path


def _set_precision(trt: ModuleType, config, precision: Precision, major: int) -> None:
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # FP32 layers must be FP32, not 10-bit-mantissa TF32
    if precision == "fp16" and major < 11:
        config.set_flag(trt.BuilderFlag.FP16)


def _batch_profile(builder, network, batch: tuple[int, int, int]):
    low, opt, high = batch
    if not 1 <= low <= opt <= high:
        raise UsageError(f"batch profile must satisfy 1 <= min <= opt <= max, got {batch}", "e.g. batch=(1, 8, 32)")
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]
        if any(d < 0 for d in rest):
            raise ExportError(f"input {tensor.name} has dynamic non-batch dims {tuple(tensor.shape)}",
                              "re-export with a static input size")
        profile.set_shape(tensor.name, (low, *rest), (opt, *rest), (high, *rest))
    return profile


def _load_timing_cache(config, path: str | Path | None) -> None:
    data = Path(path).read_bytes() if path is not None and Path(path).exists() else b""
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, ignore_mismatch=False)


def _save_timing_cache(config, path: str | Path | None) -> None:
    if path is not None:
        Path(path).write_bytes(memoryview(config.get_timing_cache().serialize()))


class TensorRTRunner:
    """Runs a serialised engine with the TensorRT 10+ tensor API; buffers are torch CUDA tensors."""

    def __init__(self, engine_path: str | Path, *, name: str = "tensorrt"):
        self.engine_path, self.name = Path(engine_path), name
        self._engine = self._context = None

    def __enter__(self) -> TensorRTRunner:
        trt = _import_tensorrt()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self._engine is None:
            raise ExportError(f"TensorRT cannot load {self.engine_path.name}",
                              "engines only load on the GPU and TensorRT version that built them; rebuild it")
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if n not in self._inputs]
        return self

    def __exit__(self, *exc: object) -> None:
        self._context = self._engine = None

    def infer(self, batch: np.ndarray) -> np.ndarray:
        import torch

        if self._context is None:
            raise UsageError("TensorRTRunner.infer called outside its `with` block", "use `with TensorRTRunner(...)`")
        (name,) = self._inputs
        low, _, high = (s[0] for s in self._engine.get_tensor_profile_shape(name, 0))
        if not low <= batch.shape[0] <= high:
            raise UsageError(f"batch {batch.shape[0]} is outside the engine's profile {low}..{high}",
                             "rebuild the engine with a wider batch profile")
        x = torch.from_numpy(np.ascontiguousarray(batch)).to("cuda", _torch_dtype(self._engine.get_tensor_dtype(name)))
        self._context.set_input_shape(name, tuple(x.shape))
        self._context.set_tensor_address(name, x.data_ptr())
        outputs = {}
        for out in self._outputs:
            shape = tuple(self._context.get_tensor_shape(out))
            outputs[out] = torch.empty(shape, dtype=_torch_dtype(self._engine.get_tensor_dtype(out)), device="cuda")
            self._context.set_tensor_address(out, outputs[out].data_ptr())
        stream = torch.cuda.current_stream()
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise ExportError("TensorRT execution failed", "see the TensorRT log")
        stream.synchronize()
        return outputs[self._outputs[0]].float().cpu().numpy()


def _torch_dtype(trt_dtype):
    import tensorrt as trt
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8,
             trt.bool: torch.bool, trt.uint8: torch.uint8}
    for name, torch_dtype in (("bfloat16", torch.bfloat16), ("int64", torch.int64)):
        if hasattr(trt, name):
            table[getattr(trt, name)] = torch_dtype
    return table[trt_dtype]
