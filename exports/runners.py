"""Backends as runners (Polygraphy-style): context managers with ``infer(batch: np.ndarray) -> np.ndarray``.

Every runner takes an FP32 NCHW batch and returns FP32 outputs, so one comparator can hold any two of them side by
side. Optional backends import lazily; ``TensorRTRunner`` lives in ``tensorrt.py`` and is re-exported here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from peftx.errors import ExportError, UsageError

from .tensorrt import TensorRTRunner

__all__ = ["OnnxRuntimeRunner", "Runner", "TensorRTRunner", "TorchRunner"]


@runtime_checkable
class Runner(Protocol):
    name: str

    def __enter__(self) -> Runner: ...

    def __exit__(self, *exc: object) -> None: ...

    def infer(self, batch: np.ndarray) -> np.ndarray: ...


class TorchRunner:
    """A PyTorch module in inference mode (the unmerged reference, or the merged model)."""

    def __init__(self, module: torch.nn.Module, *, name: str = "pytorch", device: str | torch.device = "cpu"):
        if module.training:
            # Dropout/drop-path in training mode would make every comparison random.
            raise UsageError(f"{name}: the module is in training mode", "call .eval() before comparing")
        self.name, self.module, self.device = name, module, torch.device(device)

    def __enter__(self) -> TorchRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def infer(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            return self.module(x).float().cpu().numpy()


class OnnxRuntimeRunner:
    """An ONNX Runtime session; the session is created on first use (or on entering) and dropped on exit.

    ``session_options``: an ``onnxruntime.SessionOptions`` (threads, graph optimisation level, ...); None gives ONNX
    Runtime's defaults with errors-only logging. The benchmarks pass theirs, so they time this same runner.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        providers: tuple[str, ...] = ("CPUExecutionProvider",),
        name: str | None = None,
        session_options: Any = None,
        optimize: bool = True,
    ):
        # optimize=False runs the graph as written: ONNX Runtime's optimizer would fuse a decomposed LayerNorm back
        # into its own kernel, hiding how the decomposed graph computes (the form TensorRT 8.5 receives).
        self.path, self.providers, self.optimize = Path(path), tuple(providers), optimize
        self.name = name or f"onnxruntime:{self.path.name}"
        self.session_options = session_options
        self._session: Any = None  # an onnxruntime.InferenceSession, opened on first use
        self._input = ""

    def __enter__(self) -> OnnxRuntimeRunner:
        self._open()
        return self

    def __exit__(self, *exc: object) -> None:
        self._session = None

    def infer(self, batch: np.ndarray) -> np.ndarray:
        session = self._open()
        feed = {self._input: np.ascontiguousarray(batch, dtype=np.float32)}
        return np.asarray(session.run(None, feed)[0], dtype=np.float32)

    def _open(self) -> Any:
        if self._session is None:
            import onnxruntime as ort

            options = self.session_options
            if options is None:
                options = ort.SessionOptions()
                options.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are noise here
            if not self.optimize:
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            try:
                self._session = ort.InferenceSession(str(self.path), options, providers=list(self.providers))
            except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
                raise ExportError(
                    f"ONNX Runtime cannot load {self.path.name}: {exc}", "re-export the model; check its opset and ops"
                ) from exc
            self._input = self._session.get_inputs()[0].name
        return self._session
