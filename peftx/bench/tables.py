"""Results as (title, columns, rows) triples of plain strings, for rich or any other renderer.

Every table fits 100 terminal columns with short cells: free text (backend status, notes) sits in two-column tables
where it can wrap at spaces, what does not fit (p99, absolute peak memory, per-method merge times) is in the title
or only in bench.json. Verdicts resting on fewer than :data:`~.config.VERDICT_MIN_ROUNDS` timed rounds (``--quick``)
read "indicative (...)", never a bare met / NOT met.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .config import VERDICT_MIN_ROUNDS

Table = tuple[str, list[str], list[list[str]]]


def _fmt(v: Any, spec: str = ".1f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return format(v, spec)


def _mib(b: float | None) -> str:
    return "—" if b is None else f"{b / 2**20:,.0f}"


def _met(v: bool | None, rounds: int | None = None) -> str:
    """The verdict of a target; from fewer than VERDICT_MIN_ROUNDS timed rounds it is only indicative."""
    if v is None:
        return "—"
    if rounds is not None and rounds < VERDICT_MIN_ROUNDS:
        return f"indicative ({'met' if v else 'not met'})"
    return "met" if v else "NOT met"


def _inference_rounds(model: Mapping[str, Any], batch: Any) -> int | None:
    timing = (model.get("timing") or {}).get(str(batch))
    return timing.get("rounds") if timing else None


def result_tables(results: Mapping[str, Any]) -> list[Table]:
    """(title, columns, rows) for every table of the report; plain strings, for rich or text output."""
    tables: list[Table] = [_peak(results)]
    probe = _contention(results)
    if probe:
        tables.append(probe)
    for model in results.get("inference", []):
        tables += _inference(model)
    for model in results.get("training", []):
        tables += _training(model)
    for model in results.get("profile", []):
        for method, prof in model["profiles"].items():
            rows = [
                [
                    o["op"],
                    _fmt(o["self_ms_per_step"], ".1f"),
                    _fmt(100 * o["share"], ".1f"),
                    _fmt(o["calls_per_step"], ".0f"),
                ]
                for o in prof["top_ops"]
            ]
            tables.append(
                (
                    f"Profile — {model['model']} {method}, {'x'.join(map(str, model['img_size']))} px batch "
                    f"{model['batch']}: {prof['wall_ms_per_step']:.0f} ms/step under the profiler",
                    ["op", "self ms/step", "% self CPU", "calls/step"],
                    rows,
                )
            )
    for model in results.get("export", []):
        tables.append(_export(model))
    targets = results.get("targets", [])
    if targets:
        rows = [[t["target"], t["where"], t["value"], _met(t["met"], t.get("rounds"))] for t in targets]
        title = "Targets"
        if any(t.get("indicative") for t in targets):
            title += (
                f" (indicative: the timing behind it has fewer than {VERDICT_MIN_ROUNDS} rounds, as with "
                "--quick; run without --quick for a verdict)"
            )
        tables.append((title, ["target", "where", "measured", "verdict"], rows))
    return tables


def _peak(results: Mapping[str, Any]) -> Table:
    env, peak = results.get("environment", {}), results.get("peak", {})
    rows = [
        [p["backend"], f"{p['n']}^3 {p['dtype']}", _fmt(p["gflops"], ".0f"), _fmt(p["median_gflops"], ".0f"), when]
        for when in ("start", "end")
        for p in results.get(f"peak_{when}", [])
    ]
    return (
        f"Matmul peak — {env.get('cpu', '?')}, {env.get('thread_settings', '')}; peak used = "
        f"{_fmt(peak.get('gflops'), '.0f')} GFLOP/s ({peak.get('basis', '')})",
        ["backend", "size", "best GFLOP/s", "median GFLOP/s", "when"],
        rows,
    )


def _contention(results: Mapping[str, Any]) -> Table | None:
    rows = []
    for when in ("start", "end"):
        c = results.get(f"contention_{when}")
        if c:
            load = (
                ", ".join(f"{x:.1f}" for x in c["loadavg"])
                if isinstance(c.get("loadavg"), list)
                else str(c.get("loadavg"))
            )
            rows.append(
                [when, c["op"], f"x{c['ratio']:.1f} vs 1 thread", "CONTENDED" if c["contended"] else "ok", load]
            )
    return (
        (
            "Contention probe (another process on the cores makes the threaded op slower than one thread)",
            ["when", "op", "threaded", "verdict", "load average"],
            rows,
        )
        if rows
        else None
    )


def _inference(model: Mapping[str, Any]) -> list[Table]:
    rows = []
    for r in model["rows"]:
        name = r["variant"] + ("" if r["valid"] else " (INVALID: parity)")
        rows.append(
            [
                str(r["batch"]),
                r["backend"],
                name,
                _fmt(r["p50_ms"]),
                _fmt(r["p90_ms"]),
                str(r["n"]),
                _fmt(r["images_per_s"]),
                _fmt(r["gflops"], ".0f"),
                _fmt(r.get("pct_peak")),
            ]
        )
    out: list[Table] = [
        (
            f"Inference — {model['label']} {'x'.join(map(str, model['input_size'][1:]))} px, "
            f"{model['gflop_per_image']:.2f} GFLOP/img (counted); merged = {model['merged_method']}; p99 in bench.json",
            ["batch", "backend", "variant", "p50 ms", "p90 ms", "rounds", "img/s", "GFLOP/s", "% peak"],
            rows,
        )
    ]
    rows = [
        [
            str(r["batch"]),
            r["ratio"],
            r["backend"],
            _fmt(r["value"], ".3f"),
            _fmt(r["min_ratio"], ".3f"),
            "—" if r["target"] is None else f"<= {r['target']}",
            _met(r["met"], _inference_rounds(model, r["batch"])),
        ]
        for r in model["ratios"]
    ]
    out.append(
        (
            f"Ratios — {model['model']} (median of per-round ratios; 'of mins' = best case / best case)",
            ["batch", "ratio", "backend", "median", "of mins", "target", "verdict"],
            rows,
        )
    )
    rows = [
        [
            k,
            "pass" if v["passed"] else "FAIL",
            f"{v['max_abs']:.2e}",
            f"{v['bound']:.1e}",
            v["tolerance"],
            v["reference"],
        ]
        for k, v in model["parity"].items()
    ]
    out.append(
        (
            f"Parity — {model['model']}: each backend against its PyTorch reference on the same inputs",
            ["backend:variant", "verdict", "max |Δ|", "bound", "tolerance", "reference"],
            rows,
        )
    )
    status = [
        [
            f"ort-optimizer ({k})",
            ("ok: " if v["ok"] else "failed: ")
            + (", ".join(f"{op} {n}" for op, n in v.get("fused_ops", {}).items()) or v.get("reason", "no fusion")),
        ]
        for k, v in model.get("ort_optimizer", {}).items()
    ]
    status.append(["tensorrt", str(model.get("tensorrt", ""))])
    status += [
        [
            f"timing b{b}",
            f"{t['rounds']} rounds kept, {t['discarded_rounds']} discarded (contention)"
            + (" — CONTENDED: too few clean rounds" if t["contended"] else ""),
        ]
        for b, t in model.get("timing", {}).items()
    ]
    status += [["note", n] for n in model.get("notes", [])]
    out.append((f"Backend status — {model['model']}", ["what", "status"], status))
    return out


def _training(model: Mapping[str, Any]) -> list[Table]:
    rows = []
    for r in model["rows"]:
        d = r.get("delta_cost") or {}
        rows.append(
            [
                r["method"],
                f"{r['trainable_params']:,}",
                _fmt(r["step_ms_p50"], ".0f"),
                _fmt(r["step_ms_p90"], ".0f"),
                _fmt(r["images_per_s"]),
                _fmt(r["step_gflop_per_image"], ".2f"),
                _mib(r["peak_delta_bytes"]),
                _mib(r["optimizer_state_bytes"]),
                _fmt(d.get("forward_backward_ms"), ".1f"),
            ]
        )
    t = model.get("timing", {})
    rounds = t.get("rounds") if t else None
    kept = (
        (
            f"{t.get('rounds')} rounds kept, {t.get('discarded_rounds')} discarded"
            + (", CONTENDED" if t.get("contended") else "")
        )
        if t
        else ""
    )
    out: list[Table] = [
        (
            f"Training — {model['label']}, {'x'.join(map(str, model['img_size']))} px, batch {model['batch']} "
            f"({model['settings']}; memory: {model['rows'][0]['memory_kind']}; {kept}). GFLOP/img: forward + backward; "
            "Δ-build: forward + backward of the adapter's weight update alone; absolute peaks in bench.json",
            ["method", "trainable", "step ms", "p90", "img/s", "GFLOP/img", "peak Δ MiB", "AdamW MiB", "Δ-build ms"],
            rows,
        )
    ]
    rows = [
        [
            r["method"],
            _fmt(r["step_time_vs_full"], ".3f"),
            _fmt(r["step_time_vs_full_of_mins"], ".3f"),
            _fmt(r["peak_memory_vs_full"], ".3f"),
            _met(r["step_time_met"], rounds),
            _met(r["memory_met"]),
            _fmt(r.get("step_time_vs_frozen"), ".3f"),
        ]
        for r in model["ratios"]
    ]
    out.append(
        (
            f"Training ratios vs full fine-tuning — {model['model']} (step time: median of per-round "
            "ratios, and best / best; frozen = backbone-only reference)",
            ["method", "step time", "of mins", "peak memory", "step target", "memory target", "step / frozen"],
            rows,
        )
    )
    return out


def _export(model: Mapping[str, Any]) -> Table:
    s = model["steps"]
    row = [
        model["model"],
        model["method"],
        _fmt(s["merge"], ".2f"),
        _fmt(s["onnx_export"], ".1f"),
        _fmt(s["simplify"], ".1f"),
        _fmt(s["parity"], ".1f"),
        _fmt(model["total_s"], ".1f"),
        "pass" if model["parity"]["passed"] else "FAIL",
        f"{model['parity']['max_abs']:.1e}",
        _fmt(model["onnx_mb"], ".0f"),
    ]
    per_method = ", ".join(f"{k} {v:.2f} s" for k, v in model["merge_s"].items())
    title = f"Export — {model['label']}, seconds per step; merge per method: {per_method}"
    if "bundle" in model:
        title += f"; whole bundle {model['bundle']['wall_s']:.1f} s ({model['bundle']['status']})"
    return (
        title,
        ["model", "method", "merge", "export", "onnxslim", "parity", "total", "check", "max |Δ|", "ONNX MiB"],
        [row],
    )
