"""TensorRT engine building and inference, TensorRT 8.5 to 11. ``import tensorrt`` happens only inside functions.

What differs by version, and where it is handled (facts from NVIDIA/TensorRT's python samples and migration guides):

* network creation: 8.x/9.x need ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH``; 10+ is explicit batch only
  (``create_network(0)``).
* FP16: 8.x-10.x set ``BuilderFlag.FP16`` over the FP32 ONNX; 11 removed the flag (every network strongly typed), so
  FP16 means parsing the FP16 ONNX made by ``fp16.py`` (LayerNorm/Softmax/large values kept FP32 there).
* a target's FP32 nodes (TensorRT 8.5's decomposed LayerNorm) are pinned in FP16 builds with per-layer precision and
  ``BuilderFlag.OBEY_PRECISION_CONSTRAINTS`` (8.x-10.x); the ONNX parser names layers after their nodes.
* INT8: always the Q/DQ graph (model_int8.onnx, explicit quantization; no calibrator). 8.x-10.x set
  ``BuilderFlag.INT8`` and ``FP16`` (the float parts between the quantized GEMMs run FP16), with the FP32 pinning as
  for FP16; 11 is strongly typed: no flags, the Q/DQ nodes say what is INT8 and the rest stays as typed (FP32).
* FP32 builds turn TF32 off so an "FP32" engine really computes in FP32.
* TensorRT >= 10.12 deprecates the FP16, INT8 and OBEY_PRECISION_CONSTRAINTS builder flags in favour of strongly
  typed networks (11 removed them). They are still set on 10.12-10.x, on purpose: they work there (TensorRT logs a
  deprecation warning), they give the same engine as on 8.5-10.11, and the strongly typed path (the FP16 ONNX) is
  what 11 takes; moving 10.12+ onto it would build a different engine from the one the bundle was checked with on
  older TensorRT. See docs/device.md.
* running: the name-based tensor API (``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``) exists from
  8.5 on, so one runner serves every supported version.

Every engine built here gets a manifest beside it (``model.engine.json``: TensorRT version, GPU and compute
capability, Jetson/L4T, precision, batch profile, sha256 of the engine and of its source ONNX), which ``validate``
and ``infer.py`` compare with the machine before loading it. The builder uses the TensorRT API directly rather than
Polygraphy: the version differences above are a few lines, per-layer precision needs the network object anyway, and
the build then needs nothing beyond TensorRT on the device; Polygraphy is what the bundle's re-check lines use.
Engines are not portable across GPUs or TensorRT versions: bundles also ship ``build_engine.sh`` to build on the
target device.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np

from peftx.errors import BackendUnavailableError, ExportError, UsageError
from peftx.fsutil import sha256_file, write_text_atomic

from .targets import TargetProfile, at_least, profile_for_tensorrt, resolve_target, version_tuple

Precision = Literal["fp32", "fp16", "int8"]
TensorRTMode = Literal["auto", "on", "off"]
MANIFEST_FILE = "model.engine.json"
MANIFEST_FORMAT = "peftx-engine-manifest"


@dataclass(frozen=True)
class TensorRTProbe:
    """What TensorRT this machine has: its version when importable, and why it cannot build here (None: it can)."""

    version: str | None
    reason: str | None


@dataclass(frozen=True)
class AssumedMachine:
    """Facts of a machine that is not this one (TensorRT and a GPU where there are none): set as :data:`ASSUMED`,
    :func:`probe` and :func:`machine_facts` answer them instead of looking, for every caller whatever name it
    imported them under. ``gpu`` / ``jetson``: as :func:`machine_facts` reports them (None: looked up here)."""

    probe: TensorRTProbe
    gpu: dict[str, str | None] | None = None
    jetson: dict[str, Any] | None = None


ASSUMED: AssumedMachine | None = None  # None: the facts are this machine's, looked up


def probe() -> TensorRTProbe:
    """TensorRT needs the ``tensorrt`` package AND a CUDA GPU; both are looked for, nothing is built."""
    if ASSUMED is not None:
        return ASSUMED.probe
    try:
        import tensorrt
    except ImportError as exc:
        return TensorRTProbe(None, f"the tensorrt package is not importable ({exc})")
    version = str(getattr(tensorrt, "__version__", "0"))
    import torch

    if not torch.cuda.is_available():
        return TensorRTProbe(version, "no CUDA GPU is visible")
    return TensorRTProbe(version, None)


def unavailable_reason() -> str | None:
    """Why TensorRT cannot run here (None when it can)."""
    return probe().reason


def tensorrt_available() -> bool:
    return unavailable_reason() is None


def resolve_mode(mode: TensorRTMode, target: TargetProfile | None = None) -> tuple[bool, str]:
    """(use TensorRT?, message for the report). ``on`` without a TensorRT that can build ``target`` raises
    BackendUnavailableError, before any work; ``auto`` then skips the engine and says why."""
    if mode not in ("auto", "on", "off"):
        raise UsageError(
            f"tensorrt must be 'auto', 'on' or 'off', got {mode!r}", "use --tensorrt auto (tensorrt='auto' from Python)"
        )
    if mode == "off":
        return False, "TensorRT disabled (tensorrt='off')"
    found = probe()
    if (
        found.reason is None
        and found.version
        and target is not None
        and not at_least(found.version, target.tensorrt_min)
    ):
        wanted = target.requested or target.name
        here = profile_for_tensorrt(found.version)
        if mode == "on":
            raise BackendUnavailableError(
                f"--target {wanted} needs TensorRT >= {target.tensorrt_min} to build its engine, but TensorRT "
                f"{found.version} is installed here",
                f"use --target {here.name if here else 'auto'} (or auto) for this TensorRT, or --tensorrt auto/off "
                "and build on the device with build_engine.sh",
            )
        return False, (
            f"TensorRT skipped: TensorRT {found.version} here is older than the target's "
            f"{target.tensorrt_min}; build on the device with build_engine.sh"
        )
    if found.reason is None:
        return True, f"TensorRT {found.version} available"
    if mode == "on":
        raise BackendUnavailableError(
            f"TensorRT was required but {found.reason}",
            "install TensorRT >= 8.5 on a machine with an NVIDIA GPU, or use --tensorrt auto",
        )
    return False, f"TensorRT skipped: {found.reason}; build on the device with build_engine.sh"


def resolve_target_here(name: str | None) -> TargetProfile:
    """``targets.resolve_target`` with this machine's facts for ``auto`` (installed TensorRT, Jetson L4T release)."""
    if (name or "").strip().lower() != "auto":
        return resolve_target(name)
    from .templates.infer import jetson_facts

    return resolve_target(name, tensorrt_version=probe().version, l4t=(jetson_facts() or {}).get("l4t"))


def _import_tensorrt() -> ModuleType:
    reason = unavailable_reason()
    if reason is not None:
        raise BackendUnavailableError(f"TensorRT is unavailable: {reason}", "install TensorRT >= 8.5 on a CUDA machine")
    import tensorrt

    return tensorrt


def tensorrt_major(trt: ModuleType) -> int:
    return version_tuple(str(trt.__version__))[0]


@dataclass
class EngineBuild:
    path: Path
    source_onnx: Path
    precision: Precision
    tensorrt_version: str
    batch: tuple[int, int, int]
    seconds: float
    fp32_layers: int = 0  # layers pinned to FP32 in an FP16 build (a target's decomposed LayerNorm)
    manifest: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "path": self.path.name,
            "source_onnx": self.source_onnx.name,
            "precision": self.precision,
            "tensorrt_version": self.tensorrt_version,
            "batch": list(self.batch),
            "seconds": round(self.seconds, 2),
            "fp32_layers": self.fp32_layers,
            "manifest": MANIFEST_FILE,
        }


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    batch: tuple[int, int, int] = (1, 8, 32),
    precision: Precision = "fp32",
    timing_cache_path: str | Path | None = None,
    workspace_gb: float = 4.0,
    fp16_onnx_path: str | Path | None = None,
    fp32_layers: Iterable[str] = (),
    target: str = "",
    int8_onnx_path: str | Path | None = None,
) -> EngineBuild:
    """Build and serialise an engine for the dynamic-batch ``onnx_path`` with batch profile (min, opt, max), and
    write its manifest (``model.engine.json``) beside it.

    ``fp16_onnx_path`` is the FP16 ONNX that TensorRT >= 11 parses for ``precision="fp16"``. ``fp32_layers`` are
    ONNX node names kept FP32 in an FP16 build on 8.x-10.x (on 11 the FP16 ONNX already keeps them FP32), and in
    an INT8 build there. ``int8_onnx_path`` is the Q/DQ graph every INT8 build parses.
    """
    trt = _import_tensorrt()
    major = tensorrt_major(trt)
    source = _engine_source(Path(onnx_path), fp16_onnx_path, precision, major, int8_onnx_path)
    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, major))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(
            f"TensorRT's ONNX parser rejected {source.name}: {errors}",
            "see trt_readiness.json; an unsupported op needs a plugin or a different export",
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    _set_precision(trt, config, precision, major)
    pinned = pin_fp32_layers(trt, network, config, fp32_layers) if precision != "fp32" and major < 11 else 0
    config.add_optimization_profile(_batch_profile(builder, network, batch))
    _load_timing_cache(config, timing_cache_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(
            f"TensorRT failed to build an engine from {source.name}",
            "see the TensorRT log above; try a larger workspace_gb",
        )
    engine_path = Path(engine_path)
    engine_path.write_bytes(memoryview(serialized))
    _save_timing_cache(config, timing_cache_path)
    build = EngineBuild(
        engine_path, source, precision, str(trt.__version__), batch, time.perf_counter() - started, pinned
    )
    build.manifest = write_manifest(build, machine_facts(str(trt.__version__)), target=target, built_by="peftx")
    return build


def network_flags(trt: ModuleType, major: int) -> int:
    """EXPLICIT_BATCH on 8.x/9.x (the ONNX parser requires it there); 0 from 10 on (explicit batch is the only mode)."""
    if major < 10:
        return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    return 0


def _engine_source(
    onnx_path: Path,
    fp16_onnx_path: str | Path | None,
    precision: Precision,
    major: int,
    int8_onnx_path: str | Path | None = None,
) -> Path:
    if precision not in ("fp32", "fp16", "int8"):
        raise UsageError(f"precision must be 'fp32', 'fp16' or 'int8', got {precision!r}", "use fp32, fp16 or int8")
    if precision == "int8":
        if int8_onnx_path is None or not Path(int8_onnx_path).is_file():
            raise UsageError(
                "an INT8 engine is built from the Q/DQ graph (model_int8.onnx), which is missing",
                "export with --precision int8 (peftx merge-export RUN --precision int8)",
            )
        return Path(int8_onnx_path)
    if precision == "fp16" and major >= 11:
        if fp16_onnx_path is None:
            raise UsageError(
                "TensorRT >= 11 has no FP16 builder flag: an FP16 build needs the FP16 ONNX",
                "pass fp16_onnx_path (made by peftx.exports.fp16.convert_to_fp16)",
            )
        return Path(fp16_onnx_path)
    return onnx_path


def builder_flags(precision: Precision, major: int) -> list[str]:
    """trt.BuilderFlag names to set for ``precision`` on TensorRT ``major`` (the profiles' int8.builder_flags plus
    FP16 for the float parts): none on 11, where every network is strongly typed. On 10.12-10.x these flags are
    deprecated but still honoured (a warning in TensorRT's log); see the module docstring for why they stay."""
    if major >= 11 or precision == "fp32":
        return []
    if precision == "fp16":
        return ["FP16"]
    profile = profile_for_tensorrt(f"{major}.6" if major == 8 else f"{major}.0")
    if profile is None:  # below 8.5: no target profile, so no INT8 rules either
        raise UsageError(f"TensorRT {major}.x has no peftx target profile", "build with TensorRT 8.5 or newer")
    return [*profile.int8.builder_flags, "FP16"]


def _set_precision(trt: ModuleType, config, precision: Precision, major: int) -> None:
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # FP32 layers must be FP32, not 10-bit-mantissa TF32
    for flag in builder_flags(precision, major):
        config.set_flag(getattr(trt.BuilderFlag, flag))


def pin_fp32_layers(trt: ModuleType, network, config, names: Iterable[str]) -> int:
    """Keep the layers named ``names`` (ONNX node names) in FP32, inputs and outputs, and make TensorRT obey it.

    Returns how many layers were pinned; names that match no layer are an ExportError (a silently unpinned decomposed
    LayerNorm is exactly the FP16 overflow this prevents; trtexec would ignore them without a word).
    """
    wanted = set(names)
    if not wanted:
        return 0
    pinned = set()
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.name in wanted:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned.add(layer.name)
    missing = sorted(wanted - pinned)
    if missing:
        raise ExportError(
            f"{len(missing)} layer(s) to keep FP32 are not in the parsed network (first: {missing[0]})",
            "report this TensorRT version: its parser names layers differently",
        )
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    return len(pinned)


def _batch_profile(builder, network, batch: tuple[int, int, int]):
    low, opt, high = batch
    if not 1 <= low <= opt <= high:
        raise UsageError(f"batch profile must satisfy 1 <= min <= opt <= max, got {batch}", "e.g. batch=(1, 8, 32)")
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]
        if any(d < 0 for d in rest):
            raise ExportError(
                f"input {tensor.name} has dynamic non-batch dims {tuple(tensor.shape)}",
                "re-export with a static input size",
            )
        profile.set_shape(tensor.name, (low, *rest), (opt, *rest), (high, *rest))
    return profile


def _load_timing_cache(config, path: str | Path | None) -> None:
    data = Path(path).read_bytes() if path is not None and Path(path).exists() else b""
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, ignore_mismatch=False)


def _save_timing_cache(config, path: str | Path | None) -> None:
    if path is not None:
        Path(path).write_bytes(memoryview(config.get_timing_cache().serialize()))


# --- engine manifest ----------------------------------------------------------------------------------------------


def machine_facts(tensorrt_version: str | None) -> dict[str, Any]:
    """This machine as an engine manifest describes one: TensorRT version, GPU 0 (through torch, which peftx has),
    Jetson model and L4T release when on a Jetson."""
    from .templates.infer import jetson_facts

    if ASSUMED is not None and ASSUMED.gpu is not None:
        return {"tensorrt_version": tensorrt_version, "gpu": dict(ASSUMED.gpu), "jetson": ASSUMED.jetson}
    gpu: dict[str, str | None] = {"name": None, "compute_capability": None}
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            gpu = {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    except Exception:  # noqa: BLE001 - no GPU facts is a fact too: the comparison then refuses nothing on them
        pass
    return {"tensorrt_version": tensorrt_version, "gpu": gpu, "jetson": jetson_facts()}


def write_manifest(build: EngineBuild, facts: dict[str, Any], *, target: str = "", built_by: str) -> dict[str, Any]:
    """Write ``model.engine.json`` beside ``build.path`` (atomically) and return it. The TensorRT version is written
    as at least major.minor.patch ('10.3' -> '10.3.0'; a build number is kept), as build_engine.sh writes it."""
    from .templates.infer import release_string

    low, opt, high = build.batch
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": 1,
        "engine": build.path.name,
        "engine_sha256": sha256_file(build.path),
        "tensorrt_version": release_string(facts.get("tensorrt_version")),
        "gpu": facts.get("gpu"),
        "jetson": facts.get("jetson"),
        "precision": build.precision,
        "batch": {"min": low, "opt": opt, "max": high},
        "source_onnx": build.source_onnx.name,
        "source_onnx_sha256": sha256_file(build.source_onnx),
        "target": target,
        "fp32_layers": build.fp32_layers,
        "built_by": built_by,
        "built_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_text_atomic(build.path.with_name(MANIFEST_FILE), json.dumps(manifest, indent=2) + "\n")
    return manifest


def check_engine_for_machine(engine_path: str | Path, facts: dict[str, Any]) -> list[str]:
    """Raise ExportError (one line, with the fix) when ``engine_path``'s manifest says it was built for another GPU
    or TensorRT than ``facts`` describe; return the warnings otherwise. The comparison is infer.py's own
    (``engine_problems``), so the bundle's runner and ``peftx validate`` refuse exactly the same engines."""
    from .templates.infer import engine_problems, read_engine_manifest, refusal_line

    engine_path = Path(engine_path)
    try:
        manifest = read_engine_manifest(engine_path.with_name(MANIFEST_FILE))
    except ValueError as exc:
        raise ExportError(str(exc).split(";")[0], "rebuild the engine with the bundle's build_engine.sh") from None
    if manifest is None:
        return [f"no {MANIFEST_FILE} beside {engine_path.name}: cannot check it was built on this machine"]
    names = {manifest.get("engine", engine_path.name), manifest.get("source_onnx")}
    here = {
        **facts,
        "sha256": {n: sha256_file(engine_path.parent / n) for n in names if n and (engine_path.parent / n).is_file()},
    }
    refusals, warnings = engine_problems(manifest, here)
    if refusals:
        line = refusal_line(manifest, here, refusals)
        message, _, hint = line.partition(" — ")
        raise ExportError(message, hint + " (or run validate with --tensorrt off)")
    return warnings


# --- running ------------------------------------------------------------------------------------------------------


class TensorRTRunner:
    """Runs a serialised engine with the name-based tensor API (TensorRT 8.5+); buffers are torch CUDA tensors
    (peftx has torch; the bundle's infer.py does the same with cuda-python instead)."""

    def __init__(self, engine_path: str | Path, *, name: str = "tensorrt"):
        self.engine_path, self.name = Path(engine_path), name
        self._engine = self._context = None

    def __enter__(self) -> TensorRTRunner:
        trt = _import_tensorrt()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self._engine is None:
            raise ExportError(
                f"TensorRT cannot load {self.engine_path.name}",
                "engines only load on the GPU and TensorRT version that built them; rebuild it",
            )
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
            raise UsageError(
                f"batch {batch.shape[0]} is outside the engine's profile {low}..{high}",
                "rebuild the engine with a wider batch profile",
            )
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

    pairs = (
        ("float32", torch.float32),
        ("float16", torch.float16),
        ("int32", torch.int32),
        ("int8", torch.int8),
        ("bool", torch.bool),
        ("uint8", torch.uint8),
        ("bfloat16", torch.bfloat16),
        ("int64", torch.int64),
    )
    table = {getattr(trt, name): torch_dtype for name, torch_dtype in pairs if hasattr(trt, name)}  # by version
    return table[trt_dtype]
