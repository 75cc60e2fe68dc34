"""Deployment targets: the TensorRT releases devices run, and what each one needs from an export.

A :class:`TargetProfile` is the one place that says, for one TensorRT release line, everything that depends on it:
the op list of that release's own onnx-tensorrt ``docs/operators.md`` (``data/onnx_tensorrt_ops_*.json``, each with
its source, ref and commit), the opset range its parser takes and the opset peftx exports at, the dtype rules, how
LayerNorm is exported, how an FP16 engine is built and what stays FP32 in it, the Python-builder and trtexec flags,
and what an INT8 (Q/DQ) graph needs. The exporter, the readiness check, ``build_engine.sh``, the Python builder and
``peftx targets`` all read it from here. JetPack names are aliases that resolve to a profile with the TensorRT
version that JetPack ships as the floor.

Reading a profile (for the INT8 / preprocessing work that plugs in later)::

    target = resolve_target("jetpack5")            # or "trt8.6", "auto", None (the default)
    target.export_opset, target.layernorm          # 16, "decomposed"
    target.int8.qdq, target.int8.zero_point_zero   # Q/DQ explicit quantization only, symmetric
    target.int8.trtexec_flags                      # ("--int8",) on 8.x/10.x, () on 11 (strongly typed)
    target.uint8_io                                # whether a uint8 network input (embedded preprocessing) parses
    target.operators()                             # the op matrix of that release
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

from peftx.errors import UsageError

LayerNormForm = Literal["fused", "decomposed"]
Fp16Strategy = Literal["builder_flag", "fp16_onnx"]


@dataclass(frozen=True)
class Int8Rules:
    """What an explicitly quantized (Q/DQ) ONNX graph needs to build on a target."""

    qdq: bool  # Q/DQ (explicit quantization) graphs parse; implicit calibration is not used by peftx at all
    zero_point_zero: bool  # Q/DQ zero points must be 0, i.e. symmetric (operators.md: QuantizeLinear/Dequantize)
    per_channel_min_opset: int  # DequantizeLinear's `axis` (per-channel weight scales) exists from opset 13
    trtexec_flags: tuple[str, ...]  # what enables INT8 kernels in trtexec (none on 11: every network strongly typed)
    builder_flags: tuple[str, ...]  # trt.BuilderFlag names for the Python builder
    unsupported_ops: tuple[str, ...]  # QOperator / dynamic quantization forms this release's parser rejects


@dataclass(frozen=True)
class TrtexecFlags:
    """trtexec's flags of one TensorRT release line, read from samples/common/sampleOptions.cpp of NVIDIA/TensorRT
    release/8.5, 8.6, 10.3, 10.13 and 11.1 (the version build_engine.sh finds decides which set it uses)."""

    fp16: tuple[str, ...]  # () on 11: --fp16 was removed (strongly typed)
    no_tf32: str  # all four lines spell it --noTF32
    timing_cache: str  # all four lines spell it --timingCacheFile=<file>
    precision_constraints: str | None  # --precisionConstraints=obey (8.x/10.x); removed in 11
    layer_precisions: str | None  # --layerPrecisions=name:fp32,...
    layer_output_types: str | None  # --layerOutputTypes=name:fp32,...
    explicit_batch: str | None  # a flag to pass for explicit batch; None: implied (see notes)


@dataclass(frozen=True)
class TargetProfile:
    name: str  # trt8.5 | trt8.6 | trt10 | trt11
    tensorrt: str  # the release line, as shown: "8.5", "8.6", "10.x", "11.x"
    tensorrt_min: str  # the oldest TensorRT a bundle for this target builds with (an alias may raise it)
    devices: str
    ops_file: str  # under exports/data/
    opset_min: int
    opset_max: int  # the parser's ceiling (from the op list's header)
    export_opset: int
    layernorm: LayerNormForm
    fp16: Fp16Strategy
    fp16_fp32_nodes: tuple[str, ...]  # node groups pinned to FP32 in FP16 builds and in model_fp16.onnx
    explicit_batch_flag: bool  # the Python builder must pass NetworkDefinitionCreationFlag.EXPLICIT_BATCH (8.x)
    cast_down: Mapping[str, str]  # dtype -> the dtype TensorRT casts it to (operators.md header notes)
    io_dtypes: tuple[str, ...]  # dtypes a network input/output may have
    int8: Int8Rules
    trtexec: TrtexecFlags
    notes: tuple[str, ...]
    requested: str = ""  # the alias that selected it (jetpack5, ...); "" when it was the profile's own name
    aliases: tuple[str, ...] = field(default=())

    @property
    def uint8_io(self) -> bool:
        """Whether a UINT8 network input parses (what an embedded-preprocessing uint8 graph would need)."""
        return "UINT8" in self.io_dtypes

    def operators(self) -> dict[str, Any]:
        """The op matrix of this target's release, with its source (loaded once)."""
        return _load_ops(self.ops_file)

    def to_json(self) -> dict[str, Any]:
        ops = self.operators()
        return {
            "name": self.name,
            "requested": self.requested or self.name,
            "aliases": list(self.aliases),
            "tensorrt": self.tensorrt,
            "tensorrt_min": self.tensorrt_min,
            "devices": self.devices,
            "opset_range": [self.opset_min, self.opset_max],
            "export_opset": self.export_opset,
            "layernorm": self.layernorm,
            "fp16": self.fp16,
            "fp16_fp32_nodes": list(self.fp16_fp32_nodes),
            "explicit_batch_flag": self.explicit_batch_flag,
            "cast_down": dict(self.cast_down),
            "io_dtypes": list(self.io_dtypes),
            "int8": dataclasses.asdict(self.int8),
            "trtexec": dataclasses.asdict(self.trtexec),
            "notes": list(self.notes),
            "op_list": {
                "source": ops["source"],
                "ref": ops["ref"],
                "commit": ops["commit"],
                "tensorrt_version": ops["tensorrt_version"],
                "remarks": ops.get("remarks", []),
            },
        }


@functools.cache
def _load_ops(ops_file: str) -> dict[str, Any]:
    """The transcribed op list with its errata applied (each corrected entry says so and keeps the evidence)."""
    data = json.loads(resources.files(__package__).joinpath("data").joinpath(ops_file).read_text(encoding="utf-8"))
    for op, fix in data.get("errata", {}).items():
        data["operators"][op] = {**data["operators"][op], "types": fix["types"], "erratum": fix["evidence"]}
    return data


_QUANT_OPS_8X = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear")
# Explicit (Q/DQ) INT8 as 8.5 to 10.x build it: symmetric, per-channel weights from opset 13, enabled by --int8 /
# BuilderFlag.INT8 (TensorRT 11 reads the same graph strongly typed, without the flags).
_INT8_WEAK_TYPED = Int8Rules(
    qdq=True,
    zero_point_zero=True,
    per_channel_min_opset=13,
    trtexec_flags=("--int8",),
    builder_flags=("INT8",),
    unsupported_ops=_QUANT_OPS_8X,
)
# What 8.x's docs say in their header: INT32/INT64/DOUBLE are "limited": INT64 is cast down to INT32, DOUBLE to FLOAT.
_CAST_8X = {"INT64": "INT32", "DOUBLE": "FP32"}
_CAST_10X = {"DOUBLE": "FP32"}  # 10.x: INT64 is a real type; DOUBLE is still cast down
_IO_8X = ("FP32", "FP16", "INT32", "INT8", "BOOL")  # UINT8 is not among 8.x's ONNX data types
_IO_10X = ("FP32", "FP16", "BF16", "INT32", "INT64", "UINT8", "BOOL")  # "UINT8 only as network input or output"

_WEAK_TYPED = TrtexecFlags(
    fp16=("--fp16",),
    no_tf32="--noTF32",
    timing_cache="--timingCacheFile",
    precision_constraints="--precisionConstraints=obey",
    layer_precisions="--layerPrecisions",
    layer_output_types="--layerOutputTypes",
    explicit_batch=None,
)
# 11 removed the flags that weak typing needs (--fp16, --precisionConstraints, per-layer precisions and output types)
_STRONG_TYPED = dataclasses.replace(
    _WEAK_TYPED, fp16=(), precision_constraints=None, layer_precisions=None, layer_output_types=None
)

# Each release line as what it changes from the one before it (trt8.5 in full).
_TRT8_5 = TargetProfile(
    name="trt8.5",
    tensorrt="8.5",
    tensorrt_min="8.5",
    devices="JetPack 5.1.x (L4T 35): Xavier NX/AGX, Orin on JetPack 5 — TensorRT 8.5.2",
    ops_file="onnx_tensorrt_ops_8.5-GA.json",
    opset_min=9,
    opset_max=17,
    export_opset=16,
    layernorm="decomposed",
    fp16="builder_flag",
    fp16_fp32_nodes=("layernorm",),
    explicit_batch_flag=True,
    cast_down=_CAST_8X,
    io_dtypes=_IO_8X,
    int8=_INT8_WEAK_TYPED,
    trtexec=_WEAK_TYPED,
    notes=(
        "no LayerNormalization in 8.5's parser: LayerNorm is exported at opset 16 as "
        "ReduceMean/Sub/Pow/Sqrt/Div, and FP16 builds keep that subgraph FP32 "
        "(--precisionConstraints=obey --layerPrecisions), the known ViT FP16 overflow otherwise",
        "trtexec 8.x always parses ONNX in explicit-batch mode; its --explicitBatch is a deprecated no-op, "
        "so build_engine.sh passes the shape flags only",
    ),
)
_TRT8_6 = dataclasses.replace(
    _TRT8_5,
    name="trt8.6",
    tensorrt="8.6",
    tensorrt_min="8.6",
    devices="JetPack 6.0 (L4T 36.2/36.3): Orin — TensorRT 8.6.2; desktops with TensorRT 8.6",
    ops_file="onnx_tensorrt_ops_8.6-GA.json",
    export_opset=17,
    layernorm="fused",
    fp16_fp32_nodes=(),
    notes=(
        "the default: its graph (opset 17, one LayerNormalization node per LayerNorm) is the one trt10 gets "
        "too, and it is checked against the oldest parser that takes it, so one bundle builds on JetPack 6.0, "
        "6.1/6.2, 7 and desktop TensorRT 8.6 to 11",
    ),
)
_TRT10 = dataclasses.replace(
    _TRT8_6,
    name="trt10",
    tensorrt="10.x",
    tensorrt_min="10.1",
    devices="JetPack 6.1/6.2 (L4T 36.4): Orin — TensorRT 10.3; JetPack 7.0/7.1 (Thor) — 10.13; desktops",
    ops_file="onnx_tensorrt_ops_10.1-GA.json",
    opset_max=20,
    explicit_batch_flag=False,
    cast_down=_CAST_10X,
    io_dtypes=_IO_10X,
    notes=(
        "op list: 10.1-GA, the newest 10.x branch that could be read (a lower bound for 10.3 and 10.13)",
        "ViT FP16/FP32 regressions were reported on 10.3/10.4: check the engine's parity on the device",
    ),
)
_TRT11 = dataclasses.replace(
    _TRT10,
    name="trt11",
    tensorrt="11.x",
    tensorrt_min="11.0",
    devices="desktops/servers with TensorRT 11; JetPack >= 7.2.2 (AGX Orin, Thor) — TensorRT 11.4",
    ops_file="onnx_tensorrt_ops_10.15-main.json",
    opset_max=24,
    fp16="fp16_onnx",
    int8=dataclasses.replace(_INT8_WEAK_TYPED, trtexec_flags=(), builder_flags=()),  # strongly typed
    trtexec=_STRONG_TYPED,
    notes=(
        "strongly typed only: no --fp16/--int8/--best/--precisionConstraints; an FP16 engine is built "
        "from model_fp16.onnx, where LayerNorm/Softmax/large-magnitude nodes are kept FP32",
        "op list: 10.15 (main) as a stand-in, no 11.x operators.md could be read",
    ),
)
_PROFILES = (_TRT8_5, _TRT8_6, _TRT10, _TRT11)

PROFILES: dict[str, TargetProfile] = {p.name: p for p in _PROFILES}
DEFAULT_TARGET = "trt8.6"
# JetPack name -> (profile, the TensorRT that JetPack ships: the floor a bundle for it is built with).
ALIASES: dict[str, tuple[str, str]] = {
    "jetpack5": ("trt8.5", "8.5"),
    "jetpack6.0": ("trt8.6", "8.6"),
    "jetpack6": ("trt10", "10.3"),
    "jetpack7": ("trt10", "10.13"),
}
AUTO = "auto"


def _with_aliases(profile: TargetProfile) -> TargetProfile:
    return dataclasses.replace(profile, aliases=tuple(a for a, (p, _) in ALIASES.items() if p == profile.name))


def all_targets() -> list[TargetProfile]:
    """Every profile, oldest TensorRT first (each knows its aliases)."""
    return [_with_aliases(p) for p in _PROFILES]


def target_names() -> list[str]:
    return [*PROFILES, *ALIASES, AUTO]


def resolve_target(name: str | None, *, tensorrt_version: str | None = None, l4t: str | None = None) -> TargetProfile:
    """The profile ``name`` selects: a profile name, a JetPack alias, ``auto`` or None (the default).

    ``auto`` uses ``tensorrt_version`` (the installed TensorRT), else ``l4t`` (a Jetson's Jetson Linux release),
    else the default; see :func:`auto_target`. An unknown name is a UsageError with the closest names.
    """
    if name is None or name == "":
        return _with_aliases(PROFILES[DEFAULT_TARGET])
    key = name.strip().lower()
    if key == AUTO:
        return auto_target(tensorrt_version, l4t)[0]
    if key in PROFILES:
        return _with_aliases(PROFILES[key])
    if key in ALIASES:
        profile, floor = ALIASES[key]
        return dataclasses.replace(
            _with_aliases(PROFILES[profile]),
            requested=key,
            tensorrt_min=max(PROFILES[profile].tensorrt_min, floor, key=version_tuple),
        )
    close = difflib.get_close_matches(key, target_names(), n=3, cutoff=0.5)
    guess = f" — did you mean: {', '.join(close)}?" if close else ""
    raise UsageError(
        f"unknown target {name!r}{guess}", f"choose one of {', '.join(target_names())} (`peftx targets` describes them)"
    )


def profile_for_tensorrt(version: str) -> TargetProfile | None:
    """The profile of the release line ``version`` belongs to (its flags, its parser), None below 8.5.

    TensorRT 9.x (datacenter releases between 8.6 and 10) builds like 8.6 and parses at least what 8.6 parses.
    """
    major, minor = version_tuple(version)[:2]
    if (major, minor) < (8, 5):
        return None
    if major == 8 and minor == 5:
        return PROFILES["trt8.5"]
    if major < 10:
        return PROFILES["trt8.6"]
    return PROFILES["trt10"] if major == 10 else PROFILES["trt11"]


def jetpack_for_l4t(l4t: str) -> str | None:
    """The JetPack alias of a Jetson Linux (L4T) release: R35 -> jetpack5, R36.2/36.3 -> jetpack6.0, R36.4+ ->
    jetpack6, R38+ -> jetpack7 (NVIDIA's JetPack/Jetson Linux release table); None for older releases."""
    major, minor = version_tuple(l4t)[:2]
    if major == 35:
        return "jetpack5"
    if major == 36:
        return "jetpack6.0" if minor < 4 else "jetpack6"
    return "jetpack7" if major >= 38 else None


def auto_target(tensorrt_version: str | None, l4t: str | None = None) -> tuple[TargetProfile, str]:
    """(profile, why) for ``--target auto``: the installed TensorRT's profile (its floor raised to that release line),
    else the Jetson's JetPack alias from its L4T release, else the default."""
    if tensorrt_version:
        profile = profile_for_tensorrt(tensorrt_version)
        if profile is not None:
            floor = max(profile.tensorrt_min, _line(tensorrt_version), key=version_tuple)
            return dataclasses.replace(
                _with_aliases(profile), tensorrt_min=floor
            ), f"the installed TensorRT {tensorrt_version}"
        return resolve_target(None), f"TensorRT {tensorrt_version} is older than every target (8.5): the default"
    if l4t and (alias := jetpack_for_l4t(l4t)):
        return resolve_target(alias), f"Jetson Linux {l4t} is {alias}, and no TensorRT Python package is installed"
    return resolve_target(None), "no TensorRT here: the default"


def _line(version: str) -> str:
    """'10.3.0.26' -> '10.3' (a floor is a release line, not a patch level)."""
    return ".".join(str(p) for p in version_tuple(version)[:2])


def version_tuple(version: str) -> tuple[int, ...]:
    """'10.13.2.6' -> (10, 13, 2, 6); trailing non-numeric parts ('10.3.0.post1') are ignored."""
    parts = []
    for piece in str(version).strip().lstrip("vV").split("."):
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    if not parts:
        raise UsageError(f"{version!r} is not a version number", "e.g. 8.5.2 or 10.3.0")
    return tuple(parts) + (0,) * max(0, 2 - len(parts))


def at_least(version: str, floor: str) -> bool:
    return version_tuple(version) >= version_tuple(floor)
