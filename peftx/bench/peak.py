"""The matmul (sgemm) peak measured in the same run: the denominator of every '% of peak'."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from .config import MATMUL_N
from .machine import device_sync
from .ort import ort_session_options


def matmul_peak(
    n: int = MATMUL_N,
    *,
    reps: int = 10,
    warmup: int = 3,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Best-of-``reps`` GFLOP/s of an n x n x n GEMM (torch.mm into a preallocated output); TF32 off on CUDA."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen, dtype=dtype).to(device)
    b = torch.randn(n, n, generator=gen, dtype=dtype).to(device)
    c = torch.empty(n, n, dtype=dtype, device=device)
    sync = device_sync(device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for _ in range(warmup):
            torch.mm(a, b, out=c)
        sync()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            sync()
            times.append(time.perf_counter() - t0)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    flop = 2.0 * n**3
    return {
        "backend": f"torch.mm ({device.type})",
        "n": n,
        "dtype": str(dtype).replace("torch.", ""),
        "reps": reps,
        "gflops": flop / min(times) / 1e9,
        "median_gflops": flop / float(np.median(times)) / 1e9,
    }


def ort_matmul_peak(n: int = MATMUL_N, *, reps: int = 10, warmup: int = 3, threads: int = 1) -> dict[str, Any]:
    """The same GEMM as one ONNX MatMul node under ONNX Runtime's CPU provider (MLAS): its own sgemm ceiling."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["C"])],
        "sgemm",
        [
            helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n]),
            helper.make_tensor_value_info("B", TensorProto.FLOAT, [n, n]),
        ],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # opset 17's IR: onnx 1.23 writes 14 by default, ONNX Runtime 1.30 reads at most 13
    session = ort.InferenceSession(
        model.SerializeToString(), ort_session_options(threads), providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(0)
    feed = {"A": rng.standard_normal((n, n), dtype=np.float32), "B": rng.standard_normal((n, n), dtype=np.float32)}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    flop = 2.0 * n**3
    return {
        "backend": "onnxruntime MatMul (MLAS)",
        "n": n,
        "dtype": "float32",
        "reps": reps,
        "gflops": flop / min(times) / 1e9,
        "median_gflops": flop / float(np.median(times)) / 1e9,
    }
