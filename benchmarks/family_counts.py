"""Trainable parameters per model family and method at the real sizes, as ``peftx inspect MODEL --method M`` counts
them (``peftx.summary.inspect_model``: random weights, 10 classes, each method's default options).

    python benchmarks/family_counts.py [--models vit_base_patch16_dinov3,...] [--output DIR]

Prints a markdown table (adapter parameters, without the head, and the head) and writes family_counts.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MODELS = (
    "vit_base_patch16_224",
    "deit_base_distilled_patch16_224",
    "vit_base_patch16_dinov3",
    "vit_base_patch16_dinov3_qkvb",
    "eva02_base_patch14_224",
    "vit_pe_core_base_patch16_224",
    "vit_base_patch16_rope_224",
    "beitv2_base_patch16_224",
    "swinv2_tiny_window8_256",
)
METHODS = ("rlrr", "aoft", "lora", "linear", "full")


def main() -> None:
    import torch

    from peftx.summary import inspect_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--output", default="benchmarks/out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    print("| model | family | " + " | ".join(METHODS) + " | head | total |")
    print("|---|---|" + "---:|" * (len(METHODS) + 2))
    for name in args.models.split(","):
        cells, info = [], None
        for method in METHODS:
            info = inspect_model(name, method, num_classes=10)
            rows.append(info)
            cells.append(f"{info['adapter_params']:,}" if method != "full" else f"{info['trainable_params']:,}")
        assert info is not None
        print(
            f"| `{name}` | {info['family']} | " + " | ".join(cells) + f" | {info['head_params']:,} | "
            f"{info['total_params']:,} |",
            flush=True,
        )
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "family_counts.json").write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
