"""Results as (title, columns, rows) triples of plain strings, for rich or any other renderer."""

from __future__ import annotations

import math
from typing import Any, Mapping


def _fmt(v: Any, spec: str = ".1f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return format(v, spec)


def _mib(b: float | None) -> str:
    return "—" if b is None else f"{b / 2 ** 20:,.0f}"


def _met(v: bool | None) -> str:
    return "—" if v is None else ("met" if v else "NOT met")


def result_tables(results: Mapping[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, columns, rows) for every table of the report; plain strings, for rich or text output."""
    tables = []
    env = results.get("environment", {})
    peak = results.get("peak", {})
    rows = [[p["backend"], f"{p['n']}^3 {p['dtype']}", _fmt(p["gflops"], ".0f"), _fmt(p["median_gflops"], ".0f"),
             when] for when in ("start", "end") for p in results.get(f"peak_{when}", [])]
    for when in ("start", "end"):
        c = results.get(f"contention_{when}")
        if c:
            rows.append([f"contention probe: {c['op']}", f"x{c['ratio']:.1f} vs 1 thread",
                         "CONTENDED" if c["contended"] else "ok", f"loadavg {c['loadavg']}", when])
    tables.append((f"Matmul peak — {env.get('cpu', '?')}, {env.get('thread_settings', '')}; "
                   f"peak used = {_fmt(peak.get('gflops'), '.0f')} GFLOP/s ({peak.get('basis', '')})",
                   ["backend", "size", "best GFLOP/s", "median GFLOP/s", "when"], rows))
    for model in results.get("inference", []):
        rows = []
        for r in model["rows"]:
            name = r["variant"] + ("" if r["valid"] else " (INVALID: parity)")
            rows.append([str(r["batch"]), r["backend"], name, _fmt(r["p50_ms"]), _fmt(r["p90_ms"]), _fmt(r["p99_ms"]),
                         str(r["n"]), _fmt(r["images_per_s"]), _fmt(r["gflops"], ".0f"), _fmt(r.get("pct_peak"))])
        tables.append((f"Inference — {model['label']} {'x'.join(map(str, model['input_size'][1:]))} px, "
                       f"{model['gflop_per_image']:.2f} GFLOP/img (counted); merged = {model['merged_method']}",
                       ["batch", "backend", "variant", "p50 ms", "p90 ms", "p99 ms", "n", "img/s", "GFLOP/s",
                        "% peak"], rows))
        rows = [[str(r["batch"]), r["ratio"], r["backend"], _fmt(r["value"], ".3f"), _fmt(r["min_ratio"], ".3f"),
                 "—" if r["target"] is None else f"<= {r['target']}", _met(r["met"])] for r in model["ratios"]]
        tables.append((f"Ratios — {model['model']} (median of per-round ratios; 'of mins' = best case / best case)",
                       ["batch", "ratio", "backend", "median", "of mins", "target", "verdict"], rows))
        rows = [[k, "pass" if v["passed"] else "FAIL", f"{v['max_abs']:.2e}", f"{v['bound']:.1e} ({v['tolerance']})",
                 v["reference"]] for k, v in model["parity"].items()]
        rows += [[f"ort-optimizer:{k}", "ok" if v["ok"] else "failed",
                  ", ".join(f"{op} {n}" for op, n in v.get("fused_ops", {}).items()) or v.get("reason", "no fusion"),
                  "", ""] for k, v in model.get("ort_optimizer", {}).items()]
        rows += [["tensorrt", model.get("tensorrt", ""), "", "", ""]]
        rows += [[f"timing b{b}", f"{t['rounds']} rounds kept, {t['discarded_rounds']} discarded (contention)"
                  + (" — CONTENDED: too few clean rounds" if t["contended"] else ""), "", "", ""]
                 for b, t in model.get("timing", {}).items()]
        rows += [["note", n, "", "", ""] for n in model.get("notes", [])]
        tables.append((f"Parity / backend status — {model['model']}", ["what", "verdict", "max |Δ|", "bound",
                                                                       "reference"], rows))
    for model in results.get("training", []):
        rows = []
        for r in model["rows"]:
            d = r.get("delta_cost") or {}
            rows.append([r["method"], f"{r['trainable_params']:,}", _fmt(r["step_ms_p50"], ".0f"),
                         _fmt(r["step_ms_p90"], ".0f"), _fmt(r["images_per_s"]), _fmt(r["step_gflop_per_image"], ".2f"),
                         _mib(r["peak_delta_bytes"]), _mib(r["peak_bytes"]), _mib(r["optimizer_state_bytes"]),
                         _fmt(d.get("forward_backward_ms"), ".1f")])
        t = model.get("timing", {})
        rounds = (f"{t.get('rounds')} rounds kept, {t.get('discarded_rounds')} discarded"
                  + (", CONTENDED" if t.get("contended") else "")) if t else ""
        tables.append((f"Training — {model['label']}, {'x'.join(map(str, model['img_size']))} px, batch "
                       f"{model['batch']} ({model['settings']}; memory: {model['rows'][0]['memory_kind']}; {rounds})",
                       ["method", "trainable", "step ms p50", "p90", "img/s", "fwd+bwd GFLOP/img",
                        "peak Δ MiB", "peak MiB", "AdamW state MiB", "delta build f+b ms"], rows))
        rows = [[r["method"], _fmt(r["step_time_vs_full"], ".3f"), _fmt(r["step_time_vs_full_of_mins"], ".3f"),
                 _fmt(r["peak_memory_vs_full"], ".3f"), _met(r["step_time_met"]), _met(r["memory_met"]),
                 _fmt(r.get("step_time_vs_frozen"), ".3f")]
                for r in model["ratios"]]
        tables.append((f"Training ratios vs full fine-tuning — {model['model']} (step time: median of per-round "
                       "ratios, and best / best; frozen = backbone-only reference)",
                       ["method", "step time", "of mins", "peak memory", "step target", "memory target",
                        "step / frozen"], rows))
    for model in results.get("profile", []):
        for method, prof in model["profiles"].items():
            rows = [[o["op"], _fmt(o["self_ms_per_step"], ".1f"), _fmt(100 * o["share"], ".1f"),
                     _fmt(o["calls_per_step"], ".0f")] for o in prof["top_ops"]]
            tables.append((f"Profile — {model['model']} {method}, {'x'.join(map(str, model['img_size']))} px batch "
                           f"{model['batch']}: {prof['wall_ms_per_step']:.0f} ms/step under the profiler",
                           ["op", "self ms/step", "% self CPU", "calls/step"], rows))
    for model in results.get("export", []):
        s = model["steps"]
        rows = [[model["model"], model["method"], _fmt(s["merge"], ".2f"), _fmt(s["onnx_export"], ".1f"),
                 _fmt(s["simplify"], ".1f"), _fmt(s["parity"], ".1f"), _fmt(model["total_s"], ".1f"),
                 "pass" if model["parity"]["passed"] else "FAIL", f"{model['parity']['max_abs']:.1e}",
                 _fmt(model["onnx_mb"], ".0f"),
                 ", ".join(f"{k} {v:.2f}" for k, v in model["merge_s"].items())]]
        if "bundle" in model:
            rows[0].append(f"{model['bundle']['wall_s']:.1f} ({model['bundle']['status']})")
        cols = ["model", "method", "merge s", "export s", "simplify s", "parity s", "total s", "parity", "max |Δ|",
                "ONNX MiB", "merge s per method"] + (["bundle s"] if "bundle" in model else [])
        tables.append((f"Export — {model['label']}", cols, rows))
    rows = [[t["target"], t["where"], t["value"], _met(t["met"])] for t in results.get("targets", [])]
    if rows:
        tables.append(("Targets", ["target", "where", "measured", "verdict"], rows))
    return tables
