"""A comparison as text (one table that fits 100 columns, failures and notes below it) and as a PNG chart."""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .fsutil import atomic_path

WIDTH = 100
_LR_SOURCE = {"set": "set", "shared": "all", "recipe x method": "rec*", "recipe": "rec"}
# (header, right-aligned): numbers right-aligned; rich sizes the columns to fit WIDTH.
_COLUMNS = (
    ("method", False),
    ("test %", True),
    ("epoch", True),
    ("lr", False),  # "1e-05 rec*"
    ("trainable", True),
    ("adapter", True),
    ("train s", True),
    ("img/s", True),
    ("peak MB", True),
    ("note", False),
)


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def human_bytes(n: int | None) -> str:
    if n is None or not _num(n):
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}" if n < 100 * size else f"{n / size:.0f} {unit}"
    return f"{n} B"


def _pct(x: Any, digits: int = 2) -> str:
    return f"{100 * x:.{digits}f}" if _num(x) else "-"


def _accuracy(entry: dict[str, Any]) -> str:
    if not _num(entry.get("test_accuracy")):
        return "-"
    text = _pct(entry["test_accuracy"])
    if _num(entry.get("test_accuracy_sd")):
        text += f" ± {100 * entry['test_accuracy_sd']:.2f}"
    return text


def _epochs(entry: dict[str, Any]) -> str:
    best = [e for e in entry.get("best_epochs") or [] if e is not None]
    if not best:
        return "-"
    sel = str(best[0]) if min(best) == max(best) else f"{min(best)}-{max(best)}"
    return f"{sel}/{entry.get('epochs')}"


def _lr(entry: dict[str, Any]) -> str:
    if not _num(entry.get("lr")):
        return "-"
    return f"{entry['lr']:.0e} {_LR_SOURCE.get(entry.get('lr_source') or '', '')}".strip()


def method_cells(entry: dict[str, Any], note: str) -> list[str]:
    failed = not entry.get("ok")
    acc = "failed" if failed else _accuracy(entry)
    return [
        entry["method"],
        acc,
        _epochs(entry),
        _lr(entry),
        f"{entry['trainable_params']:,}" if _num(entry.get("trainable_params")) else "-",
        human_bytes(entry.get("adapter_bytes")),
        f"{entry['train_seconds']:.0f}" if _num(entry.get("train_seconds")) else "-",
        f"{entry['img_per_s']:.1f}" if _num(entry.get("img_per_s")) else "-",
        f"{entry['peak_memory_mb']:,.0f}" if _num(entry.get("peak_memory_mb")) else "-",
        note,
    ]


def _render(table: Table) -> list[str]:
    """A rich table as plain text lines, at most WIDTH characters (cells fold, never cut)."""
    buf = io.StringIO()
    Console(file=buf, width=WIDTH, color_system=None, highlight=False).print(table)
    return [line.rstrip() for line in buf.getvalue().splitlines()]


def _wrap(text: str, indent: str = "    ") -> list[str]:
    return textwrap.wrap(text, WIDTH, subsequent_indent=indent, break_long_words=True, break_on_hyphens=False)


def _title(result: dict[str, Any]) -> list[str]:
    s = result.get("shared") or {}
    data = str(s.get("data") or "?")
    name = data if data.lower() in ("demo", "digits") else (Path(data).name or data)
    seeds = result.get("seeds") or []
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}..{seeds[-1]} ({len(seeds)})"
    head = (
        f"peftx compare: {name} on {s.get('model') or '?'}, {s.get('img_size') or '?'} px, "
        f"{s.get('epochs') or '?'} epochs x {s.get('steps_per_epoch') or '?'} steps, batch "
        f"{s.get('batch_size') or '?'}, {seed_text}, {s.get('test_images') or '?'} test images"
    )
    lines = _wrap(head)
    lines += _wrap(
        "Every method: the same data, split, data order, augmentation and schedule. Test accuracy at the "
        "epoch selected on validation (never on test)."
    )
    return lines


def _latency_lines(latency: dict[str, Any] | None) -> list[str]:
    if not latency or not latency.get("graphs"):
        return []
    lines = []
    graphs = latency["graphs"]
    for g in graphs:
        times = ", ".join(
            f"{t['median_ms']:.1f} ms at batch {t['batch']} ({t['img_per_s']:.0f} img/s)" for t in g["timings"]
        )
        who = (
            "every method above merges into this graph"
            if len(graphs) == 1
            else f"{len(g['runs'])} run(s) merge into this graph"
        )
        lines += _wrap(
            f"Merged model: {times}; {latency['backend']} on {latency['device']}, {latency['threads']} "
            f"thread(s). Measured once: {who} (a plain timm {g['class']}, the same keys and shapes), so "
            "it has no per-method latency."
        )
    for p in latency.get("problems") or []:
        lines += _wrap(f"  not merged: {p['run_dir']}: {p['reason']}")
    return lines


def format_table(result: dict[str, Any]) -> str:
    """The comparison as text, every line at most WIDTH characters."""
    summary = result.get("summary") or []
    lines = _title(result) + [""]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for header, right in _COLUMNS:
        table.add_column(Text(header), justify="right" if right else "left", overflow="fold")
    footnotes: list[str] = []
    for entry in summary:
        note = ""
        if entry.get("failures"):
            footnotes.append(entry["method"])
            mark = f"[{len(footnotes)}]"
            note = mark if not entry.get("ok") else f"{entry['ok']}/{entry['runs']} ok {mark}"
        table.add_row(*(Text(c) for c in method_cells(entry, note)))
    lines += _render(table)
    lines.append("")
    n = 0
    for entry in summary:
        if not entry.get("failures"):
            continue
        n += 1
        for f in entry["failures"]:
            what = f"{entry['method']} seed {f['seed']}: {f['status']}"
            lines += _wrap(f"[{n}] {what}: {f.get('reason') or 'no reason recorded'}")
    seeds = result.get("seeds") or []
    if len(seeds) > 1:
        lines += _wrap(
            f"± = sample standard deviation over the {len(seeds)} seeds (each seed: its own split for "
            "'demo', its own init and data order); min and max per method in compare.json."
        )
    lines += _wrap(
        "lr: rec = the recipe's, rec* = the recipe's x the method's recipe_lr_scale (full: 0.01), all = --lr for "
        "every method, set = --set METHOD.lr, def = the method's own default. adapter = adapter.safetensors (full: "
        "the whole model)."
    )
    baselines = [e.get("baseline_rss_mb") for e in summary if _num(e.get("baseline_rss_mb"))]
    kinds = {e.get("peak_memory_kind") for e in summary if e.get("peak_memory_kind")}
    if "cpu_max_rss" in kinds and baselines:
        lines += _wrap(
            f"peak MB: the training process's max RSS, of which ~{min(baselines):,.0f} MB is Python with "
            "torch loaded (each run has its own process)."
        )
    elif "cuda_max_allocated" in kinds:
        lines += _wrap("peak MB: torch.cuda.max_memory_allocated of the run.")
    lines += _latency_lines(result.get("latency"))
    diff = result.get("differing_fields") or []
    if diff:
        lines += _wrap(f"WARNING: the runs also differ in {', '.join(diff)}: not a like-for-like comparison.")
    out = result.get("output")
    if out:
        first = next((r["run_dir"] for r in result.get("runs") or [] if r.get("status") == "ok"), None)
        example = f" (e.g. peftx merge-export {first})" if first else ""
        lines += _wrap(f"Runs: {out}/<method>/seed<S>{example}; {out}/compare.json, {out}/compare.png.")
    return "\n".join(lines)


def plot_compare(result: dict[str, Any], path: str | Path) -> Path:
    """Two panels: test accuracy per method (bars, ± sd over seeds; failed methods marked), and test accuracy
    against trainable parameters (log scale). Agg canvas, no pyplot (as peftx.plotting)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    summary = result.get("summary") or []
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_bar, ax_sc = fig.subplots(1, 2)
    names = [e["method"] for e in summary]
    acc = [100 * e["test_accuracy"] if _num(e.get("test_accuracy")) else 0.0 for e in summary]
    err = [100 * e["test_accuracy_sd"] if _num(e.get("test_accuracy_sd")) else 0.0 for e in summary]
    bars = ax_bar.bar(names, acc, yerr=err, capsize=4, color="tab:blue")
    for bar, e in zip(bars, summary, strict=True):
        label = "failed" if not e.get("ok") else f"{100 * e['test_accuracy']:.1f}"
        ax_bar.annotate(
            label,
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
            color="tab:red" if not e.get("ok") else "black",
        )
    ax_bar.set(ylabel="test accuracy (%)", title="test accuracy at the val-selected epoch", ylim=(0, 105))
    for e in summary:
        if e.get("ok") and _num(e.get("trainable_params")) and _num(e.get("test_accuracy")):
            x, y = e["trainable_params"], 100 * e["test_accuracy"]
            ax_sc.errorbar(
                [x],
                [y],
                yerr=[100 * e["test_accuracy_sd"]] if _num(e.get("test_accuracy_sd")) else None,
                fmt="o",
                capsize=3,
            )
            secs = f", {e['train_seconds']:.0f} s" if _num(e.get("train_seconds")) else ""
            ax_sc.annotate(f"{e['method']}{secs}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax_sc.set_xscale("log")
    ax_sc.set(xlabel="trainable parameters", ylabel="test accuracy (%)", title="accuracy vs trainable parameters")
    for ax in (ax_bar, ax_sc):
        ax.grid(alpha=0.3)
    s = result.get("shared") or {}
    fig.suptitle(f"{Path(str(s.get('data') or '')).name or s.get('data')} on {s.get('model')}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
