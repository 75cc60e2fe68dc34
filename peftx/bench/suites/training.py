"""Training suite: full fine-tuning vs each adapter on one backbone and batch: step time, FLOPs, peak memory,
optimiser state. Peak memory is measured in a fresh subprocess per method (see :func:`run_memory_worker`)."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...adapter import adapt, adapter_modules, count_parameters
from ...methods import AdapterLinear, LowRankLinear, RLRRLinear, make_config
from ...methods.rlrr import rescale_vector_grads
from ...runtime import autocast, resolve_amp, use_fused_attention
from ...train.optim import make_optimizer
from ...train.recipes import GENERIC
from ..config import TRAIN_BASELINES, TRAIN_CLASSES, BenchConfig, ModelSpec, Progress
from ..flops import count_step_flops
from ..machine import device_sync
from ..timing import contention_guard, latency_stats, min_ratio, paired_ratio, timed_rounds


@dataclass
class _TrainSetup:
    method: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    y: torch.Tensor
    trainable: int
    total: int
    amp: torch.dtype | None = None  # autocast dtype, as peftx's trainer (fp16 with a GradScaler)
    scaler: Any = None

    def _loss(self) -> torch.Tensor:

        with autocast(self.x.device, self.amp):
            logits = self.model(self.x)
        return nn.functional.cross_entropy(logits.float(), self.y)

    def step(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss()
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return float(loss.detach())

    def forward_backward(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._loss().backward()


def train_setup(
    spec: ModelSpec,
    method: str,
    *,
    batch: int,
    device: torch.device,
    seed: int = 0,
    fused_attention: bool = True,
    amp: str = "off",
) -> _TrainSetup:
    """The model, AdamW and a fixed batch for one training step of ``method`` (a registered method, "full" = full
    fine-tuning among them, or "frozen" = the backbone-only reference, see TRAIN_BASELINES).

    Mirrors peftx's trainer: timm's fused (SDPA) attention switched on for training, and the trainer's own AdamW
    and parameter groups (:func:`peftx.train.optim.make_optimizer`: no decay on biases, norms and adapter scales)
    with lr 1e-4 and the generic recipe's weight decay, in FP32 or under ``amp`` autocast (fp16 with a GradScaler,
    as the trainer).
    """
    torch.manual_seed(seed)
    model = spec.build(TRAIN_CLASSES, train=True)
    # "frozen" trains what the linear probe trains (the head), but back-propagates through the whole backbone.
    adapt(model, make_config("linear" if method == "frozen" else method), base_fingerprint="benchmark (not computed)")
    trainable, total = count_parameters(model)
    if method == "frozen":
        # The input image needs no gradient, so without this backward would stop at the head.
        model.get_submodule("patch_embed").register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    if fused_attention:
        use_fused_attention(model)
    model.to(device).train()
    optimizer, _ = make_optimizer(model, lr=1e-4, weight_decay=GENERIC.weight_decay)
    embed = getattr(model, "patch_embed", None)  # timm's ViT/Swin patch embedding knows the input size
    size = embed.img_size if embed is not None else (224, 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, *size, generator=gen).to(device)
    y = torch.randint(0, TRAIN_CLASSES, (batch,), generator=gen).to(device)
    amp_dtype = resolve_amp(amp, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    return _TrainSetup(method, model, optimizer, x, y, trainable, total, amp_dtype, scaler)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        t.numel() * t.element_size()
        for st in optimizer.state.values()
        for t in st.values()
        if isinstance(t, torch.Tensor)
    )


def delta_cost(model: nn.Module, *, reps: int = 5) -> dict[str, Any] | None:
    """Milliseconds to build every adapted layer's weight-side tensors (forward) and back-propagate into them.

    This is the per-step work that does not depend on the batch, done the way training does it: RLRR's in-place
    W' = W ⊙ (1 + s_row s_colᵀ) and the reduction of dL/dW' to its two vectors (the dL/dW' GEMM itself is left
    out: full fine-tuning does it too; a copy of a fixed random dL/dW' stands in for its output); AOFT's generator
    and factors; LoRA's (zero-padded) factors. Upstream gradients are fixed random tensors.
    """
    layers = [m for _, m in adapter_modules(model) if isinstance(m, AdapterLinear)]
    if not layers:
        return None
    low_rank = [m for m in layers if isinstance(m, LowRankLinear)]
    rlrr = [m for m in layers if isinstance(m, RLRRLinear)]

    def build() -> list[torch.Tensor]:
        outs: list[torch.Tensor] = []
        for m in low_rank:
            outs.extend(m.factors())
        with torch.no_grad():
            for r in rlrr:
                outs.append(r.merge_weight(r.base_layer.weight))
        return outs

    outs = build()
    sync = device_sync(layers[0].base_layer.weight.device)  # CUDA runs asynchronously: time kernels, not launches
    grads = [torch.randn_like(t) for t in outs if t.requires_grad]
    rlrr_grads = [torch.randn_like(m.base_layer.weight) for m in rlrr]
    params = [p for m in layers for p in m.adapter_parameters()]
    fwd, total = [], []
    for _ in range(reps + 1):
        for p in params:
            p.grad = None
        sync()
        t0 = time.perf_counter()
        outs = build()
        sync()
        t1 = time.perf_counter()
        if grads:
            torch.autograd.backward([t for t in outs if t.requires_grad], grads)
        with torch.no_grad():
            for m, g in zip(rlrr, rlrr_grads, strict=True):
                rescale_vector_grads(g.clone(), m.base_layer.weight, m.s_row, m.s_col, m.col_groups)
        sync()
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        total.append(t2 - t0)
    for p in params:
        p.grad = None
    return {
        "layers": len(layers),
        "forward_ms": 1e3 * float(np.median(fwd[1:])),
        "forward_backward_ms": 1e3 * float(np.median(total[1:])),
    }


def _rss_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def memory_worker(
    spec: ModelSpec, method: str, batch: int, steps: int, threads: int, device: str, seed: int, amp: str = "off"
) -> dict[str, Any]:
    """Runs in a fresh process: peak memory (and an isolated step time) of ``steps`` training steps of ``method``."""
    import resource

    torch.set_num_threads(threads)
    dev = torch.device(device)
    setup = train_setup(spec, method, batch=batch, device=dev, seed=seed, amp=amp)
    out: dict[str, Any] = {"method": method}
    params = [p for p in setup.model.parameters() if p.requires_grad]
    out["param_bytes"] = sum(p.numel() * p.element_size() for p in setup.model.parameters())
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base_kib = _rss_kib("VmRSS")
        reset = _reset_peak_rss()
    times = []
    for _ in range(max(1, steps) + 1):
        t0 = time.perf_counter()
        setup.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev)
        out.update(
            memory_kind="torch.cuda.max_memory_allocated",
            peak_bytes=peak,
            baseline_bytes=base,
            peak_delta_bytes=peak - base,
        )
    else:
        hwm = _rss_kib("VmHWM") if reset else None
        if hwm is None:  # no /proc reset: ru_maxrss covers set-up too (an upper bound)
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        mmap = os.environ.get("MALLOC_MMAP_THRESHOLD_") == MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]
        kind = "peak RSS, reset after set-up" if reset else "ru_maxrss (includes set-up)"
        kind += ", own process" + (", malloc mmap threshold 64 KiB" if mmap else "")
        out.update(
            memory_kind=kind,
            peak_bytes=hwm * 1024,
            baseline_bytes=(base_kib or 0) * 1024,
            peak_delta_bytes=(hwm - (base_kib or 0)) * 1024,
        )
    out["optimizer_state_bytes"] = optimizer_state_bytes(setup.optimizer)
    out["grad_bytes"] = sum(p.numel() * p.element_size() for p in params)
    out["isolated_step_s"] = times[1:] or times  # the first step allocates the optimizer state: not timed
    return out


# glibc malloc in the memory worker: every block >= 64 KiB is its own mmap, returned to the OS when freed, and the
# threshold never adapts. RSS then follows the live tensors (repeat runs agree to ~0.1 MiB instead of ~20 MiB).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def run_memory_worker(isolate: bool, spec: ModelSpec, *args: Any) -> dict[str, Any]:
    """:func:`memory_worker` in a fresh Python process (``isolate``), so no other method's peak is in its RSS.

    A plain subprocess (``python -c``) rather than multiprocessing: spawn would re-import the caller's __main__.
    Arguments go in and the result comes back as JSON files.
    """
    if not isolate:
        return memory_worker(spec, *args)
    import json
    import subprocess
    import sys

    with tempfile.TemporaryDirectory(prefix="peftx-bench-worker-") as tmp:
        src, dst = Path(tmp) / "args.json", Path(tmp) / "result.json"
        src.write_text(json.dumps({"spec": asdict(spec), "args": list(args)}))
        code = "from peftx.bench.suites.training import memory_worker_main; memory_worker_main()"
        proc = subprocess.run(
            [sys.executable, "-c", code, str(src), str(dst)],
            capture_output=True,
            text=True,
            env={**os.environ, **MALLOC_ENV},
        )
        if proc.returncode != 0 or not dst.exists():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"the memory worker for {args[0]!r} failed (exit {proc.returncode}): {tail[0]}")
        return json.loads(dst.read_text())


def memory_worker_main() -> None:
    """Entry point of the isolated worker: argv = [args.json, result.json]."""
    import json
    import sys

    data = json.loads(Path(sys.argv[1]).read_text())
    spec_d = data["spec"]
    spec_d["kwargs"] = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in spec_d["kwargs"])
    result = memory_worker(ModelSpec(**spec_d), *data["args"])
    Path(sys.argv[2]).write_text(json.dumps(result))


def bench_training(
    spec: ModelSpec, cfg: BenchConfig, *, threads: int, device: torch.device, progress: Progress
) -> dict[str, Any]:
    """Full fine-tuning vs each adapter on one backbone and batch: step time, FLOPs, memory, optimizer state."""
    say = progress
    methods = list(cfg.train_methods)
    say(f"{spec.key} training: building {', '.join(methods)}")
    setups = {
        m: train_setup(spec, m, batch=cfg.train_batch, device=device, seed=cfg.seed, amp=cfg.train_amp) for m in methods
    }
    any_setup = next(iter(setups.values()))
    precision = (
        "FP32"
        if cfg.train_amp == "off"
        else f"{cfg.train_amp} autocast" + (" + GradScaler" if cfg.train_amp == "fp16" else "")
    )
    out: dict[str, Any] = {
        "model": spec.key,
        "label": spec.label,
        "batch": cfg.train_batch,
        "img_size": list(any_setup.x.shape[-2:]),
        "rows": [],
        "ratios": [],
        "settings": f"{precision}, timm fused (SDPA) attention on as in peftx's trainer, AdamW "
        "(torch default implementation) over the trainable tensors only",
    }
    step_flops = {m: count_step_flops(s.forward_backward, cfg.train_batch) for m, s in setups.items()}
    say(f"{spec.key} training: timing {len(methods)} methods interleaved")
    timing = timed_rounds(
        {m: s.step for m, s in setups.items()},
        warmup=cfg.train_warmup,
        min_rounds=cfg.train_rounds,
        max_rounds=max(cfg.train_rounds, 20),
        budget_s=cfg.train_budget_s,
        sync=device_sync(device),
        seed=cfg.seed,
        guard=contention_guard(cfg.discard_contended, threads, device),
    )
    times = timing.times
    out["timing"] = timing.to_json()
    deltas = {m: delta_cost(s.model, reps=cfg.delta_reps) for m, s in setups.items() if m not in TRAIN_BASELINES}
    opt_state = {m: optimizer_state_bytes(s.optimizer) for m, s in setups.items()}
    info = {m: (s.trainable, s.total) for m, s in setups.items()}
    del setups, any_setup
    memory = {}
    for m in methods:
        say(f"{spec.key} training: peak memory of {m} ({'own process' if cfg.isolate_memory else 'in process'})")
        memory[m] = run_memory_worker(
            cfg.isolate_memory,
            spec,
            m,
            cfg.train_batch,
            cfg.memory_steps,
            threads,
            str(device),
            cfg.seed,
            cfg.train_amp,
        )
    for m in methods:
        st = latency_stats(times[m], cfg.train_batch, None)
        mem = memory[m]
        out["rows"].append(
            {
                "model": spec.key,
                "method": m,
                "trainable_params": info[m][0],
                "total_params": info[m][1],
                "step_ms_p50": st["p50_ms"],
                "step_ms_p90": st["p90_ms"],
                "n": st["n"],
                "images_per_s": st["images_per_s"],
                "step_gflop_per_image": step_flops[m] / 1e9,
                "achieved_gflops": step_flops[m] * cfg.train_batch / (st["p50_ms"] / 1e3) / 1e9,
                "peak_bytes": mem["peak_bytes"],
                "peak_delta_bytes": mem["peak_delta_bytes"],
                "memory_kind": mem["memory_kind"],
                "optimizer_state_bytes": opt_state[m],
                "grad_bytes": mem["grad_bytes"],
                # slower than step_ms: the worker's malloc mmaps every large block, so each step page-faults afresh
                "isolated_step_ms_mmap_malloc": 1e3 * float(np.median(mem["isolated_step_s"])),
                "delta_cost": deltas.get(m),
                "times_ms": [round(1e3 * t, 2) for t in times[m]],
            }
        )
    if "full" in times:
        full_mem = memory["full"]["peak_delta_bytes"]
        for m in methods:
            if m == "full":
                continue
            r = paired_ratio(times[m], times["full"])
            target = m in ("rlrr", "aoft")
            out["ratios"].append(
                {
                    "model": spec.key,
                    "method": m,
                    "step_time_vs_full": r,
                    "step_time_vs_full_of_mins": min_ratio(times[m], times["full"]),
                    "step_time_vs_frozen": (paired_ratio(times[m], times["frozen"]) if "frozen" in times else None),
                    "peak_memory_vs_full": memory[m]["peak_delta_bytes"] / max(full_mem, 1),
                    "targeted": target,
                    "step_time_met": bool(r <= 1.0) if target else None,
                    "memory_met": bool(memory[m]["peak_delta_bytes"] < full_mem) if target else None,
                }
            )
    return out
