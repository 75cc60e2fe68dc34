"""`peftx targets` (the deployment targets) and `peftx doctor` / `peftx env` (what this machine has)."""

from __future__ import annotations

from ..errors import handle_errors
from ..options import Json
from ..output import console, key_values, print_json, table


@handle_errors
def targets(json_out: Json = False) -> None:
    """List the deployment targets: TensorRT version, opset range, LayerNorm, FP16 strategy, op list, notes."""
    from peftx.exports.targets import DEFAULT_TARGET, all_targets

    profiles = [{**p.to_json(), "default": p.name == DEFAULT_TARGET} for p in all_targets()]
    if json_out:
        print_json({"default": DEFAULT_TARGET, "targets": profiles})
        return
    rows = (
        [
            p["name"] + ("*" if p["default"] else ""),
            " ".join(p["aliases"]) or "-",
            f">= {p['tensorrt_min']}",
            f"{p['export_opset']} (<= {p['opset_range'][1]})",
            p["layernorm"],
            "FP16 ONNX" if p["fp16"] == "fp16_onnx" else "--fp16",
        ]
        for p in profiles
    )
    console.print(
        table(
            "deployment targets (--target T; * the default)",
            ["target", "aliases", "TensorRT", "opset", "LayerNorm", "FP16"],
            rows,
        )
    )
    for p in profiles:
        console.print(
            f"[bold]{p['name']}[/]: {p['devices']}; op list {p['op_list']['ref']} "
            f"(TensorRT {p['op_list']['tensorrt_version']})"
        )
        for note in p["notes"]:
            console.print(f"  · {note}")


@handle_errors
def doctor(json_out: Json = False) -> None:
    """Show what this machine has for deployment, and the target `--target auto` picks here."""
    from peftx.exports.environment import doctor_report

    report = doctor_report()
    if json_out:
        print_json(report)
        return
    torch, ort, trt, jetson = report["torch"], report["onnxruntime"], report["tensorrt"], report["jetson"]
    gpu, auto = torch["gpu"], report["auto_target"]
    console.print(
        key_values(
            "peftx doctor",
            {
                "python": f"{report['python']} ({report['machine']})",
                "peftx": report["peftx"],
                "torch": f"{torch['version']} (CUDA build {torch['cuda_build'] or 'none'}, "
                f"CUDA {'available' if torch['cuda_available'] else 'not available'})",
                "GPU": f"{gpu['name']} (compute capability {gpu['compute_capability']})" if gpu else "none visible",
                "onnx": report["onnx"] or "not installed",
                "onnxruntime": f"{ort['version']} ({', '.join(ort['providers'])})"
                if ort["version"]
                else "not installed",
                "tensorrt": (trt["version"] or "not installed") + ("" if trt["usable"] else f" — {trt['reason']}"),
                "polygraphy": report["polygraphy"] or "not installed",
                "cuda-python": report["cuda_python"] or "not installed",
                "onnxslim": report["onnxslim"] or "not installed",
                "Jetson": f"{jetson['model']} (L4T {jetson['l4t']}, {jetson['jetpack'] or 'unknown JetPack'})"
                if jetson
                else "not a Jetson",
                "--target auto": f"{auto['name']} (TensorRT >= {auto['tensorrt_min']}): {auto['why']}",
            },
        )
    )
