"""Optional onnxslim pass (pure-Python graph simplifier): folds the exporter's shape arithmetic and Identity nodes.

The pass is a candidate only: the caller keeps the simplified graph if and only if it passes the same parity checks as
the original. onnxslim is imported lazily; when it is missing the pass is skipped with a reason, never an ImportError.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx

from . import onnx_io
from .onnx_export import op_histogram


@dataclass
class SimplifyResult:
    applied: bool
    reason: str
    nodes_before: int = 0
    nodes_after: int = 0
    removed_ops: dict[str, int] = field(default_factory=dict)  # op type -> nodes removed (negative: added)

    def to_json(self) -> dict:
        return {
            "applied": self.applied,
            "reason": self.reason,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "removed_ops": self.removed_ops,
        }


def simplify_onnx(src: str | Path, dst: str | Path) -> SimplifyResult:
    """Write an onnxslim-simplified copy of ``src`` to ``dst``; metadata_props are preserved and the copy is checked."""
    try:
        import onnxslim
    except ImportError:
        return SimplifyResult(False, "onnxslim is not installed (pip install onnxslim); graph left as exported")
    src, dst = Path(src), Path(dst)
    model = onnx_io.load(src)
    props = {p.key: p.value for p in model.metadata_props}
    try:
        slim = onnxslim.slim(model)
        onnx.helper.set_model_props(slim, props)
        onnx_io.save(slim, dst)
        onnx_io.check(dst)
    except Exception as exc:  # noqa: BLE001 - a failed optional pass is reported, the original graph is kept
        for leftover in (dst, dst.with_name(onnx_io.data_file_name(dst))):
            leftover.unlink(missing_ok=True)
        return SimplifyResult(False, f"onnxslim failed: {type(exc).__name__}: {exc}")
    before, after = op_histogram(src), op_histogram(dst)
    removed = {op: before.get(op, 0) - after.get(op, 0) for op in sorted(set(before) | set(after))}
    return SimplifyResult(
        True,
        f"onnxslim {getattr(onnxslim, '__version__', '?')}",
        sum(before.values()),
        sum(after.values()),
        {op: n for op, n in removed.items() if n},
    )
