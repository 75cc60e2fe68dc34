"""Inference suite: plain vs unmerged vs merged, eager / ONNX Runtime / TensorRT, per batch size, interleaved."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...adapter import merge_and_unload
from ...backbones import data_config
from ...data import real_images
from ...exports.onnx_export import export_onnx
from ...exports.parity import make_input_sets
from ...exports.runners import OnnxRuntimeRunner, TorchRunner
from ...exports.tensorrt import TensorRTRunner, build_engine, unavailable_reason
from ...runtime import use_fused_attention
from ...tolerances import COMPILED_VS_EAGER, MERGE_FP32, ONNX_FP32, TENSORRT_FP32
from ..config import COMPILED_VARIANTS, DTYPES, MERGED_OVER_PLAIN_MAX, NUM_CLASSES, BenchConfig, ModelSpec, Progress
from ..flops import count_flops
from ..machine import device_sync
from ..ort import model_dims, optimize_for_ort, ort_providers, ort_session_options
from ..timing import contention_guard, latency_stats, min_ratio, paired_ratio, timed_rounds
from .common import adapted_copy, parity_summary, torch_outputs

if TYPE_CHECKING:
    from ...exports.runners import OnnxRuntimeRunner


def bench_inference(
    spec: ModelSpec, cfg: BenchConfig, *, threads: int, device: torch.device, work_dir: Path, progress: Progress
) -> dict[str, Any]:
    """Plain vs unmerged vs merged (eager), plain vs merged (ONNX Runtime, fused ORT, TensorRT), per batch size."""
    say = progress
    torch.manual_seed(cfg.seed)
    say(f"{spec.key}: building the plain backbone and {len(cfg.methods)} adapted copies")
    plain = spec.build(NUM_CLASSES)
    dcfg = data_config(plain)
    input_size = tuple(int(v) for v in dcfg["input_size"])
    flops = count_flops(plain, input_size)
    unmerged = {m: adapted_copy(plain, m, seed=cfg.seed + i) for i, m in enumerate(cfg.methods)}
    merged_method = cfg.methods[0]
    merged = merge_and_unload(unmerged[merged_method]).eval()
    out: dict[str, Any] = {
        "model": spec.key,
        "label": spec.label,
        "timm_name": spec.name,
        "input_size": list(input_size),
        "dtype": cfg.dtype,
        "gflop_per_image": flops / 1e9,
        "merged_method": merged_method,
        "rows": [],
        "ratios": [],
        "parity": {},
        "notes": [],
    }
    images = real_images(cfg.parity_images, dcfg).numpy()
    inputs = make_input_sets(images, (len(images),), random_batch=2)
    ref_plain = torch_outputs(plain, inputs, "plain (PyTorch)")
    ref_unmerged = torch_outputs(unmerged[merged_method], inputs, f"unmerged {merged_method} (PyTorch)")
    out["parity"]["eager:merged"] = parity_summary(
        ref_unmerged,
        TorchRunner(merged, name="merged PyTorch"),
        inputs,
        MERGE_FP32,
        f"unmerged {merged_method} (PyTorch)",
    )

    # --- backends ---
    modules = {"plain": plain, "merged": merged, **{f"unmerged-{m}": unmerged[m] for m in cfg.methods}}
    for m in modules.values():
        m.to(device)
    sessions: dict[str, OnnxRuntimeRunner] = {}
    if cfg.onnxruntime:
        sessions = _ort_sessions(
            spec,
            cfg,
            plain,
            merged,
            input_size,
            threads,
            device,
            work_dir,
            inputs,
            {"plain": ref_plain, "merged": ref_unmerged},
            merged_method,
            out,
            say,
        )
    engines = _tensorrt_runners(
        cfg, work_dir, spec, max(cfg.batches), inputs, {"plain": ref_plain, "merged": ref_unmerged}, out, say
    )

    dtype = DTYPES[cfg.dtype]
    for m in modules.values():  # after the FP32 exports and parity: only the timed PyTorch variants change
        m.to(dtype)
        if device.type == "cuda":  # GPU users run timm's fused SDPA attention (peftx's trainer and eval do too)
            use_fused_attention(m)
    out["attention"] = "fused SDPA" if device.type == "cuda" else "timm exportable (no SDPA), as exported"
    sync = device_sync(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    for batch in cfg.batches:
        x = torch.randn(batch, *input_size, generator=gen)
        xd, xn = x.to(device, dtype), x.numpy()
        fns: dict[str, Callable[[], Any]] = {}
        for variant, module in modules.items():
            fns[f"eager:{variant}"] = functools.partial(module, xd)
        if cfg.compile != "off":
            fns.update(_compiled_variants(modules, merged_method, xd, cfg.compile, out, batch, say))
        for key, runner in sessions.items():
            fns[key] = functools.partial(runner.infer, xn)
        for key, runner in engines.items():
            fns[key] = functools.partial(runner.infer, xn)
        say(f"{spec.key} batch {batch}: timing {len(fns)} variants interleaved")
        with torch.inference_mode():
            timing = timed_rounds(
                fns,
                warmup=cfg.warmup,
                min_rounds=cfg.min_rounds,
                max_rounds=cfg.max_rounds,
                budget_s=cfg.budget_s,
                sync=sync,
                settle_s=cfg.settle_s,
                seed=cfg.seed,
                guard=contention_guard(cfg.discard_contended, threads, device),
            )
        times = timing.times
        out.setdefault("timing", {})[str(batch)] = timing.to_json()
        for key, ts in times.items():
            backend, _, variant = key.partition(":")
            parity = out["parity"].get(f"{key}@b{batch}") or out["parity"].get(key)
            out["rows"].append(
                {
                    "model": spec.key,
                    "batch": batch,
                    "backend": backend,
                    "variant": variant,
                    "valid": parity["passed"] if parity else True,
                    **latency_stats(ts, batch, flops),
                    "times_ms": [round(1e3 * t, 3) for t in ts],
                }
            )
        out["ratios"] += _inference_ratios(spec.key, batch, times, cfg.methods)
    for runner in (*sessions.values(), *engines.values()):
        runner.__exit__(None, None, None)
    return out


def _compiled_variants(
    modules: dict[str, nn.Module],
    merged_method: str,
    x: torch.Tensor,
    backend: str,
    out: dict,
    batch: int,
    say: Progress,
) -> dict[str, Callable[[], Any]]:
    """torch.compile'd plain, merged and unmerged models (static shapes: one graph per batch size), compiled here
    and checked against their eager outputs on ``x`` (COMPILED_VS_EAGER), so a timed graph is known to be right.

    A variant that fails to compile (no C compiler for Triton's launcher on a bare machine, an unsupported op) is
    recorded as a failed parity entry and a note, and is not timed: the eager rows of the run still count.
    """
    torch.compiler.reset()  # a fresh cache per batch size: no recompile limit is reached across variants
    fns: dict[str, Callable[[], Any]] = {}
    for variant in COMPILED_VARIANTS:
        key = f"unmerged-{merged_method}" if variant == "unmerged" else variant
        say(f"batch {batch}: torch.compile (backend {backend}) of the {key} model")
        compiled = torch.compile(modules[key], backend=backend, dynamic=False)
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                got, want = compiled(x).float(), modules[key](x).float()
        except Exception as exc:  # noqa: BLE001 - recorded; eager timing goes on without this variant
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
            out["notes"].append(f"compiled:{key} at batch {batch} failed to compile ({reason}): not timed")
            out["parity"][f"compiled:{key}@b{batch}"] = {
                "passed": False,
                "tolerance": COMPILED_VS_EAGER.name,
                "max_abs": math.nan,
                "bound": math.nan,
                "reference": f"eager {key} ({x.dtype}, batch {batch})",
                "failures": [f"compile failed: {reason}"],
            }
            continue
        out.setdefault("compile_s", {})[f"b{batch}:{key}"] = time.perf_counter() - t0
        err = float((got - want).abs().max())
        bound = COMPILED_VS_EAGER.bound(float(want.abs().max()))
        out["parity"][f"compiled:{key}@b{batch}"] = {
            "passed": bool(math.isfinite(err) and err <= bound),
            "tolerance": COMPILED_VS_EAGER.name,
            "max_abs": err,
            "bound": bound,
            "reference": f"eager {key} ({x.dtype}, batch {batch})",
            "failures": [],
        }
        fns[f"compiled:{key}"] = functools.partial(compiled, x)
    return fns


def _ort_sessions(
    spec: ModelSpec,
    cfg: BenchConfig,
    plain: nn.Module,
    merged: nn.Module,
    input_size: tuple,
    threads: int,
    device: torch.device,
    work_dir: Path,
    inputs: dict,
    refs: dict,
    merged_method: str,
    out: dict,
    say: Progress,
) -> dict[str, OnnxRuntimeRunner]:
    """The library's ONNX Runtime runner over the plain and merged exports (and their transformer-optimizer
    versions), each parity-checked, then opened for timing with this run's pinned session options."""
    sessions: dict[str, OnnxRuntimeRunner] = {}
    heads, hidden = model_dims(plain)
    for variant, module in (("plain", plain), ("merged", merged)):
        path = work_dir / f"{spec.key}-{variant}.onnx"
        say(f"{spec.key}: exporting the {variant} model to ONNX")
        t0 = time.perf_counter()
        export_onnx(module.cpu(), path, input_size=input_size)
        module.to(device)
        out.setdefault("export_s", {})[variant] = time.perf_counter() - t0
        ref_name = "plain (PyTorch)" if variant == "plain" else f"unmerged {merged_method} (PyTorch)"
        runner = _ort_runner(path, threads, f"ort:{variant}", device)
        out["parity"][f"ort:{variant}"] = parity_summary(refs[variant], runner, inputs, ONNX_FP32, ref_name)
        sessions[f"ort:{variant}"] = runner.__enter__()  # compare() closed it: reopen for timing
        if not cfg.ort_fused:
            continue
        fused_path = work_dir / f"{spec.key}-{variant}.ortfused.onnx"
        info = optimize_for_ort(path, fused_path, model_type=spec.ort_model_type, num_heads=heads, hidden_size=hidden)
        out.setdefault("ort_optimizer", {})[variant] = info
        if not info["ok"]:
            out["notes"].append(f"ort-fused:{variant} skipped: the transformer optimizer failed ({info['reason']})")
            continue
        fused = _ort_runner(fused_path, threads, f"ort-fused:{variant}", device)
        parity = parity_summary(refs[variant], fused, inputs, ONNX_FP32, ref_name)
        out["parity"][f"ort-fused:{variant}"] = parity
        sessions[f"ort-fused:{variant}"] = fused.__enter__()
        if not parity["passed"]:
            out["notes"].append(
                f"ort-fused:{variant} fails parity ({'; '.join(parity['failures'])}): timed but reported invalid"
            )
    return sessions


def _ort_runner(path: Path, threads: int, name: str, device: torch.device) -> OnnxRuntimeRunner:

    return OnnxRuntimeRunner(
        path, providers=ort_providers(device), name=name, session_options=ort_session_options(threads)
    )


def _tensorrt_runners(
    cfg: BenchConfig,
    work_dir: Path,
    spec: ModelSpec,
    max_batch: int,
    inputs: dict,
    refs: dict,
    out: dict,
    say: Progress,
) -> dict[str, Any]:
    """TensorRT FP32 engines of the plain and merged ONNX, opened, when TensorRT and a GPU exist; else a note."""
    if cfg.tensorrt == "off":
        out["tensorrt"] = "skipped: disabled (--tensorrt off)"
        return {}

    reason = unavailable_reason()
    if reason is not None:
        out["tensorrt"] = f"skipped: no CUDA/TensorRT ({reason})"
        return {}
    if not cfg.onnxruntime:
        out["tensorrt"] = "skipped: TensorRT engines are built from the ONNX exports (onnxruntime suite off)"
        return {}

    runners: dict[str, Any] = {}
    for variant in ("plain", "merged"):
        onnx_path = work_dir / f"{spec.key}-{variant}.onnx"
        engine = work_dir / f"{spec.key}-{variant}.engine"
        say(f"{spec.key}: building a TensorRT FP32 engine ({variant})")
        build = build_engine(
            onnx_path,
            engine,
            batch=(1, max_batch, max(max_batch, 8)),
            precision="fp32",
            timing_cache_path=work_dir / "trt.cache",
        )
        runner = TensorRTRunner(engine, name=f"trt:{variant}")
        out["parity"][f"trt:{variant}"] = parity_summary(refs[variant], runner, inputs, TENSORRT_FP32, variant)
        out.setdefault("tensorrt_build_s", {})[variant] = build.seconds
        runners[f"trt:{variant}"] = runner.__enter__()  # compare() exits the runner it checked: reopen for timing
    out["tensorrt"] = "measured (FP32 engines; timing includes host<->device copies of the batch)"
    return runners


def _inference_ratios(model: str, batch: int, times: dict[str, list[float]], methods: Sequence[str]) -> list[dict]:
    rows = []
    for backend in ("eager", "compiled", "ort", "ort-fused", "trt"):
        p, m = times.get(f"{backend}:plain"), times.get(f"{backend}:merged")
        if p and m:
            r = paired_ratio(m, p)
            rows.append(
                {
                    "model": model,
                    "batch": batch,
                    "ratio": "merged/plain",
                    "backend": backend,
                    "value": r,
                    "min_ratio": min_ratio(m, p),
                    "target": MERGED_OVER_PLAIN_MAX,
                    "met": bool(r <= MERGED_OVER_PLAIN_MAX),
                }
            )
    merged = times.get("eager:merged")
    for method in methods:
        u = times.get(f"eager:unmerged-{method}")
        if u and merged:
            rows.append(
                {
                    "model": model,
                    "batch": batch,
                    "ratio": f"unmerged-{method}/merged",
                    "backend": "eager",
                    "value": paired_ratio(u, merged),
                    "min_ratio": min_ratio(u, merged),
                    "target": None,
                    "met": None,
                }
            )
    for backend in ("compiled", "ort", "ort-fused", "trt"):
        b = times.get(f"{backend}:merged")
        if b and merged:
            rows.append(
                {
                    "model": model,
                    "batch": batch,
                    "ratio": f"{backend}/eager (merged)",
                    "backend": backend,
                    "value": paired_ratio(b, merged),
                    "min_ratio": min_ratio(b, merged),
                    "target": None,
                    "met": None,
                }
            )
    return rows
