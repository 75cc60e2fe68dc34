"""Time every artifact of this bundle on this device and say which precision to ship (``infer.py --bench``).

Standalone like infer.py (Python 3.8+, numpy; onnxruntime and/or tensorrt + cuda-python; Pillow for the end-to-end
figures; no torch, no peftx). infer.py imports it; it uses infer.py's own backends, preprocessing and check.

    python3 infer.py --bench [--check] [--batch 1,8] [--duration 3] [--backend ...] [--precision ...]

What it times, the way trtexec does (warm-up, then a fixed duration; median, p99 and throughput), per batch size:

* every ONNX file of the bundle under ONNX Runtime (fp32 model.onnx, fp16 model_fp16.onnx, int8 model_int8.onnx),
  with the provider ONNX Runtime picks here (CUDA when onnxruntime-gpu sees a GPU, else the CPU);
* every engine build_engine.sh built here (model.engine, or model_<precision>.engine from ``build_engine.sh all``),
  each with its manifest (<engine>.json), through TensorRT, when tensorrt + cuda-python + a GPU are present and
  the manifest says the engine was built for this GPU and TensorRT.

Two figures per artifact: ``compute`` (the model alone: for an engine, enqueue + stream sync on device buffers
filled once, trtexec's "GPU Compute Time"; for ONNX Runtime on CUDA, a run on bound device buffers; on the CPU
``session.run`` on a numpy batch) and ``end_to_end`` (what an application pays: decode of the bundle's raw reference
images with Pillow, infer.py's preprocessing, host/device copies and inference through infer.py's own backend).

Honest timing: every artifact gets the same inputs (the shipped reference set's real images, cycled to the batch;
the same raw files for end to end), its own session or engine, nothing decoded or preprocessed ahead for one and
not another; all artifact x figure pairs are warmed up first, then timed in interleaved rounds (round-robin, each
round starting one artifact later) so that clock, thermal or background drift spreads over all of them; each
figure carries its spread (p10/p90, IQR) beside the median.

With ``--check`` the bundle's own check (infer.py --check) runs first; every artifact then gets a verdict with its
figures (max |Δ|, cosine, top-1 agreement, accuracy on the labelled reference images) under the tolerance
metadata.json recorded, and the table recommends the fastest artifact whose verdict is PASS. Without ``--check`` the
timings are reported and nothing is recommended. Either way device_report.json is written beside this file
(atomically): device facts, per artifact verdict and timings, the bundle's sha256 values as read here.
"""

from __future__ import annotations

import gc
import glob
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
REPORT_FILE = "device_report.json"
REPORT_FORMAT = "peftx-device-report"
REPORT_VERSION = 1
DEFAULT_DURATION_S = 3.0  # trtexec --duration's default
DEFAULT_WARMUP_S = 0.2  # trtexec --warmUp's default (200 ms)
ROUNDS = 5  # each artifact's duration is split over this many interleaved rounds
MIN_WARMUP_RUNS = 2  # the first runs of a fresh session allocate and pick kernels: never timed
MIN_ITERATIONS = 10  # timed runs per artifact and figure at least, whatever the duration (trtexec --iterations)
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "asimd", "asimddp", "i8mm")
GPU_DEVFREQ_NAMES = ("gpu", "gv11b", "ga10b", "gp10b", "gb10b")  # /sys/class/devfreq entries of Jetson GPUs


# --- what decides the figures ------------------------------------------------------------------------------------


def _run(cmd: list[str], timeout: float = 10.0) -> dict[str, Any]:
    """A device tool's output, or why there is none (not installed, needs root, failed)."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return {"available": False, "output": None, "error": f"{cmd[0]} not found"}
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"available": False, "output": None, "error": f"{type(exc).__name__}: {exc}"}
    text = (done.stdout or "").strip()
    if done.returncode != 0:
        return {"available": False, "output": text or None, "error": (done.stderr or "").strip()[-300:] or None}
    return {"available": True, "output": text, "error": None}


def cpu_facts(root: Path = Path("/")) -> dict[str, Any]:
    """CPU model, core count and the instruction-set flags that decide ONNX Runtime's CPU kernels."""
    model, flags = None, set()
    try:
        text = (root / "proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and model is None:
            model = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
    return {
        "model": model or platform.processor() or None,
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "flags": {flag: flag in flags for flag in CPU_FLAGS} if flags else "unknown",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def gpu_frequency(root: Path = Path("/")) -> dict[str, Any]:
    """The GPU clock from Jetson's devfreq sysfs (Hz), from nvidia-smi elsewhere (MHz), or 'unknown'."""
    for entry in sorted(glob.glob(str(root / "sys/class/devfreq/*"))):
        if not any(name in Path(entry).name.lower() for name in GPU_DEVFREQ_NAMES):
            continue
        values: dict[str, Any] = {"source": entry}
        for field in ("cur_freq", "min_freq", "max_freq", "governor"):
            try:
                raw = Path(entry, field).read_text(encoding="utf-8").strip()
            except OSError:
                continue
            values[field] = int(raw) if raw.isdigit() else raw
        if "cur_freq" in values:
            values["unit"] = "Hz"
            return values
    smi = _run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm", "--format=csv,noheader,nounits"])
    if smi["available"] and smi["output"]:
        parts = [p.strip() for p in smi["output"].splitlines()[0].split(",")]
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            return {"source": "nvidia-smi", "cur_freq": int(parts[0]), "max_freq": int(parts[1]), "unit": "MHz"}
    return {"source": "unknown", "cur_freq": "unknown"}


def jetson_state(infer: Any, root: Path = Path("/")) -> dict[str, Any] | None:
    """On a Jetson: model and L4T, the power mode (nvpmodel -q) and jetson_clocks --show; None elsewhere."""
    facts = infer.jetson_facts(root)
    if facts is None:
        return None
    power = _run(["nvpmodel", "-q"])
    mode = None
    for line in (power["output"] or "").splitlines():
        if "Power Mode" in line:
            mode = line.split(":", 1)[-1].strip()
    clocks = _run(["jetson_clocks", "--show"])
    return {
        **facts,
        "power_mode": mode or "unknown",
        "nvpmodel": power,
        "jetson_clocks": clocks if clocks["available"] else {**clocks, "note": "run as root to read it"},
    }


def device_info(infer: Any, root: Path = Path("/")) -> dict[str, Any]:
    """Everything that decides the figures: runtimes and their versions, CPU, GPU, Jetson power and clocks."""
    facts: dict[str, Any] = {
        "hostname": platform.node(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpu": cpu_facts(root),
    }
    try:
        import PIL

        facts["pillow"] = PIL.__version__
    except ImportError:
        facts["pillow"] = None
    try:
        import onnxruntime as ort

        facts["onnxruntime"] = {"version": ort.__version__, "providers": list(ort.get_available_providers())}
    except ImportError:
        facts["onnxruntime"] = None
    gpu: dict[str, Any] = {"name": "unknown", "compute_capability": "unknown"}
    facts["tensorrt"] = None
    if infer.tensorrt_usable():
        here = infer.device_facts()
        facts["tensorrt"] = here.get("tensorrt_version")
        gpu.update({k: v for k, v in (here.get("gpu") or {}).items() if v})
    else:
        smi = _run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"])
        if smi["available"] and smi["output"]:
            parts = [p.strip() for p in smi["output"].splitlines()[0].split(",")]
            gpu.update(dict(zip(("name", "compute_capability", "driver"), parts)))
    gpu["frequency"] = gpu_frequency(root)
    facts["gpu"] = gpu
    facts["jetson"] = jetson_state(infer, root)
    return facts


# --- the bundle as it is here -------------------------------------------------------------------------------------


def bundle_digests(infer: Any, meta: dict) -> dict[str, Any]:
    """The sha256 metadata.json recorded and the sha256 of each of those files as read on this device."""
    recorded = dict(meta.get("sha256") or {})
    here, missing, modified = {}, [], []
    for name, expected in sorted(recorded.items()):
        path = HERE / name
        if not path.is_file():
            missing.append(name)
            continue
        here[name] = infer._sha256(path)
        if here[name] != expected:
            modified.append(name)
    return {
        "created_at": meta.get("created_at"),
        "precision": meta.get("precision"),
        "target": (meta.get("target") or {}).get("name"),
        "sha256_recorded": recorded,
        "sha256": here,
        "missing": missing,
        "modified": modified,
    }


class Artifact:
    """One thing to time: an ONNX file under ONNX Runtime, or an engine under TensorRT."""

    def __init__(self, name: str, runtime: str, precision: str, file: str, tol_key: str, required: bool, make):
        self.name, self.runtime, self.precision, self.file = name, runtime, precision, file
        self.tol_key, self.required, self.make = tol_key, required, make
        self.backend: Any = None
        self.skipped: str | None = None  # why it cannot run here
        self.manifest: dict | None = None
        self.provider: str | None = None

    def load(self) -> Any:
        if self.backend is None:
            self.backend = self.make()
            session = getattr(self.backend, "session", None)
            if session is not None:
                self.provider = session.get_providers()[0]
        return self.backend


def engine_manifest_path(engine: Path) -> Path:
    """model.engine -> model.engine.json, model_fp16.engine -> model_fp16.engine.json."""
    return engine.with_name(engine.name + ".json")


def _engine_precision(infer: Any, engine: Path) -> str | None:
    return (infer._manifest_or_none(engine_manifest_path(engine)) or {}).get("precision")


def find_artifacts(infer: Any, meta: dict, backend: str, precision: str | None) -> list[Artifact]:
    """Every ONNX file metadata.json lists (ONNX Runtime) and every engine with a manifest (TensorRT)."""
    found: list[Artifact] = []
    if backend in ("auto", "onnx"):
        have_ort = importlib.util.find_spec("onnxruntime") is not None
        for prec, key in infer.PRECISION_ARTIFACTS.items():
            name = (meta.get("artifacts") or {}).get(key)
            if not name or (precision and prec != precision):
                continue
            required = precision is not None or prec in ("fp32", meta.get("precision"))
            art = Artifact(
                f"{prec} {name} (onnxruntime)",
                "onnxruntime",
                prec,
                name,
                prec,
                required,
                lambda name=name, prec=prec: infer.OnnxBackend(HERE / name, prec),
            )
            if not have_ort:
                art.skipped = "onnxruntime is not installed"
            found.append(art)
    if backend in ("auto", "tensorrt"):
        usable = None
        order = {p: i for i, p in enumerate(infer.PRECISION_ARTIFACTS)}
        engines = sorted(HERE.glob("*.engine"), key=lambda e: (order.get(_engine_precision(infer, e), 9), e.name))
        for engine in engines:
            manifest = infer._manifest_or_none(engine_manifest_path(engine)) or {}
            built = manifest.get("precision") or "unknown precision"
            if precision and built != precision:
                continue
            art = Artifact(
                f"{built} {engine.name} (tensorrt)",
                "tensorrt",
                built,
                engine.name,
                f"tensorrt_{built}",
                True,
                lambda engine=engine: infer.TensorRTBackend(engine),
            )
            art.manifest = manifest or None
            if usable is None:
                usable = infer.tensorrt_usable()
            if not manifest:
                art.skipped = f"no {engine_manifest_path(engine).name} beside it (build it with ./build_engine.sh)"
            elif not usable:
                art.skipped = "needs tensorrt, cuda-python and a GPU"
            else:
                here = dict(infer.device_facts())
                names = {engine.name, manifest.get("source_onnx")}
                here["sha256"] = {n: infer._sha256(HERE / n) for n in names if n and (HERE / n).is_file()}
                refusals, _ = infer.engine_problems({**manifest, "engine": engine.name}, here)
                if refusals:
                    art.skipped = "refused: " + "; ".join(refusals) + " — rebuild it here with ./build_engine.sh"
            found.append(art)
    return found


# --- the check, per artifact, as figures ------------------------------------------------------------------------


def _figures(expected: np.ndarray, actual: np.ndarray, tol: dict) -> dict[str, Any]:
    """The numbers behind infer.compare_outputs' verdict (same formulas), for the JSON."""
    ref, out = expected.astype(np.float64), actual.astype(np.float64)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.nan_to_num(np.where(norms == 0, 1.0, (ref * out).sum(axis=1) / norms), nan=0.0)
    return {
        "max_abs": float(np.abs(out - ref).max(initial=0.0)),
        "bound": float(tol["atol"]) + float(tol["rel_to_max"]) * float(np.abs(ref).max(initial=0.0)),
        "min_cosine": float(cosine.min(initial=1.0)),
        "top1_agreement": float((ref.argmax(axis=1) == out.argmax(axis=1)).mean()),
        "tolerance": tol.get("name"),
    }


def check_artifact(infer: Any, art: Artifact, meta: dict, data: dict, verify: bool) -> dict[str, Any]:
    """PASS / FAIL of one artifact on the reference set with the tolerance metadata.json recorded (infer.py --check's
    test), with its figures; 'skip' when it cannot run here."""
    if art.skipped:
        return {"verdict": "skip", "required": art.required, "problems": [art.skipped]}
    files = [art.file] if art.runtime == "onnxruntime" else [(art.manifest or {}).get("source_onnx")]
    problems = [f"{n} is {p}" for n in files if n and (p := infer.artifact_problem(n, meta, verify))]
    if art.runtime == "tensorrt" and art.manifest and art.manifest.get("engine_sha256"):
        if infer._sha256(HERE / art.file) != art.manifest["engine_sha256"]:
            problems.append(f"{art.file} is not the engine its manifest describes (sha256 differs)")
    tol = ((meta.get("reference_set") or {}).get("tolerances") or {}).get(art.tol_key)
    if tol is None:
        problems.append(f"metadata.json records no tolerance for {art.tol_key}")
    result: dict[str, Any] = {"required": art.required, "problems": problems}
    if not problems and tol is not None:  # (no tolerance is a problem above)
        inputs, expected, labels = data["inputs"], data["reference_logits"], data["labels"]
        chunk = int((meta.get("batch") or {}).get("max") or len(inputs))
        backend = art.load()
        actual = np.concatenate([backend(inputs[i : i + chunk]) for i in range(0, len(inputs), chunk)])
        failures, _ = infer.compare_outputs(expected, actual, tol)
        result["problems"] = failures
        if tuple(actual.shape) == tuple(expected.shape):
            result.update(_figures(expected, actual, tol))
        known = labels >= 0
        if known.any():
            result["accuracy"] = float((actual.argmax(axis=1) == labels)[known].mean())
            result["reference_accuracy"] = float((expected.argmax(axis=1) == labels)[known].mean())
            result["labelled_images"] = int(known.sum())
    result["verdict"] = "PASS" if not result["problems"] else "FAIL"
    return result


# --- timing ------------------------------------------------------------------------------------------------------


def stats(seconds: list[float], batch: int) -> dict[str, Any]:
    """trtexec-style summary of per-iteration latencies (ms) plus the spread and throughput (images/s)."""
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    p = {q: float(np.percentile(ms, q)) for q in (10, 25, 50, 75, 90, 99)}
    return {
        "iterations": int(ms.size),
        "median_ms": p[50],
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
        "p10_ms": p[10],
        "p90_ms": p[90],
        "p99_ms": p[99],
        "iqr_ms": p[75] - p[25],
        "throughput_ips": float(batch * ms.size / (ms.sum() / 1000.0)),
        "median_ms_per_image": p[50] / batch,
    }


def measure(
    units: list[tuple],
    duration: float,
    warmup: float,
    rounds: int = ROUNDS,
    clock: Callable[[], float] = time.perf_counter,
    say: Callable[[str], None] | None = None,
) -> dict[Any, list[float]]:
    """Per-iteration seconds of each (key, run) in ``units``: all warmed up first (``warmup`` seconds and at least
    MIN_WARMUP_RUNS runs each), then ``rounds`` interleaved rounds of ``duration / rounds`` seconds per unit (and
    at least MIN_ITERATIONS runs per unit in all), each round starting one unit later than the last (round-robin),
    so drift spreads over every unit."""
    rounds = max(1, rounds)
    per_slice = -(-MIN_ITERATIONS // rounds)  # ceil: MIN_ITERATIONS over the rounds
    slice_s = duration / rounds
    expected = 0.0
    for _, run in units:
        start, runs = clock(), 0
        while runs < MIN_WARMUP_RUNS or clock() - start < warmup:
            run()
            runs += 1
        expected += max(duration, per_slice * rounds * (clock() - start) / runs)
    if say is not None:
        say(f"  warmed up; timing takes about {expected:.0f} s")
    samples: dict[Any, list[float]] = {key: [] for key, _ in units}
    for r in range(rounds):
        k = r % len(units)
        for key, run in units[k:] + units[:k]:
            gc.collect()
            was_enabled = gc.isenabled()
            gc.disable()  # a collection inside one artifact's slice would be charged to it alone
            try:
                start, runs = clock(), 0
                while True:
                    t0 = clock()
                    run()
                    t1 = clock()
                    samples[key].append(t1 - t0)
                    runs += 1
                    if t1 - start >= slice_s and runs >= per_slice:
                        break
            finally:
                if was_enabled:
                    gc.enable()
    return samples


def _cycled(array: np.ndarray, n: int) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate([array] * (n // len(array) + 1))[:n])


def compute_runner(infer: Any, art: Artifact, x: np.ndarray) -> Callable[[], Any]:
    """The model alone on ``x``: device buffers filled once (engine, ONNX Runtime on CUDA), or session.run (CPU)."""
    backend = art.load()
    if art.runtime == "tensorrt":
        return _TensorRTCompute(infer, backend, x)
    session, name = backend.session, backend.input_name
    if art.provider == "CUDAExecutionProvider":
        import onnxruntime as ort

        value = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
        binding = session.io_binding()
        binding.bind_ortvalue_input(name, value)
        binding.bind_output(session.get_outputs()[0].name, "cuda")
        return lambda: session.run_with_iobinding(binding)
    feed = {name: x}
    return lambda: session.run(None, feed)


class _TensorRTCompute:
    """execute_async_v3 + stream sync on device buffers filled once: trtexec's GPU compute time. Its own execution
    context and stream: the end-to-end runner's calls (infer.py's backend, which re-points its context at fresh
    buffers every call) cannot touch this one's shapes or addresses."""

    def __init__(self, infer: Any, backend: Any, x: np.ndarray):
        trt, cudart, engine = backend.trt, backend.cudart, backend.engine
        self.cudart, self.cuda = cudart, infer._cuda
        self.context = engine.create_execution_context()
        self.stream = self.cuda(cudart.cudaStreamCreate())
        x = np.ascontiguousarray(x, dtype=trt.nptype(engine.get_tensor_dtype(backend.input_name)))
        self.context.set_input_shape(backend.input_name, tuple(x.shape))
        shape = tuple(self.context.get_tensor_shape(backend.output_name))
        out_bytes = int(np.prod(shape)) * np.dtype(trt.nptype(engine.get_tensor_dtype(backend.output_name))).itemsize
        self.d_in, self.d_out = self.cuda(cudart.cudaMalloc(x.nbytes)), self.cuda(cudart.cudaMalloc(out_bytes))
        kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.cuda(cudart.cudaMemcpy(self.d_in, x.ctypes.data, x.nbytes, kind))
        self.context.set_tensor_address(backend.input_name, int(self.d_in))
        self.context.set_tensor_address(backend.output_name, int(self.d_out))

    def __call__(self) -> None:
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT execution failed")
        self.cuda(self.cudart.cudaStreamSynchronize(self.stream))

    def close(self) -> None:
        self.cudart.cudaFree(self.d_in)
        self.cudart.cudaFree(self.d_out)
        self.cudart.cudaStreamDestroy(self.stream)
        self.context = None


def end_to_end_runner(infer: Any, art: Artifact, files: list[Path], cfg: dict) -> Callable[[], Any]:
    """What an application pays: decode each raw file, infer.py's preprocessing, batch, the shipped backend's call
    (its own copies), top-1. Nothing is decoded ahead of time."""
    backend = art.load()

    def run() -> Any:
        batch = np.stack([infer.preprocess_image(infer.read_image(p), cfg) for p in files])
        return backend(batch).argmax(axis=1)

    return run


def bench(
    infer: Any, meta: dict, artifacts: list[Artifact], data: dict, batches: list[int], duration: float, say
) -> dict[str, Any]:
    """Timings per artifact and batch (``{artifact name: {batch: {compute|end_to_end: stats or skip}}}``)."""
    ref = meta.get("reference_set") or {}
    raw = [HERE / str(n) for n in ref.get("raw_files") or []]
    e2e_skip = None
    if not raw:
        e2e_skip = "the bundle holds no raw reference images"
    elif infer.Image is None:
        e2e_skip = "Pillow is not installed (pip install pillow)"
    results: dict[str, dict[str, Any]] = {a.name: {} for a in artifacts}
    runnable = [a for a in artifacts if not a.skipped]
    for batch in batches:
        x = _cycled(np.asarray(data["inputs"], dtype=np.float32), batch)
        files = [raw[i % len(raw)] for i in range(batch)] if raw else []
        units, closers = [], []
        for art in runnable:
            max_batch = int((art.manifest or {}).get("batch", {}).get("max") or 0) if art.manifest else 0
            if max_batch and batch > max_batch:
                results[art.name][str(batch)] = {"skipped": f"batch {batch} is above the engine's maximum {max_batch}"}
                continue
            run = compute_runner(infer, art, x)
            closers.append(run)
            units.append(((art.name, "compute"), run))
            if e2e_skip is None:
                units.append(((art.name, "end_to_end"), end_to_end_runner(infer, art, files, meta["preprocessing"])))
        if not units:
            continue
        say(
            f"timing batch {batch}: {len(units)} artifact x figure pairs, {DEFAULT_WARMUP_S:g} s warm-up each, then "
            f"{duration:g} s (at least {MIN_ITERATIONS} runs) each in {ROUNDS} interleaved rounds"
        )
        samples = measure(units, duration, DEFAULT_WARMUP_S, say=say)
        for (name, figure), seconds in samples.items():
            entry = results[name].setdefault(str(batch), {})
            entry[figure] = stats(seconds, batch)
            if e2e_skip is not None:
                entry["end_to_end"] = {"skipped": e2e_skip}
        for run in closers:
            if hasattr(run, "close"):
                run.close()
    return results


# --- the recommendation and the table ----------------------------------------------------------------------------


def recommend(rows: list[dict[str, Any]], batches: list[int]) -> dict[str, Any] | None:
    """The fastest artifact (median compute time per image at the largest batch timed) whose check PASSed; None
    when no artifact was checked and passed."""
    for batch in sorted(batches, reverse=True):
        key = str(batch)
        timed = [
            r
            for r in rows
            if (r.get("check") or {}).get("verdict") == "PASS" and "compute" in (r["timings"].get(key) or {})
        ]
        if not timed:
            continue
        timed.sort(key=lambda r: r["timings"][key]["compute"]["median_ms"])
        best = timed[0]
        figure = best["timings"][key]["compute"]["median_ms"]
        others = [
            f"{r['precision']} {r['runtime']} {r['timings'][key]['compute']['median_ms'] / figure:.2f}x slower"
            for r in timed[1:]
        ]
        close = [
            r["name"]
            for r in timed[1:]
            if r["timings"][key]["compute"]["p10_ms"] <= best["timings"][key]["compute"]["p90_ms"]
        ]
        return {
            "artifact": best["name"],
            "precision": best["precision"],
            "runtime": best["runtime"],
            "file": best["file"],
            "batch": batch,
            "metric": "median compute time (ms) at the largest batch timed, among artifacts whose check passed",
            "median_ms": figure,
            "versus": others,
            # a runner-up whose p10 lies below the winner's p90: the two are not told apart by this run
            "within_spread": close,
        }
    return None


def _cell(entry: dict[str, Any] | None, figure: str) -> str:
    value = (entry or {}).get(figure) or {}
    if "median_ms" not in value:
        return "-"
    return f"{value['median_ms']:.2f} ({value['p10_ms']:.2f}-{value['p90_ms']:.2f})"


def table(report: dict[str, Any]) -> str:
    """The one table: artifact, verdict, accuracy, per batch compute and end-to-end median (p10-p90) ms and
    compute throughput; then the recommendation."""
    batches = report["bench"]["batches"]
    head = ["artifact", "check", "accuracy"]
    for b in batches:
        head += [f"b{b} compute ms", f"b{b} end-to-end ms", f"b{b} img/s"]
    lines = [head]
    for row in report["artifacts"]:
        check = row.get("check") or {}
        accuracy = f"{100 * check['accuracy']:.1f} %" if "accuracy" in check else "-"
        cells = [row["name"], check.get("verdict", "not run"), accuracy]
        for b in batches:
            entry = row["timings"].get(str(b)) or {}
            compute = entry.get("compute") or {}
            ips = f"{compute['throughput_ips']:.1f}" if "throughput_ips" in compute else "-"
            cells += [_cell(entry, "compute"), _cell(entry, "end_to_end"), ips]
        lines.append(cells)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    for row in report["artifacts"]:
        if row.get("skipped"):
            out.append(f"skip  {row['name']}: {row['skipped']}")
    rec = report.get("recommendation")
    if rec:
        versus = f" ({', '.join(rec['versus'])})" if rec["versus"] else ""
        out.append(
            f"recommended: {rec['precision']} ({rec['runtime']}, {rec['file']}) — fastest artifact that passes its "
            f"check: {rec['median_ms']:.2f} ms median compute at batch {rec['batch']}{versus}"
        )
        if rec.get("within_spread"):
            out.append(
                f"  not a clear win: the p10-p90 spread overlaps {', '.join(rec['within_spread'])} — a longer "
                "--duration, or a quieter machine (Jetson: sudo jetson_clocks), tells them apart"
            )
    else:
        out.append(f"recommended: none — {report.get('no_recommendation')}")
    out.append(
        "times: median (p10-p90) ms per batch; compute = the model alone, end-to-end = decode + preprocess + run"
    )
    return "\n".join(out)


# --- entry point -------------------------------------------------------------------------------------------------


def parse_batches(text: str | None, meta: dict) -> list[int]:
    """'1,8' -> [1, 8]; default: 1 and the bundle's opt batch. Raises ValueError with the reason."""
    if text is None:
        opt = int((meta.get("batch") or {}).get("opt") or 1)
        return sorted({1, opt})
    values = []
    for piece in text.split(","):
        piece = piece.strip()
        if not piece.isdigit() or int(piece) < 1:
            raise ValueError(f"--batch {text}: give positive batch sizes separated by commas, e.g. 1,8")
        values.append(int(piece))
    return sorted(set(values))


def write_report(report: dict[str, Any], path: Path) -> None:
    """device_report.json, written whole or not at all."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)


def run(infer: Any, meta: dict, args: Any) -> int:
    """``infer.py --bench [--check]``: check (optionally) and time every artifact, print the table, write
    device_report.json. Exit status: infer.py --check's when --check ran, else 0."""
    say = lambda message: print(message, file=sys.stderr)  # noqa: E731
    try:
        batches = parse_batches(args.batch, meta)
    except ValueError as exc:
        infer.fail(str(exc), infer.EXIT_INPUT)
    duration = DEFAULT_DURATION_S if args.duration is None else float(args.duration)
    if not duration > 0:
        infer.fail(f"--duration {args.duration}: must be a positive number of seconds", infer.EXIT_INPUT)
    verify = not args.no_verify
    ref: dict[str, Any] = meta.get("reference_set") or {}
    if not ref:
        infer.fail("this bundle has no reference set (written by an older peftx) — re-export it with a newer peftx")
    for name in [ref["file"], *ref.get("raw_files", [])]:
        problem = infer.artifact_problem(name, meta, verify)
        if problem:
            infer.fail(f"the reference set cannot be trusted: {name} is {problem} — copy the bundle again")
    status = 0
    if args.check:
        status = infer.check_bundle(meta, args.backend, args.precision, verify=verify)
        print()
    infer.VERIFY_AGAINST = None  # every artifact is verified below; a modified one is a FAIL row, not the end
    with np.load(HERE / ref["file"], allow_pickle=False) as npz:
        data = {key: npz[key] for key in npz.files}
    artifacts = find_artifacts(infer, meta, args.backend, args.precision)
    say(f"reading the device: {len(artifacts)} artifact(s) found")
    rows = []
    for art in artifacts:
        row: dict[str, Any] = {
            "name": art.name,
            "runtime": art.runtime,
            "precision": art.precision,
            "file": art.file,
            "skipped": art.skipped,
            "timings": {},
        }
        if art.manifest:
            row["engine_manifest"] = art.manifest
        if args.check:
            row["check"] = check_artifact(infer, art, meta, data, verify)
        rows.append(row)
    timings = bench(infer, meta, artifacts, data, batches, duration, say)
    for art, row in zip(artifacts, rows):
        row["timings"] = timings.get(art.name, {})
        row["provider"] = art.provider
        if art.provider:
            row["name"] = art.name = art.name.replace("(onnxruntime)", f"(onnxruntime {art.provider})")
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "format_version": REPORT_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        "bundle": bundle_digests(infer, meta),
        "device": device_info(infer),
        "bench": {
            "batches": batches,
            "duration_s": duration,
            "warmup_s": DEFAULT_WARMUP_S,
            "min_warmup_runs": MIN_WARMUP_RUNS,
            "min_iterations": MIN_ITERATIONS,
            "rounds": ROUNDS,
            "order": "all pairs warmed up, then interleaved round-robin rounds (each starts one pair later)",
            "inputs": f"the reference set's {len(data['inputs'])} real images, cycled to the batch (compute); "
            f"{len(ref.get('raw_files') or [])} raw reference files decoded every run (end to end)",
            "compute": "engine: enqueue + stream sync on device buffers filled once; onnxruntime CUDA: run on bound "
            "device buffers; onnxruntime CPU: session.run",
            "end_to_end": "Pillow decode + infer.py preprocessing + batch + the shipped backend's call + argmax",
        },
        "checked": bool(args.check),
        "check_exit": status if args.check else None,
        "artifacts": rows,
    }
    report["recommendation"] = recommend(rows, batches) if args.check else None
    if report["recommendation"] is None:
        report["no_recommendation"] = (
            "no check ran (run: python3 infer.py --check --bench)"
            if not args.check
            else "no artifact passed its check and was timed"
        )
    write_report(report, HERE / REPORT_FILE)
    print(table(report))
    print(f"wrote {REPORT_FILE} (copy it back and run: peftx report {REPORT_FILE} --bundle BUNDLE_DIR)")
    return status
