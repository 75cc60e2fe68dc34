"""The bundle's on-disk format: file names, metadata.json (what it records, reading it back, sha256 verification)
and the ONNX metadata_props."""

from __future__ import annotations

import datetime as dt
import json
import platform
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnxruntime
import PIL
import timm
import torch

import peftx
from peftx.errors import ExportError
from peftx.fsutil import sha256_file
from peftx.image_decoding import DECODE_DESCRIPTION, DECODE_RULE
from peftx.preprocess import contract

from .. import deepstream as deepstream_mod
from .. import onnx_io
from ..accuracy import AccuracyReport
from ..onnx_export import INPUT_NAME, OUTPUT_NAME, op_histogram, param_count, read_metadata
from ..parity import (
    ParityReport,
)
from ..targets import TargetProfile
from ..tensorrt import (
    MANIFEST_FILE,
    resolve_target_here,
)

if TYPE_CHECKING:
    from .request import BundleReport, BundleRequest


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
DECODING_FILE = "image_decoding.py"  # infer.py's image decoding: peftx/image_decoding.py, shipped as it is


METADATA_FILE, PARITY_FILE, READINESS_FILE = "metadata.json", "parity.json", "trt_readiness.json"


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


def external_data(bundle_dir: Path, names: Any) -> dict[str, list[str]]:
    """{graph file: [its external-data files]} for the ONNX files among ``names`` that have any."""
    found = {name: onnx_io.data_files(bundle_dir / name) for name in names if str(name).endswith(".onnx")}
    return {name: [p.name for p in paths] for name, paths in found.items() if paths}


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


def _metadata(report: BundleReport, onnx_path: Path, opt: BundleRequest) -> dict[str, Any]:
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
        # past 2 GB an ONNX graph keeps its weights in a file beside it: infer.py and build_engine.sh check both
        "external_data": external_data(report.out_dir, report.sha256),
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


def _versions() -> dict[str, str]:
    # numpy and Pillow made the reference set's tensors: a device that preprocesses differently is told which ones
    versions = {
        "python": platform.python_version(),
        "peftx": peftx.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "timm": timm.__version__,
    }
    return versions


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
