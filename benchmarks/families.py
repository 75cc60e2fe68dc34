"""Model families x deployment targets x precisions: which bundles peftx builds and validates, measured here.

    python benchmarks/families.py [--families dinov3,swinv2] [--targets trt8.5,trt8.6] [--method rlrr] [--output DIR]

For each family (a tiny RANDOM-init config of the real timm class: structure, not weights, decides what exports):
adapt with ``--method``, make every adapter tensor non-trivial, ``merge_and_unload`` to the plain timm class, and
write one INT8 bundle per export form through ``peftx.exports.bundle.write_bundle`` (TensorRT off: none here). An
INT8 bundle holds model.onnx (FP32), model_fp16.onnx and model_int8.onnx, each checked by the bundle's own gates:
ONNX Runtime parity against the UNMERGED model (FP32, FP16 tolerances), and the accuracy gate on real photo crops
labelled with the unmerged model's own top-1 (so the reference scores 100 % and an artifact's accuracy is its
agreement), INT8 with its sensitivity fallback. trt8.5 (JetPack 5) exports at opset 16 with LayerNorm decomposed;
trt8.6 / trt10 / trt11 share the opset-17 graph, so it is exported once (as trt8.6) and its shipped files are
checked against every newer target's parser op list (``check_target_readiness``).

A cell is "ok" when the artifact passed its gate AND the target's readiness check found no problem; otherwise the
first problem is printed. Writes families.json (every figure) to ``--output``.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

_E = dict(img_size=32, depth=2, embed_dim=64, num_heads=2)
# family -> (timm model name, kwargs): tiny configs of each class and variant peftx adapts. init_values=1.0 keeps
# layer scale from hiding the blocks (timm's 1e-5 would make every adapter invisible in random weights).
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "vit": ("vit_small_patch16_224", dict(_E)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(_E)),
    "dinov3": ("vit_small_patch16_dinov3", dict(_E, init_values=1.0)),
    "dinov3_swiglu": ("vit_small_plus_patch16_dinov3", dict(_E, init_values=1.0)),
    "eva02": ("eva02_tiny_patch14_224", dict(_E, img_size=28)),
    "eva02_qkv_split": ("eva02_base_patch14_224", dict(_E, img_size=28)),
    "pe_core": ("vit_pe_core_tiny_patch16_384", dict(_E)),
    "rope_vit": ("vit_small_patch16_rope_224", dict(_E, init_values=1.0)),
    "rope_vit_mixed": ("vit_small_patch16_rope_mixed_224", dict(_E, init_values=1.0)),
    "rope_vit_rmsnorm": ("vit_small_patch16_rope_224", dict(_E, init_values=1.0, norm_layer="rmsnorm")),
    "beit": ("beitv2_base_patch16_224", dict(_E, init_values=1.0)),
    "swinv2": (
        "swinv2_tiny_window8_256",
        dict(img_size=64, window_size=4, embed_dim=24, depths=(1, 1), num_heads=(1, 2)),
    ),
}
NUM_CLASSES = 5


def make_family(family: str, seed: int = 0) -> torch.nn.Module:
    """The tiny random-init timm model of ``family``; Swin V2's post-norm weights are set to 1 (timm initialises
    them to 0, which zeroes every block's branch in a random model and so hides any adapter)."""
    import timm
    from timm.layers import RmsNorm

    name, kw = FAMILIES[family]
    kw = dict(kw)
    if kw.get("norm_layer") == "rmsnorm":
        kw["norm_layer"] = partial(RmsNorm, eps=1e-6)
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, exportable=True, **kw).eval()
    if family.startswith("swinv2"):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".norm1." in n or ".norm2." in n:
                    p.fill_(1.0) if n.endswith("weight") else p.zero_()
    return model


def data_cfg(family: str) -> dict[str, Any]:
    s = FAMILIES[family][1]["img_size"]
    return {
        "input_size": (3, s, s),
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "crop_pct": 1.0,
        "crop_mode": "center",
    }


def adapted_pair(family: str, method: str) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, Any]]:
    """(unmerged adapted model, merged plain timm model, facts): every trainable tensor perturbed (non-trivial)."""
    from peftx.adapter import adapt, count_parameters, merge_and_unload, state_of
    from peftx.methods import make_config

    model = adapt(make_family(family), make_config(method))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    model.eval()
    trainable, total = count_parameters(model)
    merged = merge_and_unload(model).eval()
    facts = {
        "class": type(merged).__name__,
        "trainable": trainable,
        "total": total,
        "notes": list(state_of(model).notes),
    }
    return model, merged, facts


def _labelled(model: torch.nn.Module, family: str, n: int, seed: int):
    """Real photo crops labelled with the unmerged model's own top-1."""
    from peftx.data import InMemoryImageDataset, sample_photos
    from peftx.preprocess import eval_transform

    rng = np.random.default_rng(seed)
    photos, crops = sample_photos(), []
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.3, 0.9)), int(h * rng.uniform(0.3, 0.9))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crops.append(photo.crop((left, top, left + cw, top + ch)).convert("RGB"))
    dataset = InMemoryImageDataset(crops, [0] * n, eval_transform(data_cfg(family)))
    with torch.no_grad():
        pred = model(torch.stack([dataset[i][0] for i in range(n)])).argmax(1)
    dataset.labels = [int(p) for p in pred]
    return dataset


def bundle_cells(family: str, method: str, target: str, out: Path, accuracy_n: int = 120) -> dict[str, Any]:
    """One INT8 bundle for ``target``; per precision: parity / accuracy verdicts and readiness per target."""
    from peftx.data import real_images
    from peftx.errors import PeftxError
    from peftx.exports import int8
    from peftx.exports.accuracy import select
    from peftx.exports.bundle import write_bundle

    model, merged, facts = adapted_pair(family, method)
    cfg = data_cfg(family)
    labelled = _labelled(model, family, accuracy_n, seed=1)
    calib = int8.select_calibration(labelled, labelled.targets, 48, 0, "calibration crops")
    started = time.perf_counter()
    row: dict[str, Any] = {"family": family, "model": FAMILIES[family][0], "method": method, "target": target}
    row.update(facts)
    try:
        report = write_bundle(
            model,
            copy.deepcopy(merged),
            out,
            input_size=cfg["input_size"],
            data_config=cfg,
            class_names=[f"c{i}" for i in range(NUM_CLASSES)],
            provenance={"method": method, "family": family},
            images=real_images(8, cfg),
            batch=(1, 4, 8),
            precision="int8",
            tensorrt="off",
            target=target,
            accuracy_set=select(labelled, "photo crops", None),
            int8=calib,
        )
    except Exception as exc:  # noqa: BLE001 - a refused or failed bundle is a measured outcome here
        text = exc.message if isinstance(exc, PeftxError) else str(exc)
        row["error"] = f"{type(exc).__name__}: {text.splitlines()[0][:300]}"
        row["seconds"] = round(time.perf_counter() - started, 1)
        return row
    row["seconds"] = round(time.perf_counter() - started, 1)
    full = report.to_json()
    row["status"] = report.status
    row["parity"] = full["parity"]
    row["readiness"] = full["readiness"]
    row["timings"] = full.get("timings")
    row["int8"] = full.get("int8")
    row["ready"] = {target: report.readiness.ok} | {t: not p for t, p in report.readiness.newer.items()}
    return row


TARGETS = ("trt8.5", "trt8.6", "trt10", "trt11")


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: family x target, each cell the three precisions' verdicts from the bundle that covers the target
    (its own row, else the trt8.6 row: the same opset-17 graph, checked against the newer op lists)."""
    lines = ["| family (tiny config) | timm class | " + " | ".join(TARGETS) + " |", "|---|---|" + "---|" * len(TARGETS)]
    families = list(dict.fromkeys(r["family"] for r in rows))
    for family in families:
        own = {r["target"]: r for r in rows if r["family"] == family}
        cells = []
        for target in TARGETS:
            row = own.get(target) or own.get("trt8.6")
            cells.append(_cell(row, target) if row else "not run")
        cls = next(r.get("class", "?") for r in own.values())
        lines.append(f"| {family} (`{own[next(iter(own))]['model']}`) | {cls} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(row: dict[str, Any], target: str) -> str:
    if "error" in row:
        return "refused: " + row["error"].split(": ", 1)[-1][:90]
    if target not in row["ready"]:
        return "not run"
    if not row["ready"][target]:
        return "not parsed (opset 18 > 17)" if row["target"] != target else "not parsed"
    results = {r["candidate"]: r for r in row["parity"]["results"]}
    accuracy = {r["candidate"]: r for r in (row["parity"].get("accuracy") or {}).get("results", [])}

    def ok(name: str) -> bool:
        return results[name]["passed"] and accuracy.get(name, {"passed": True})["passed"]

    gate = row["int8"]["gate"]
    int8 = "✓" if gate["passed"] else ("✓ (fallback)" if (row["int8"].get("fallback") or {}).get("passed") else "✗")
    fp16 = "✓" if ok("onnxruntime fp16") else "✗"
    return f"FP32 {'✓' if ok('onnxruntime fp32') else '✗'} · FP16 {fp16} · INT8 {int8}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--targets", default="trt8.5,trt8.6,trt10")
    parser.add_argument("--method", default="rlrr")
    parser.add_argument("--output", default="benchmarks/out")
    parser.add_argument("--table", nargs="*", help="print the markdown table of these families.json files and exit")
    args = parser.parse_args()
    if args.table:
        print(table([r for f in args.table for r in json.loads(Path(f).read_text())]))
        return
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            for target in args.targets.split(","):
                row = bundle_cells(family, args.method, target, Path(tmp) / f"{family}-{target}")
                rows.append(row)
                print(json.dumps(_short(row)), flush=True)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "families.json").write_text(json.dumps(rows, indent=1, default=str))
    print(table(rows))


def _short(row: dict[str, Any]) -> dict[str, Any]:
    keep = ("family", "target", "class", "trainable", "seconds", "status", "error")
    short = {k: row[k] for k in keep if k in row}
    if "ready" in row:
        short["ready"] = row["ready"]
    return short


if __name__ == "__main__":
    main()
