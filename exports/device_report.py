"""A device's ``device_report.json`` (written by the bundle's ``infer.py --check --bench``) beside the host's
validation of the same bundle: per precision, the host's parity (parity.json) and task accuracy (metadata.json)
next to the device's check, accuracy on the reference images and latency.

A report belongs to one bundle: the sha256 values it carries (those metadata.json recorded, as the device read
them) must be the host bundle's, or the report is refused — figures of another export would be shown as this one's.
The device also hashed its own copies: a file it ran that differs from the bundle is named in ``warnings``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftx.errors import UsageError

from .bundle import METADATA_FILE, PARITY_FILE, read_bundle

REPORT_FILE = "device_report.json"
REPORT_FORMAT = "peftx-device-report"  # device_bench.py's REPORT_FORMAT
REPORT_VERSIONS = (1,)


@dataclass
class DeviceComparison:
    bundle: Path
    device: dict[str, Any]
    bench: dict[str, Any]
    rows: list[dict[str, Any]]
    recommendation: dict[str, Any] | None
    no_recommendation: str | None
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "bundle": str(self.bundle),
            "device": self.device,
            "bench": self.bench,
            "rows": self.rows,
            "recommendation": self.recommendation,
            "no_recommendation": self.no_recommendation,
            "warnings": self.warnings,
        }


def load_report(path: str | Path) -> dict[str, Any]:
    """device_report.json, after checking it is one (UsageError naming what is wrong otherwise)."""
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(
            f"{path} does not exist", "run `python3 infer.py --check --bench` in the bundle on the device first"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path} is unreadable ({exc})", "copy device_report.json from the device again") from None
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        raise UsageError(
            f"{path} is not a {REPORT_FORMAT}", f"pass the {REPORT_FILE} that infer.py --bench wrote on the device"
        )
    if report.get("format_version") not in REPORT_VERSIONS:
        raise UsageError(
            f"{path} is {REPORT_FORMAT} version {report.get('format_version')}, this peftx reads "
            f"{', '.join(map(str, REPORT_VERSIONS))}",
            "use the peftx that wrote the bundle",
        )
    return report


def same_bundle(report: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    """Why ``report`` is not of the bundle ``meta`` describes (empty: it is): every file either side records must
    carry the same sha256 on both."""
    theirs = (report.get("bundle") or {}).get("sha256_recorded") or {}
    ours = meta.get("sha256") or {}
    if not theirs:
        return ["it records no sha256 values"]
    problems = []
    for name in sorted(set(theirs) | set(ours), key=lambda n: (not n.endswith(".onnx"), n)):  # models first
        if name not in theirs:
            problems.append(f"it lacks {name}")
        elif name not in ours:
            problems.append(f"this bundle lacks {name}")
        elif theirs[name] != ours[name]:
            problems.append(f"{name} sha256 {theirs[name][:12]}… there, {ours[name][:12]}… here")
    return problems


def compare(report_path: str | Path, bundle_dir: str | Path | None = None) -> DeviceComparison:
    """The device's figures beside the host's validation of the same bundle (``bundle_dir``: default, the directory
    holding the report). UsageError when the report is of another bundle."""
    report_path = Path(report_path)
    report = load_report(report_path)
    bundle = Path(bundle_dir) if bundle_dir is not None else report_path.parent
    if not (bundle / METADATA_FILE).is_file():
        raise UsageError(
            f"{bundle} holds no {METADATA_FILE}", "pass --bundle DIR: the bundle directory the report was made from"
        )
    meta = read_bundle(bundle)
    problems = same_bundle(report, meta)
    if problems:
        raise UsageError(
            f"{report_path} is a report of another bundle than {bundle} ({'; '.join(problems[:2])})",
            "pass --bundle DIR of the bundle the device ran, or run infer.py --check --bench with this one",
        )
    warnings = []
    device_bundle = report.get("bundle") or {}
    for name in device_bundle.get("modified") or []:
        warnings.append(f"the device's {name} differs from the bundle (sha256): its figures are of a modified file")
    for name in device_bundle.get("missing") or []:
        warnings.append(f"the device's copy of the bundle lacks {name}")
    if not report.get("checked"):
        warnings.append("the device ran --bench without --check: no verdicts and no recommendation")
    try:
        parity = json.loads((bundle / PARITY_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        parity = {}
        warnings.append(f"{PARITY_FILE} is missing or unreadable: no host parity figures")
    return DeviceComparison(
        bundle,
        report.get("device") or {},
        report.get("bench") or {},
        _rows(report, meta, parity),
        report.get("recommendation"),
        report.get("no_recommendation"),
        warnings,
    )


def _host(meta: dict[str, Any], parity: dict[str, Any], precision: str) -> dict[str, Any]:
    """The host's validation of the ONNX file of ``precision``: parity against the unmerged model and task accuracy."""
    name = f"onnxruntime {precision}"
    result = next((r for r in parity.get("results") or [] if r.get("candidate") == name), None)
    accuracy = ((meta.get("accuracy") or {}).get("artifacts") or {}).get(name)
    host: dict[str, Any] = {"candidate": name}
    if result:
        overall = result.get("overall") or {}
        host.update(
            parity_passed=result.get("passed"),
            parity_required=result.get("required"),
            max_abs=overall.get("max_abs"),
            top1_agreement=overall.get("top1_agreement"),
        )
    if accuracy:
        host.update(
            accuracy=accuracy.get("accuracy"),
            accuracy_drop=accuracy.get("drop"),
            accuracy_passed=accuracy.get("passed"),
            accuracy_images=(meta.get("accuracy") or {}).get("images"),
        )
    return host


def _rows(report: dict[str, Any], meta: dict[str, Any], parity: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per artifact the device reported (its host counterpart: the ONNX file of the same precision), then
    one per precision the host validated that the device did not run."""
    rows = []
    batches = (report.get("bench") or {}).get("batches") or []
    seen = set()
    recommended = (report.get("recommendation") or {}).get("artifact")
    for art in report.get("artifacts") or []:
        precision = art.get("precision")
        seen.add(precision)
        check = art.get("check") or {}
        latency = {}
        for b in batches:
            entry = (art.get("timings") or {}).get(str(b)) or {}
            latency[str(b)] = {
                figure: {k: entry[figure][k] for k in ("median_ms", "p10_ms", "p90_ms", "p99_ms", "throughput_ips")}
                for figure in ("compute", "end_to_end")
                if isinstance(entry.get(figure), dict) and "median_ms" in entry[figure]
            }
        rows.append(
            {
                "precision": precision,
                "device_artifact": art.get("name"),
                "runtime": art.get("runtime"),
                "recommended": art.get("name") == recommended,
                "host": _host(meta, parity, precision) if precision in ("fp32", "fp16", "int8") else {},
                "device_check": check.get("verdict", "not run"),
                "device_max_abs": check.get("max_abs"),
                "device_accuracy": check.get("accuracy"),
                "device_accuracy_images": check.get("labelled_images"),
                "skipped": art.get("skipped"),
                "latency_ms": latency,
            }
        )
    for precision in ("fp32", "fp16", "int8"):
        if precision not in seen and any(
            r.get("candidate") == f"onnxruntime {precision}" for r in parity.get("results") or []
        ):
            rows.append(
                {
                    "precision": precision,
                    "device_artifact": None,
                    "runtime": None,
                    "recommended": False,
                    "host": _host(meta, parity, precision),
                    "device_check": "not run on the device",
                    "device_max_abs": None,
                    "device_accuracy": None,
                    "device_accuracy_images": None,
                    "skipped": None,
                    "latency_ms": {},
                }
            )
    return rows


def device_summary(device: dict[str, Any]) -> dict[str, Any]:
    """What decides the device's figures, in a few lines."""
    cpu = device.get("cpu") or {}
    flags = cpu.get("flags")
    gpu = device.get("gpu") or {}
    freq = gpu.get("frequency") or {}
    jetson = device.get("jetson") or {}
    ort = device.get("onnxruntime") or {}
    out = {
        "GPU": f"{gpu.get('name', 'unknown')} (compute capability {gpu.get('compute_capability', 'unknown')})",
        "GPU clock": (
            f"{freq.get('cur_freq')} {freq.get('unit', '')} (max {freq.get('max_freq', '?')}, {freq.get('source')})"
            if freq.get("source") not in (None, "unknown")
            else "unknown"
        ),
        "TensorRT": device.get("tensorrt") or "not installed",
        "ONNX Runtime": f"{ort.get('version')} ({', '.join(ort.get('providers') or [])})" if ort else "not installed",
        "CPU": f"{cpu.get('model')} x{cpu.get('cores')}"
        + (
            f" ({', '.join(k for k, v in flags.items() if v) or 'none of the tracked flags'})"
            if isinstance(flags, dict)
            else ""
        ),
    }
    if jetson:
        clocks = jetson.get("jetson_clocks") or {}
        out["Jetson"] = f"{jetson.get('model')} (L4T {jetson.get('l4t')}), power mode {jetson.get('power_mode')}"
        out["jetson_clocks"] = "read" if clocks.get("available") else f"unknown ({clocks.get('error')})"
    return out
