"""What this machine has for deployment (``peftx doctor``): versions, GPU, Jetson facts, and the target ``auto`` picks.

Every fact is looked up, never assumed: a package that is not installed is reported as missing (None), and nothing
here raises because something is absent. The Jetson facts come from the same functions the bundle's infer.py uses
(/etc/nv_tegra_release, /proc/device-tree/model).
"""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path
from typing import Any

import peftx

from .targets import auto_target, jetpack_for_l4t
from .tensorrt import probe


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _torch_facts() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"version": None, "cuda_build": None, "cuda_available": False, "gpu": None}
    gpu = None
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        gpu = {
            "name": torch.cuda.get_device_name(0),
            "compute_capability": f"{major}.{minor}",
            "count": torch.cuda.device_count(),
        }
    return {
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": gpu,
    }


def _onnxruntime_facts() -> dict[str, Any]:
    try:
        import onnxruntime
    except ImportError:
        return {"version": None, "providers": []}
    return {"version": onnxruntime.__version__, "providers": list(onnxruntime.get_available_providers())}


def doctor_report(root: Path = Path("/")) -> dict[str, Any]:
    """Versions of python, peftx, torch (+ CUDA), ONNX, ONNX Runtime (+ providers), TensorRT, Polygraphy,
    cuda-python, onnxslim; the GPU; the Jetson model, L4T and JetPack when on one; the target ``--target auto``
    would pick here and why."""
    from .templates.infer import jetson_facts

    found = probe()
    jetson = jetson_facts(root)
    if jetson is not None:
        jetson = {**jetson, "jetpack": jetpack_for_l4t(jetson["l4t"]) if jetson.get("l4t") else None}
    auto, why = auto_target(found.version, (jetson or {}).get("l4t"))
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "peftx": peftx.__version__,
        "torch": _torch_facts(),
        "onnx": _dist_version("onnx"),
        "onnxruntime": _onnxruntime_facts(),
        "tensorrt": {"version": found.version, "usable": found.reason is None, "reason": found.reason},
        "polygraphy": _dist_version("polygraphy"),
        "cuda_python": _dist_version("cuda-python", "cuda-bindings"),
        "onnxslim": _dist_version("onnxslim"),
        "jetson": jetson,
        "auto_target": {"name": auto.name, "tensorrt_min": auto.tensorrt_min, "why": why},
    }
