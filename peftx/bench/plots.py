"""bench.png: inference latency per variant, training step time and peak memory."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def plot_results(results: Mapping[str, Any], path: str | Path) -> bool:
    """A PNG: inference p50 latency per variant (one panel per model x batch), training step time and peak memory.

    Returns False when there is nothing to plot.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(m, b) for m in results.get("inference", []) for b in sorted({r["batch"] for r in m["rows"]})]
    train = results.get("training", [])
    n = len(panels) + 2 * len(train)
    if n == 0:
        return False
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig = Figure(figsize=(5.2 * cols, 3.6 * nrows), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    colors = {"eager": "tab:blue", "ort": "tab:orange", "ort-fused": "tab:green", "trt": "tab:red"}
    i = 0
    for model, batch in panels:
        ax = axes[i]
        i += 1
        rows = [r for r in model["rows"] if r["batch"] == batch]
        labels = [f"{r['backend']}\n{r['variant']}" for r in rows]
        ax.bar(
            range(len(rows)),
            [r["p50_ms"] for r in rows],
            color=[colors.get(r["backend"], "grey") for r in rows],
            hatch=None,
        )
        for j, r in enumerate(rows):
            if not r["valid"]:
                ax.text(j, r["p50_ms"], "invalid", ha="center", va="bottom", fontsize=7, color="red")
            pct = r.get("pct_peak")
            if pct is not None:
                ax.text(j, r["p50_ms"] / 2, f"{pct:.0f}%", ha="center", va="center", fontsize=7, color="white")
        ax.set_xticks(range(len(rows)), labels, rotation=60, fontsize=6.5)
        ax.set(ylabel="p50 latency (ms)", title=f"{model['model']} batch {batch} (label: % of matmul peak)")
        ax.grid(axis="y", alpha=0.3)
    for model in train:
        rows = model["rows"]
        names = [r["method"] for r in rows]
        ax = axes[i]
        i += 1
        ax.bar(names, [r["step_ms_p50"] for r in rows], color="tab:purple")
        ax.set(ylabel="step time p50 (ms)", title=f"{model['model']} training step, batch {model['batch']}")
        ax.grid(axis="y", alpha=0.3)
        ax = axes[i]
        i += 1
        ax.bar(names, [r["peak_delta_bytes"] / 2**20 for r in rows], color="tab:brown", label="peak Δ")
        ax.bar(names, [r["optimizer_state_bytes"] / 2**20 for r in rows], color="tab:gray", label="AdamW state")
        ax.set(ylabel="MiB", title=f"{model['model']} training peak memory")
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[i:]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    return True
