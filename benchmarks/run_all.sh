#!/usr/bin/env bash
# The exact commands behind the numbers in benchmarks/results/. Run from the repository root with the venv active
# (or VENV=/path/to/venv). Results go to bench-results/ (git-ignored). The full suite takes ~15 min on 2 idle cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${VENV:+$VENV/bin/}python"
export COLUMNS="${COLUMNS:-200}"  # rich wraps tables at 80 columns when stdout is not a terminal
OUT="${1:-bench-results}"

BENCH=("${PY}" -m peftx.cli.app bench)  # = `peftx bench`

# 1. everything (inference for ViT-S/14 DINOv2, ViT-B/16, Swin-T at batch 1 and 32; training on ViT-S/14 112 px;
#    export of ViT-S/14 and ViT-B/16), one run, one device: tables on stdout, bench.json + bench.png in $OUT/full
"${BENCH[@]}" --output "$OUT/full" | tee "$OUT/full.txt"

# 2. per-method profile of the training step (torch.profiler, CPU) on the same backbone and batch
"${BENCH[@]}" --suite profile --output "$OUT/profile" | tee "$OUT/profile.txt"

# 3. ONNX Runtime session options on the merged-size ViT-B/16 (levels, spinning, threads, transformer optimizer)
"${PY}" benchmarks/ort_options.py --model vit_b16 --batch 1,32 --output "$OUT" | tee "$OUT/ort_options.txt"

# 4. the couple-of-minutes smoke version (what CI or a reviewer runs first)
"${BENCH[@]}" --quick --output "$OUT/quick" | tee "$OUT/quick.txt"

# 5. each method's training step before / after the issue-6 changes, interleaved in one run
"${PY}" benchmarks/training_step_ab.py --rounds 8 | tee "$OUT/training_step_ab.txt"

# 6. DeepStream: nvinfer's whole-frame resize (no antialiasing) vs infer.py's PIL resize through DINOv2 ViT-S/14
#    (docs/deepstream.md; ~17 min at 224 px on 2 shared cores)
"${PY}" benchmarks/deepstream_resize.py --size 224 --train-digits 200 --test-digits 60 --crops 30 | tee "$OUT/deepstream_resize.txt"
