"""Training curves as a PNG: loss (train, val) and validation accuracy per epoch.

Uses matplotlib's object API with the Agg canvas directly, never pyplot: no global backend switch, no GUI, safe in
threads and on headless machines.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .fsutil import atomic_path


def plot_curves(
    history: Sequence[dict[str, Any]], path: str | Path, *, title: str | None = None, best_epoch: int | None = None
) -> Path:
    """Write ``history`` (metrics.jsonl records) to ``path`` as a two-panel PNG, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(9, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], marker="o", label="val")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [100.0 * r["val_accuracy"] for r in history], marker="o", color="tab:green", label="val")
    if best_epoch is not None:
        ax_acc.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"selected (epoch {best_epoch})")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="validation accuracy")
    ax_acc.legend(loc="lower right")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


CONFUSION_ANNOTATE_MAX = 20  # classes up to which every cell shows its count
CONFUSION_LABELS_MAX = 100  # classes up to which every row and column is labelled; above, the labels are left out


def plot_confusion(
    counts: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path, *, title: str | None = None
) -> Path:
    """The confusion matrix as a PNG, atomically: rows true class, columns predicted, coloured by the share of the
    row (so a small class reads as clearly as a large one). Up to 20 classes each cell shows its count; up to 100
    every row and column is labelled (names cut to 14 characters); above 100 the labels are left out and the title
    says so (the numbers are in the JSON). The figure grows with the class count, 4 to 12 inches a side."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = np.asarray(counts, dtype=np.float64)
    c = m.shape[0]
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    side = float(np.clip(3.0 + 0.09 * c, 4.0, 12.0))
    fig = Figure(figsize=(side + 1.2, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set(xlabel="predicted class", ylabel="true class")
    if c <= CONFUSION_LABELS_MAX:
        labels = [str(n) if len(str(n)) <= 14 else str(n)[:13] + "…" for n in class_names]
        size = 9 if c <= 20 else 7 if c <= 50 else 5
        ax.set_xticks(range(c), labels, rotation=90, fontsize=size)
        ax.set_yticks(range(c), labels, fontsize=size)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if c <= CONFUSION_ANNOTATE_MAX:
        for i in range(c):
            for j in range(c):
                if m[i, j]:
                    ax.text(
                        j,
                        i,
                        f"{int(m[i, j])}",
                        ha="center",
                        va="center",
                        fontsize=8 if c <= 10 else 6,
                        color="white" if share[i, j] > 0.5 else "black",
                    )
    import textwrap

    lines = [title or "confusion matrix"]
    if c > CONFUSION_LABELS_MAX:
        lines.append(f"{c} classes: labels left out above {CONFUSION_LABELS_MAX} (per-class numbers in the JSON)")
    chars = int(side * 11)  # about what fits above the matrix at 10 pt
    ax.set_title("\n".join(textwrap.fill(line, chars) for line in lines), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
