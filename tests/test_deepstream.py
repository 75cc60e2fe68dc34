"""DeepStream: the config applied as Gst-nvinfer applies it, against the bundle's infer.py on the same raw files.

nvinfer (DeepStream 6.2 sources, gstnvinfer.cpp / nvdsinfer_context_impl.cpp, and the Gst-nvinfer documentation)
scales each frame to the network's W x H into an 8-bit RGB(A) surface with the config's ``scaling-filter``
(NvBufSurfTransform: GPU or VIC, no antialiasing), then computes ``y = net-scale-factor * (x - offsets[c])`` per pixel
and runs the engine, reading the output blob ``output-blob-names`` names. DeepStream cannot run here (no GPU, no
DeepStream), so :func:`nvinfer_apply` emulates those steps from the written config file alone: PIL decodes the raw
file, ``torch.nn.functional.interpolate(antialias=False)`` stands in for the GPU/VIC scaler (its cubic kernel,
a = -0.75, may differ from NPP's), the result is rounded to 8 bits, normalised with the config's numbers, and the ONNX
file the config names runs under ONNX Runtime. infer.py runs as shipped.
"""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import make_tiny, real_batch, tiny_data_cfg, write_tiny_bundle
from PIL import Image

from peftx.exports.accuracy import load_infer_module
from peftx.exports.deepstream import (
    DEEPSTREAM_ONNX,
    build_onnx,
    check_exact,
    pixel_values,
    render_config,
    scaling_filter,
)
from peftx.exports.targets import resolve_target
from peftx.exports.tensorrt_ops import check_tensorrt_readiness
from peftx.tolerances import DEEPSTREAM_GRAPH_FP32, DEEPSTREAM_RESIZE

CLASSES = [f"c{i}" for i in range(5)]
# nvinfer's interpolation per scaling-filter (NvBufSurfTransform_Inter: 0 nearest, 1 bilinear, 2 GPU cubic)
TORCH_MODE = {0: "nearest-exact", 1: "bilinear", 2: "bicubic"}


def read_config(path: Path) -> configparser.SectionProxy:
    parser = configparser.ConfigParser()
    parser.read_string(path.read_text())
    return parser["property"]


def nvinfer_engine_name(prop: configparser.SectionProxy) -> str:
    """The engine nvinfer saves when it builds from onnx-file: nvdsinfer_model_builder.cpp (TrtModelBuilder::
    buildModel) ``modelPath + "_b" + maxBatchSize + "_" + "gpu" + gpuId + "_" + networkMode2Str(mode) + ".engine"``,
    networkMode2Str: 0 "fp32", 1 "int8", 2 "fp16"."""
    mode = {"0": "fp32", "1": "int8", "2": "fp16"}[prop["network-mode"]]
    return f"{prop['onnx-file']}_b{prop['batch-size']}_gpu{prop['gpu-id']}_{mode}.engine"


def nvinfer_input(config: Path, raw: Path) -> np.ndarray:
    """One raw file as nvinfer feeds the network: whole frame scaled to infer-dims with scaling-filter (8-bit
    surface), then y = net-scale-factor * (x - offsets[c]); [1, 3, H, W] float32."""
    prop = read_config(config)
    c, h, w = (int(v) for v in prop["infer-dims"].split(";"))
    assert prop["maintain-aspect-ratio"] == "0" and prop.get("model-color-format", "0") == "0"  # RGB, squash
    frame = np.asarray(Image.open(raw).convert("RGB"), dtype=np.float32)
    x = torch.from_numpy(frame).permute(2, 0, 1)[None]
    if x.shape[-2:] != (h, w):
        mode = TORCH_MODE[int(prop["scaling-filter"])]
        kw = {} if mode.startswith("nearest") else {"align_corners": False, "antialias": False}
        x = torch.nn.functional.interpolate(x, size=(h, w), mode=mode, **kw)
    pixels = torch.clamp(torch.round(x), 0, 255).numpy()  # NvBufSurfTransform writes an 8-bit surface
    offsets = np.array([float(v) for v in prop["offsets"].split(";")], np.float32).reshape(1, c, 1, 1)
    return (np.float32(prop["net-scale-factor"]) * (pixels - offsets)).astype(np.float32)


def nvinfer_apply(config: Path, raw: Path) -> np.ndarray:
    """nvinfer's output blob for one raw file: the ONNX file and output the config names, under ONNX Runtime."""
    import onnxruntime as ort

    prop = read_config(config)
    session = ort.InferenceSession(str(config.parent / prop["onnx-file"]), providers=["CPUExecutionProvider"])
    (blob,) = prop["output-blob-names"].split(";")
    return session.run([blob], {session.get_inputs()[0].name: nvinfer_input(config, raw)})[0]


def infer_py_probs(bundle: Path, raw: Path) -> np.ndarray:
    """The shipped infer.py's preprocessing and model.onnx on the same file: softmax of its logits."""
    infer = load_infer_module(bundle / "infer.py")
    meta = json.loads((bundle / "metadata.json").read_text())
    logits = infer.OnnxBackend(bundle / "model.onnx")(infer.preprocess(raw, meta["preprocessing"]))
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def raw_files(tmp_path_factory) -> list[Path]:
    """REAL raw files: sklearn's two sample photos (427x640 JPEG), crops of them, and digits (8x8 PNG)."""
    from sklearn.datasets import load_digits, load_sample_images

    root = tmp_path_factory.mktemp("raw")
    sample = load_sample_images()
    files = []
    for name, photo in zip(sample.filenames, sample.images, strict=True):
        files.append(root / Path(name).name)
        Image.fromarray(photo).save(files[-1], quality=92)
        for k, (top, left, hh, ww) in enumerate(((30, 50, 200, 150), (120, 300, 90, 260))):
            files.append(root / f"{Path(name).stem}_crop{k}.png")
            Image.fromarray(photo[top : top + hh, left : left + ww]).save(files[-1])
    digits = load_digits()
    for j in range(4):
        pixels = np.clip(np.rint(digits.images[j * 7] * (255 / 16)), 0, 255).astype(np.uint8)
        files.append(root / f"digit{j}.png")
        Image.fromarray(pixels).convert("RGB").save(files[-1])
    return files


def _bundle(out: Path, *, precision: str = "fp32", target: str | None = None, interpolation: str = "bicubic"):
    model = make_tiny("vit", seed=5)
    with torch.no_grad():  # a decisive head: probabilities well away from uniform, so resize effects show
        model.head.weight.mul_(8.0)
    cfg = {**tiny_data_cfg("vit"), "crop_mode": "squash", "interpolation": interpolation}
    write_tiny_bundle(out, model, data_config=cfg, class_names=CLASSES, precision=precision, target=target)
    return out


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory) -> Path:
    return _bundle(tmp_path_factory.mktemp("ds") / "bundle")


@pytest.fixture(scope="module")
def jetpack5_fp16_bundle(tmp_path_factory) -> Path:
    return _bundle(tmp_path_factory.mktemp("ds") / "bundle", precision="fp16", target="jetpack5")


# --- the config, applied as nvinfer applies it ---------------------------------------------------------------------


def test_config_means_what_it_says(fp32_bundle):
    prop = read_config(fp32_bundle / "config_infer_primary.txt")
    meta = json.loads((fp32_bundle / "metadata.json").read_text())
    assert (float(prop["net-scale-factor"]), prop["offsets"]) == (1.0, "0;0;0")  # exact: normalisation is in the graph
    assert prop["onnx-file"] == DEEPSTREAM_ONNX and prop["output-blob-names"] == "probabilities"
    assert 0.0 < float(prop["classifier-threshold"]) < 1.0  # a probability
    assert prop["scaling-filter"] == "2"  # bicubic, as this model was trained
    assert prop["model-engine-file"] == nvinfer_engine_name(prop)  # what nvinfer writes is what it loads
    assert meta["deepstream"]["exactness"]["passed"] and DEEPSTREAM_ONNX in meta["sha256"]
    model = onnx.load(str(fp32_bundle / DEEPSTREAM_ONNX))
    assert [o.name for o in model.graph.output] == ["probabilities"] and model.graph.node[-1].op_type == "Softmax"
    assert json.loads((fp32_bundle / "trt_readiness.json").read_text())["files"][DEEPSTREAM_ONNX]["ok"]


def test_nvinfer_emulation_against_infer_py_on_raw_files(fp32_bundle, raw_files):
    """The whole-frame resize without antialiasing is what stays approximate: bounded by DEEPSTREAM_RESIZE."""
    config = fp32_bundle / "config_infer_primary.txt"
    ours = np.concatenate([nvinfer_apply(config, f) for f in raw_files])
    theirs = np.concatenate([infer_py_probs(fp32_bundle, f) for f in raw_files])
    np.testing.assert_allclose(ours.sum(axis=1), 1.0, atol=1e-6)  # probabilities
    assert theirs.max(axis=1).min() < 0.9 and theirs.max(axis=1).max() > 0.5  # neither uniform nor saturated
    err = float(np.abs(ours - theirs).max())
    agree = float(np.mean(ours.argmax(1) == theirs.argmax(1)))
    assert err <= DEEPSTREAM_RESIZE.atol and agree >= DEEPSTREAM_RESIZE.min_top1, (err, agree)
    # the comparison can fail: the same frames in BGR (model-color-format=1 read as RGB) move far beyond the bound
    bgr = np.concatenate(
        [
            nvinfer_apply_with(config, f, lambda x: x[:, ::-1].copy())
            for f in raw_files  # channel order swapped after scaling
        ]
    )
    assert float(np.abs(bgr - theirs).max()) > 2 * DEEPSTREAM_RESIZE.atol


def nvinfer_apply_with(config: Path, raw: Path, change) -> np.ndarray:
    import onnxruntime as ort

    prop = read_config(config)
    session = ort.InferenceSession(str(config.parent / prop["onnx-file"]), providers=["CPUExecutionProvider"])
    return session.run([prop["output-blob-names"]], {session.get_inputs()[0].name: change(nvinfer_input(config, raw))})[
        0
    ]


def test_normalisation_is_exact_on_a_frame_at_network_size(fp32_bundle, raw_files, tmp_path):
    """A centre crop already at the network size: no resize on either side, so only FP32 noise may differ."""
    prop = read_config(fp32_bundle / "config_infer_primary.txt")
    _, h, w = (int(v) for v in prop["infer-dims"].split(";"))
    errors = []
    for k, f in enumerate(raw_files[:3]):
        image = Image.open(f).convert("RGB")
        left, top = (image.width - w) // 2, (image.height - h) // 2
        crop = tmp_path / f"crop{k}.png"
        image.crop((left, top, left + w, top + h)).save(crop)
        ours, theirs = nvinfer_apply(fp32_bundle / "config_infer_primary.txt", crop), infer_py_probs(fp32_bundle, crop)
        assert ours.argmax() == theirs.argmax()
        errors.append(float(np.abs(ours - theirs).max()))
    assert max(errors) <= DEEPSTREAM_GRAPH_FP32.atol, errors


# --- the engine: what nvinfer may build, and what build_engine.sh writes ------------------------------------------


def test_where_nvinfer_would_build_wrongly_the_config_has_no_onnx_file(jetpack5_fp16_bundle):
    prop = read_config(jetpack5_fp16_bundle / "config_infer_primary.txt")
    assert "onnx-file" not in prop and prop["network-mode"] == "2"
    assert prop["model-engine-file"] == f"{DEEPSTREAM_ONNX}_b4_gpu0_fp16.engine"
    text = (jetpack5_fp16_bundle / "config_infer_primary.txt").read_text()
    assert "No onnx-file on purpose" in text and "./build_engine.sh fp16 --deepstream" in text
    prep = {**tiny_data_cfg("vit"), "crop_mode": "squash"}
    for precision, target, has_onnx in (
        ("int8", "trt10", False),
        ("int8", "jetpack5", False),
        ("fp16", "trt11", False),
        ("fp16", "trt10", True),
        ("fp32", "jetpack5", True),
    ):
        config, entry = render_config(prep, precision=precision, batch=2, target=resolve_target(target))
        assert ("\nonnx-file=" in config) is has_onnx and entry["nvinfer_may_build"] is has_onnx


STAND_IN = r"""#!/usr/bin/env bash
# A stand-in for trtexec (TensorRT cannot be installed here): version banner, argument log, the engine file.
if [[ "$1" == --help ]]; then echo "&&&& RUNNING TensorRT.trtexec [TensorRT v8502] # trtexec --help"; exit 0; fi
printf '%s\n' "$@" > "$STUB_ARGS"
for a in "$@"; do case "$a" in --saveEngine=*) echo "engine" > "${a#--saveEngine=}" ;; esac; done
"""


def test_build_engine_writes_the_engine_the_config_loads(jetpack5_fp16_bundle, tmp_path):
    if shutil.which("bash") is None or shutil.which("sha256sum") is None:
        pytest.skip("build_engine.sh needs bash and coreutils")
    work = Path(shutil.copytree(jetpack5_fp16_bundle, tmp_path / "b"))
    (tmp_path / "trtexec").write_text(STAND_IN)
    (tmp_path / "trtexec").chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "STUB_ARGS": str(tmp_path / "args"), "NV_TEGRA_RELEASE": "/none"}
    done = subprocess.run(["bash", "build_engine.sh", "fp16", "--deepstream"], cwd=work, env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    engine = read_config(work / "config_infer_primary.txt")["model-engine-file"]
    assert (work / engine).is_file() and not (work / "model.engine").exists()
    args = (tmp_path / "args").read_text().splitlines()
    assert f"--onnx={DEEPSTREAM_ONNX}" in args and "--fp16" in args
    # the FP32 pinning of jetpack5's decomposed LayerNorm names nodes the DeepStream graph has
    spec = next(a for a in args if a.startswith("--layerPrecisions="))[len("--layerPrecisions=") :]
    names = {n.name for n in onnx.load(str(work / DEEPSTREAM_ONNX), load_external_data=False).graph.node}
    pinned = [item.rsplit(":", 1)[0] for item in spec.split(",")]
    assert pinned and set(pinned) <= names
    wrong = subprocess.run(["bash", "build_engine.sh", "fp32", "--deepstream"], cwd=work, env=env, capture_output=True)
    assert wrong.returncode == 2 and re.search(rb"for fp16 .*build_engine.sh fp16 --deepstream", wrong.stderr)


# --- the graph, per target and graph kind ----------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["jetpack5", "trt8.6", "trt10", "trt11"])
def test_deepstream_graph_is_exact_and_ready_for_every_target(target, tmp_path):
    """Made from the target's FP32, FP16 and Q/DQ INT8 graphs: softmax(source) to FP32 noise, parser-ready."""
    from peftx.exports import int8
    from peftx.exports.fp16 import convert_to_fp16
    from peftx.exports.onnx_export import export_onnx

    profile, cfg = resolve_target(target), tiny_data_cfg("vit")
    images = real_batch("vit", n=8).numpy()
    fp32 = tmp_path / "model.onnx"
    export_onnx(
        make_tiny("vit"), fp32, input_size=cfg["input_size"], opset=profile.export_opset, layernorm=profile.layernorm
    )
    int8.quantize(fp32, tmp_path / "model_int8.onnx", real_batch("vit", n=32).numpy())
    convert_to_fp16(fp32, tmp_path / "model_fp16.onnx", calibration=images[:4], keep_fp32_nodes=[])
    for name in ("model.onnx", "model_fp16.onnx", "model_int8.onnx"):
        out = tmp_path / f"ds_{name}"
        build_onnx(tmp_path / name, out, cfg["mean"], cfg["std"])
        exact = check_exact(
            out,
            tmp_path / name,
            pixel_values(images, cfg["mean"], cfg["std"]),
            cfg["mean"],
            cfg["std"],
            DEEPSTREAM_GRAPH_FP32,
        )
        assert exact.passed and exact.max_abs_prob <= DEEPSTREAM_GRAPH_FP32.atol, (name, exact)
        assert check_tensorrt_readiness(out, target=profile).ok


def test_a_wrong_normalisation_is_caught(tmp_path):
    """check_exact can fail: a graph built with another std differs by far more than FP32 noise."""
    cfg = tiny_data_cfg("vit")
    from peftx.exports.onnx_export import export_onnx

    export_onnx(make_tiny("vit"), tmp_path / "m.onnx", input_size=cfg["input_size"], opset=17)
    build_onnx(tmp_path / "m.onnx", tmp_path / "ds.onnx", cfg["mean"], [s * 1.02 for s in cfg["std"]])
    images = real_batch("vit", n=8).numpy()
    exact = check_exact(
        tmp_path / "ds.onnx",
        tmp_path / "m.onnx",
        pixel_values(images, cfg["mean"], cfg["std"]),
        cfg["mean"],
        cfg["std"],
        DEEPSTREAM_GRAPH_FP32,
    )
    assert not exact.passed and exact.max_abs_prob > 10 * DEEPSTREAM_GRAPH_FP32.atol


@pytest.mark.parametrize(
    "interpolation, value, hw",
    [("nearest", 0, 0), ("bilinear", 1, 0), ("bicubic", 2, 1), ("lanczos", 4, 1), ("box", 1, 0)],
)
def test_scaling_filter_follows_the_training_interpolation(interpolation, value, hw):
    filt = scaling_filter(interpolation)
    assert (filt.value, filt.compute_hw) == (value, hw)
    assert filt.exact_kind is (interpolation != "box")
