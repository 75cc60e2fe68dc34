"""`peftx report device_report.json [--bundle DIR]`: the device's figures beside the host's validation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import handle_errors
from ..options import Json
from ..output import console, key_values, percent, print_json, table


def _ms(latency: dict[str, Any], batch: str, figure: str) -> str:
    value = (latency.get(batch) or {}).get(figure)
    return f"{value['median_ms']:.2f} ({value['p10_ms']:.2f}-{value['p90_ms']:.2f})" if value else "—"


def _runtime(row: dict[str, Any]) -> str:
    """Short: 'ORT CPU', 'ORT CUDA', 'TensorRT engine.file', or '—' for a precision the device did not run."""
    name = row["device_artifact"] or ""
    if row["runtime"] == "tensorrt":
        return f"TensorRT {name.split()[1] if len(name.split()) > 1 else ''}".strip()
    if row["runtime"] == "onnxruntime":
        provider = name.rsplit("(onnxruntime", 1)[-1].strip(" )").replace("ExecutionProvider", "")
        return f"ORT {provider or '?'}"
    return "—"


def _max_abs(value: float | None) -> str:
    return "—" if value is None else f"{value:.2e}"


@handle_errors
def report(
    path: Annotated[Path, typer.Argument(help="device_report.json, as `infer.py --check --bench` wrote it.")],
    bundle: Annotated[
        Path | None,
        typer.Option("--bundle", help="The bundle the device ran.", show_default="the report's directory"),
    ] = None,
    json_out: Json = False,
) -> None:
    """Show a device's check and timings beside the host's validation of the same bundle, per precision."""
    from peftx.exports.device_report import compare, device_summary

    result = compare(path, bundle)
    if json_out:
        print_json(result.to_json())
        return
    console.print(key_values(f"device ({path})", device_summary(result.device)))
    checks, timings = [], []
    batches = [str(b) for b in result.bench.get("batches") or []]
    for row in result.rows:
        host = row["host"]
        parity = "—"
        if "max_abs" in host:
            verdict = "pass" if host.get("parity_passed") else "FAIL" if host.get("parity_required") else "advisory"
            parity = f"{_max_abs(host['max_abs'])} {verdict}"
        where = _runtime(row) + (" *" if row["recommended"] else "")
        checks.append(
            [
                row["precision"],
                where,
                parity,
                percent(host.get("accuracy"), 1),
                row["device_check"],
                _max_abs(row["device_max_abs"]),
                percent(row["device_accuracy"], 1),
            ]
        )
        if row["latency_ms"]:
            timings.append(
                [row["precision"], where]
                + [_ms(row["latency_ms"], b, f) for b in batches for f in ("compute", "end_to_end")]
            )
    console.print(
        table(
            f"host validation beside the device ({result.bundle})",
            ["precision", "device runs", "host max |Δ|", "host acc.", "device", "device max |Δ|", "device acc."],
            checks,
        )
    )
    if timings:
        columns = ["precision", "device runs"] + [f"b{b} {f}" for b in batches for f in ("compute", "end to end")]
        console.print(table("device latency, median (p10-p90) ms", columns, timings))
    rec = result.recommendation
    if rec:
        console.print(
            f"recommended (*): {rec['precision']} ({rec['runtime']}, {rec['file']}): {rec['median_ms']:.2f} ms "
            f"median compute at batch {rec['batch']}, the fastest artifact that passed its check on the device"
        )
        if rec.get("within_spread"):
            console.print(f"  not a clear win: its p10-p90 spread overlaps {', '.join(rec['within_spread'])}")
    else:
        console.print(f"recommended: none — {result.no_recommendation or 'the report holds no recommendation'}")
    console.print("host accuracy: the bundle's accuracy set; device accuracy: its labelled reference images")
    for warning in result.warnings:
        console.print(f"warning: {warning}")
