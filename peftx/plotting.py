"""Training curves as a PNG: loss (train, val) and validation accuracy per epoch.

Uses matplotlib's object API with the Agg canvas directly, never pyplot: no global backend switch, no GUI, safe in
threads and on headless machines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .fsutil import atomic_path


def plot_curves(history: Sequence[dict[str, Any]], path: str | Path, *, title: str | None = None,
                best_epoch: int | None = None) -> Path:
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
