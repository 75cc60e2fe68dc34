"""Deployment bundle: ONNX (+FP16, +engine), preprocessing, a standalone infer.py, build script and parity evidence.

Layout of a bundle directory::

    model.onnx          FP32, dynamic batch; metadata_props carry preprocessing, class names and provenance
    model_fp16.onnx     always written: TensorRT 11's FP16 build input and the FP16 emulation ONNX Runtime checks
    model_int8.onnx     --precision int8 only: symmetric Q/DQ graph calibrated on the run's training images (int8.py)
    model.engine        only when TensorRT built one here (+ model.engine.json: what it was built for)
    build_engine.sh     trtexec for TensorRT 8.5 / 8.6 / 10.x / 11.x, each with its own flags, on the target device
    infer.py            standalone (no peftx import): metadata.json preprocessing -> engine or ONNX -> top-5
    image_decoding.py   how infer.py decodes an image file: peftx/image_decoding.py itself, the training side's rule
    device_bench.py     infer.py --bench: times every artifact on the device (device_report.json)
    metadata.json       every fact above, the deployment target, sha256 of every artifact, status "ok" | "failed"
    parity.json         each backend vs the UNMERGED reference model, on real images and random inputs
    trt_readiness.json  the target's TensorRT parser readiness of model.onnx and model_fp16.onnx AS SHIPPED
    reference_set.npz   real preprocessed images + the UNMERGED model's outputs (+ reference/ raw files):
                        what infer.py --check runs
    model_deepstream.onnx, config_infer_primary.txt, labels.txt   DeepStream: the model with its normalisation and a
                        softmax inside, its Gst-nvinfer config and labels (deepstream.py)
    README.md           for the person at the device: what to install per JetPack, build, check, run

The export follows the deployment target (``targets.py``): its opset, its LayerNorm form (decomposed for TensorRT
8.5, whose FP16 build and FP16 ONNX keep that subgraph FP32), its op list. The target is recorded in metadata.json
and in the ONNX metadata_props (``peftx_target``).

The bundle is assembled in a temporary directory next to ``out_dir`` (same filesystem) and renamed into place only
when complete. A parity failure still writes it (for inspection) with status "failed", then raises ParityError.
parity.json and trt_readiness.json are reports that ``validate_bundle`` regenerates, so they are not hashed; neither
is model.engine, which build_engine.sh rebuilds on the device (model.engine.json ties it to its source ONNX).

The package, one job per module (``write_bundle`` runs the steps in this order over one ``BundleRequest``):

    request.py          BundleRequest (the typed, validated request), BundleReport, argument checks
    precision.py        the Precision type and its tolerance lookups
    artifacts.py        the one table of checked artifacts: file, runners, tolerances, required or advisory
    format.py           on-disk names, metadata.json (write, read, sha256 verification), target summary
    export_step.py      model.onnx for the target (+ onnxslim, kept only if it passes), FP32 nodes of FP16 builds
    fp16_step.py        model_fp16.onnx and its runners
    int8_step.py        model_int8.onnx: calibration, the accuracy gate and its fallback, the graph's rules
    engine_step.py      model.engine when TensorRT is usable here
    deepstream_step.py  the DeepStream model, config and labels
    reference_step.py   reference_set.npz (+ reference/): what infer.py --check runs, and its tolerances
    checks.py           parity and accuracy checking: runners, FP32 noise bounds, readiness handling
    render.py           build_engine.sh and README.md from templates/
    publish.py          the work directory beside the destination and the atomic rename into place
    assemble.py         write_bundle: the steps in order
    validate.py         validate_bundle: re-checks a written bundle
"""

from __future__ import annotations

from peftx.fsutil import sha256_file

from .assemble import write_bundle
from .format import (
    BENCH_FILE,
    BUILD_SCRIPT_FILE,
    DECODING_FILE,
    ENGINE_FILE,
    FORMAT,
    FORMAT_VERSION,
    FP16_FILE,
    INFER_FILE,
    INT8_EXACT,
    INT8_FILE,
    INT8_FUSED,
    METADATA_FILE,
    ONNX_FILE,
    PARITY_FILE,
    READINESS_FILE,
    README_FILE,
    read_bundle,
    target_summary,
    verify_artifacts,
)
from .precision import PRECISIONS, Precision
from .publish import _check_destination, remove_stale_workdirs
from .render import _template, render_build_script, render_readme
from .request import (
    FP16_CALIBRATION_IMAGES,
    PARITY_BATCHES,
    RANDOM_BATCH,
    BundleReport,
    BundleRequest,
    Progress,
    parity_batches,
)
from .validate import validate_bundle

__all__ = [
    "BENCH_FILE",
    "BUILD_SCRIPT_FILE",
    "DECODING_FILE",
    "BundleReport",
    "BundleRequest",
    "ENGINE_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "FP16_CALIBRATION_IMAGES",
    "FP16_FILE",
    "INFER_FILE",
    "INT8_EXACT",
    "INT8_FILE",
    "INT8_FUSED",
    "METADATA_FILE",
    "ONNX_FILE",
    "PARITY_BATCHES",
    "PARITY_FILE",
    "PRECISIONS",
    "Precision",
    "Progress",
    "RANDOM_BATCH",
    "READINESS_FILE",
    "README_FILE",
    "_check_destination",
    "_template",
    "parity_batches",
    "read_bundle",
    "remove_stale_workdirs",
    "render_build_script",
    "render_readme",
    "sha256_file",
    "target_summary",
    "validate_bundle",
    "verify_artifacts",
    "write_bundle",
]
