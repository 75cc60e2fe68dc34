"""The hand-off to a device: infer.py's bad-input lines and sha256 verification, the shipped reference set and
``infer.py --check`` run where neither peftx nor torch can be imported (the on-device check, against ONNX Runtime)."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import CROP_DATA_CONFIG, make_tiny, write_tiny_bundle
from PIL import Image

from peftx.data import labelled_folder
from peftx.exports.accuracy import load_infer_module, select
from peftx.tolerances import FP16, ONNX_FP32, PREPROCESSING_ATOL

SIZE = 32
CLASSES = ["cat", "dog", "fox", "owl"]
DATA_CONFIG = CROP_DATA_CONFIG
# Stands in for a device: peftx, torch and friends cannot be imported (an import attempt raises ImportError);
# -I drops PYTHONPATH, the user site and the working directory. PATCH (optional code) runs first.
ISOLATED = (
    "import runpy, sys\n"
    "for name in ('peftx', 'torch', 'timm', 'torchvision'):\n"
    "    sys.modules[name] = None\n"
    "exec(sys.argv[1])\n"
    "sys.argv = sys.argv[2:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def run_infer(bundle: Path, *args: str, patch: str = "", cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-I", "-c", ISOLATED, patch, str(bundle / "infer.py"), *args],
        cwd=cwd or bundle.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )


def write_photo_bundle(out: Path, reference: torch.nn.Module, images, **kw) -> None:
    """A bundle of the labelled classes on DATA_CONFIG's crop, onnxslim on as shipped."""
    write_tiny_bundle(out, reference, data_config=DATA_CONFIG, class_names=CLASSES, images=images, simplify=True, **kw)


def one_line(done: subprocess.CompletedProcess) -> str:
    """The single stderr line of a refused run (no traceback)."""
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ROOT/<class>/: REAL images, PNG digits (sklearn) and non-square JPEG crops of sklearn's sample photos."""
    from sklearn.datasets import load_digits, load_sample_images

    root = tmp_path_factory.mktemp("labelled")
    digits, photos = load_digits(), load_sample_images().images
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for j in range(2):
            pixels = np.clip(np.rint(digits.images[10 * j + c] * (255 / 16)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).convert("RGB").save(root / name / f"d{j}.png")
            photo = photos[(c + j) % 2]
            top, left = 40 * c + 13 * j, 60 * c + 7 * j
            Image.fromarray(photo[top : top + 45 + 5 * c, left : left + 70 + 3 * j]).save(
                root / name / f"p{j}.jpg", quality=90
            )
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, labelled: Path):
    """An FP32 bundle of a tiny ViT, whose accuracy set (and so reference set) is the labelled folder."""
    from timm.data import create_transform

    reference = make_tiny("vit", num_classes=len(CLASSES))
    transform = create_transform(**DATA_CONFIG)
    images = torch.stack([transform(Image.open(p).convert("RGB")) for p in sorted(labelled.rglob("*.jpg"))])
    accuracy = select(labelled_folder(labelled, CLASSES, DATA_CONFIG), f"labelled images in {labelled}", None)
    merged = copy.deepcopy(reference)
    with torch.no_grad():  # within every FP32 bound, yet not bit-equal: tells the unmerged outputs from the merged
        merged.head.bias += 5e-7
    out = tmp_path_factory.mktemp("bundles") / "bundle"
    write_photo_bundle(out, reference, images, merged=merged, precision="fp32", tensorrt="off", accuracy_set=accuracy)
    return out, reference, merged


@pytest.fixture()
def bundle(built, tmp_path: Path) -> Path:
    """A private copy of the bundle, to break."""
    return Path(shutil.copytree(built[0], tmp_path / "bundle"))


def flip_a_weight_byte(path: Path) -> None:
    """Flip one byte inside the largest weight: the file still loads and runs, its sha256 and outputs change."""
    model = onnx.load(str(path))
    raw = max((t.raw_data for t in model.graph.initializer), key=len)
    data = bytearray(path.read_bytes())
    at = data.find(raw[:64]) + len(raw) // 2 + 3
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


# --- the reference set ------------------------------------------------------------------------------------------


def test_reference_set_holds_real_images_the_unmerged_outputs_and_raw_files(built, labelled):
    out, reference, merged = built
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["status"] == "ok"
    ref = meta["reference_set"]
    with np.load(out / ref["file"], allow_pickle=False) as npz:  # numpy only: nothing unpickled
        data = {key: npz[key] for key in npz.files}
    n = len(list(labelled.rglob("*.*")))
    assert len(data["inputs"]) == ref["images"] == min(n, 24) and data["inputs"].dtype == np.float32
    with torch.inference_mode():  # the UNMERGED model's outputs, to the bit, and not the merged model's
        np.testing.assert_array_equal(data["reference_logits"], reference(torch.from_numpy(data["inputs"])).numpy())
        assert not np.array_equal(data["reference_logits"], merged(torch.from_numpy(data["inputs"])).numpy())
    assert set(data["labels"].tolist()) == set(range(len(CLASSES)))  # a spread over classes, not the first class
    # every raw file is byte for byte one of the labelled images of its row's class, and preprocesses to its row
    infer = load_infer_module(out / "infer.py")
    suffixes = set()
    for name, row in zip(data["raw_files"], data["raw_index"], strict=True):
        shipped = (out / str(name)).read_bytes()
        label = CLASSES[int(data["labels"][row])]
        assert any(p.read_bytes() == shipped for p in (labelled / label).iterdir()), name
        np.testing.assert_array_equal(infer.preprocess(out / str(name), meta["preprocessing"])[0], data["inputs"][row])
        suffixes.add(Path(str(name)).suffix)
    assert suffixes == {".png", ".jpg"} and len(data["raw_files"]) == 4  # each decoder the device needs
    assert ref["tolerances"]["fp32"]["atol"] == ONNX_FP32.atol and ref["tolerances"]["fp16"]["name"] == FP16.name
    assert ref["preprocessing_atol"] == PREPROCESSING_ATOL
    for name in [ref["file"], *ref["raw_files"]]:
        assert meta["sha256"][name] == hashlib.sha256((out / name).read_bytes()).hexdigest()


# --- infer.py --check, where torch and peftx cannot be imported --------------------------------------------------


def test_check_passes_on_an_intact_bundle_without_torch_or_peftx(built):
    out = built[0]
    done = run_infer(
        out,
        "--check",
        patch="import atexit; atexit.register(lambda: print("
        "'torch imported' if sys.modules.get('torch') else 'no torch', file=sys.stderr))",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("reference set: 16 real images")
    assert any(line.startswith("PASS  preprocessing: 4 raw files") for line in lines)
    fp32 = next(line for line in lines if "model.onnx" in line)
    assert fp32.startswith("PASS  fp32 model.onnx (onnxruntime): max |Δ|") and "accuracy" in fp32
    assert any("model_fp16.onnx" in line for line in lines)  # every artifact metadata.json lists is run
    assert lines[-1].startswith("check passed") and done.stderr.strip().endswith("no torch")


def test_check_fails_on_a_modified_artifact(bundle):
    flip_a_weight_byte(bundle / "model.onnx")
    done = run_infer(bundle, "--check")
    assert done.returncode == 1, done.stdout + done.stderr
    line = next(line for line in done.stdout.splitlines() if "model.onnx (" in line)
    assert line == "FAIL  fp32 model.onnx (onnxruntime): model.onnx is modified: its sha256 differs from metadata.json"
    assert done.stdout.splitlines()[-1] == "check FAILED: fp32 model.onnx (onnxruntime)"


def test_check_fails_when_outputs_drift(bundle):
    """With --no-verify the modified model runs, and its outputs are what fails."""
    model = onnx.load(str(bundle / "model.onnx"))
    head = next(t for t in model.graph.initializer if tuple(t.dims) == (len(CLASSES),))  # the head's bias
    bias = onnx.numpy_helper.to_array(head) + 0.01  # a small, real drift: 1e-2 on every logit
    head.CopyFrom(onnx.numpy_helper.from_array(bias.astype(np.float32), head.name))
    onnx.save(model, str(bundle / "model.onnx"))
    done = run_infer(bundle, "--check", "--no-verify", "--precision", "fp32")
    assert done.returncode == 1, done.stdout + done.stderr
    line = next(line for line in done.stdout.splitlines() if "model.onnx" in line)
    assert line.startswith("FAIL  fp32 model.onnx (onnxruntime): max |Δ| 0.01 > bound 0.0001"), line
    assert "sha256 NOT verified" in done.stdout


def test_check_fails_when_this_machines_resize_differs(built):
    """A device whose Pillow resizes differently (here: forced to nearest-neighbour) fails the raw-file check."""
    out = built[0]
    patch = (
        "from PIL import Image\nresize = Image.Image.resize\n"
        "Image.Image.resize = lambda self, size, resample=None, *a, **k: "
        "resize(self, size, Image.Resampling.NEAREST)\n"
    )
    done = run_infer(out, "--check", patch=patch)
    assert done.returncode == 1, done.stdout + done.stderr
    line = next(line for line in done.stdout.splitlines() if "preprocessing" in line)
    assert line.startswith("FAIL  preprocessing: 4 raw files") and done.stdout.splitlines()[-1].startswith(
        "check FAILED: preprocessing"
    )


def test_check_refuses_a_modified_reference_set(bundle):
    (bundle / "reference").joinpath(sorted(p.name for p in (bundle / "reference").iterdir())[0]).write_bytes(b"x")
    done = run_infer(bundle, "--check")
    assert done.returncode == 3
    assert "the reference set cannot be trusted: reference/00" in one_line(done)


# --- infer.py on bad input: one line, non-zero exit ----------------------------------------------------------------


def test_infer_classifies_the_images_in_a_directory(built, labelled, tmp_path):
    out = built[0]
    folder = tmp_path / "photos"
    shutil.copytree(labelled / "cat", folder)
    (folder / "notes.txt").write_text("not an image")
    done = run_infer(out, str(folder), "--top", "2")
    assert done.returncode == 0, done.stderr
    headers = [line for line in done.stdout.splitlines() if line.startswith("# ")]
    assert headers == [f"# {p}" for p in sorted(folder.glob("*.*")) if p.suffix != ".txt"]
    assert "skipped 1 file(s) that are not images" in done.stderr


@pytest.mark.parametrize(
    "case, code, expected",
    [
        ("empty directory", 2, "holds no image files"),
        ("missing file", 2, "does not exist"),
        ("text file", 2, "is not an image PIL can identify"),
        ("truncated png", 2, "is truncated or corrupt"),
    ],
)
def test_bad_images_are_one_line(built, labelled, tmp_path, case, code, expected):
    out = built[0]
    path = (
        tmp_path
        / {
            "empty directory": "empty",
            "missing file": "gone.jpg",
            "text file": "notes.jpg",
            "truncated png": "cut.png",
        }[case]
    )
    if case == "empty directory":
        path.mkdir()
    elif case == "text file":
        path.write_text("hello")
    elif case == "truncated png":
        path.write_bytes((labelled / "cat" / "d0.png").read_bytes()[:60])
    done = run_infer(out, str(path))
    assert done.returncode == code
    line = one_line(done)
    assert line.startswith(f"infer.py: {path}") and expected in line, line


def test_missing_bundle_files_are_named(bundle, labelled):
    photo = str(labelled / "cat" / "p0.jpg")
    (bundle / "model.onnx").unlink()
    done = run_infer(bundle, photo)
    assert done.returncode == 3 and one_line(done).startswith("infer.py: model.onnx is missing from the bundle")
    (bundle / "metadata.json").unlink()
    done = run_infer(bundle, photo)
    assert done.returncode == 3 and one_line(done).startswith("infer.py: metadata.json is missing beside")


def test_a_modified_model_is_refused_unless_no_verify(bundle, labelled):
    photo = str(labelled / "cat" / "p0.jpg")
    intact = run_infer(bundle, photo)
    assert intact.returncode == 0, intact.stderr
    flip_a_weight_byte(bundle / "model.onnx")
    done = run_infer(bundle, photo)
    assert done.returncode == 3
    assert one_line(done) == (
        "infer.py: model.onnx is modified: its sha256 differs from metadata.json — copy it "
        "again from the original bundle, or pass --no-verify if you changed it on purpose"
    )
    forced = run_infer(bundle, photo, "--no-verify")
    assert forced.returncode == 0 and "--no-verify" in forced.stderr
    assert forced.stdout != intact.stdout  # the flipped weight really runs


def test_usage_mistakes_exit_2(built):
    out = built[0]
    for args in ((), ("--check", "x.jpg"), ("--top", "0", "x.jpg")):
        done = run_infer(out, *args)
        assert done.returncode == 2 and "Traceback" not in done.stderr


# --- DeepStream --------------------------------------------------------------------------------------------------


def test_deepstream_config_and_labels(built):
    """The config's fixed facts for this (centre-crop, FP32) bundle; tests/test_deepstream.py applies it to images."""
    import configparser

    out = built[0]
    meta = json.loads((out / "metadata.json").read_text())
    text = (out / "config_infer_primary.txt").read_text()
    parser = configparser.ConfigParser()
    parser.read_string(text)
    prop = parser["property"]
    assert (prop["onnx-file"], prop["model-engine-file"], prop["labelfile-path"]) == (
        "model_deepstream.onnx",
        "model_deepstream.onnx_b4_gpu0_fp32.engine",
        "labels.txt",
    )
    assert prop["network-mode"] == "0" and prop["network-type"] == "1" and prop["infer-dims"] == f"3;{SIZE};{SIZE}"
    assert prop["model-color-format"] == "0" and prop["output-blob-names"] == "probabilities"
    assert prop["batch-size"] == "4" and (prop["net-scale-factor"], prop["offsets"]) == ("1", "0;0;0")
    assert (out / "labels.txt").read_text() == ";".join(CLASSES) + "\n"
    assert meta["deepstream"]["source_onnx"] == "model.onnx" and meta["deepstream"]["exactness"]["passed"]
    # this bundle centre-crops: the config says nvinfer cannot, and what to do
    assert meta["deepstream"]["geometry"]["matches"] is False and "nvinfer cannot crop" in text


@pytest.mark.parametrize(
    "mode, crop, aspect, matches",
    [("squash", 1.0, 0, True), ("squash", 0.9, 0, False), ("center", 0.875, 0, False), ("border", 1.0, 1, False)],
)
def test_deepstream_resize_per_crop_mode(mode, crop, aspect, matches):
    from peftx.exports.deepstream import geometry

    geo = geometry({**DATA_CONFIG, "crop_mode": mode, "crop_pct": crop})
    assert (geo.maintain_aspect_ratio, geo.symmetric_padding, geo.matches) == (aspect, aspect, matches)
    assert matches or "re-train with" in geo.note


def test_deepstream_network_mode_per_precision_and_labels():
    from peftx.exports.deepstream import labels_text, render_config

    prep = {**DATA_CONFIG, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    for precision, mode in (("fp32", "0"), ("fp16", "2"), ("int8", "1")):
        text, entry = render_config(prep, precision=precision, batch=1)
        assert f"\nnetwork-mode={mode}\n" in text and entry["engine_file"].endswith(f"_b1_gpu0_{precision}.engine")
    labels, warnings = labels_text(["a;b", "c"])
    assert labels == "a,b;c\n" and len(warnings) == 1


def test_check_with_tensorrt_needs_an_engine(built):
    out = built[0]
    done = run_infer(out, "--check", "--backend", "tensorrt")
    assert done.returncode == 1
    assert "FAIL  model.engine: missing — build it with ./build_engine.sh" in done.stdout.splitlines()


def test_check_runs_a_real_engine(labelled, tmp_path):
    """Where TensorRT exists: an engine built for the bundle passes --check under TensorRT (skipped elsewhere)."""
    pytest.importorskip("tensorrt")
    from peftx.exports.tensorrt import tensorrt_available

    if not tensorrt_available():
        pytest.skip("TensorRT cannot build here (no GPU)")
    reference = make_tiny("vit", num_classes=len(CLASSES))
    accuracy = select(labelled_folder(labelled, CLASSES, DATA_CONFIG), "labelled", None)
    images = np.stack([accuracy.dataset[i][0].numpy() for i in range(8)])
    out = tmp_path / "bundle"
    write_photo_bundle(out, reference, images, precision="fp16", tensorrt="on", accuracy_set=accuracy)
    done = run_infer(out, "--check", "--backend", "tensorrt")
    assert done.returncode == 0, done.stdout + done.stderr
    assert any(line.startswith("PASS  fp16 model.engine (tensorrt)") for line in done.stdout.splitlines())


def test_without_labelled_images_the_parity_images_are_the_reference_set(labelled, tmp_path):
    """No labelled files on disk: the reference set is the (real, unlabelled) parity images, no raw files; --check
    still runs every artifact, says the preprocessing could not be checked, and names a precision it lacks."""
    from timm.data import create_transform

    reference = make_tiny("vit", seed=3, num_classes=len(CLASSES))
    transform = create_transform(**DATA_CONFIG)
    images = torch.stack([transform(Image.open(p).convert("RGB")) for p in sorted(labelled.rglob("*.*"))[:6]])
    out = tmp_path / "bundle"
    write_photo_bundle(out, reference, images, precision="fp16", tensorrt="off")
    with np.load(out / "reference_set.npz", allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["inputs"], images.numpy())
        assert (npz["labels"] == -1).all() and len(npz["raw_files"]) == 0
    done = run_infer(out, "--check")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "skip  preprocessing: not checked (the bundle holds no raw image files)" in lines
    assert any(line.startswith("PASS  fp16 model_fp16.onnx (onnxruntime)") for line in lines)  # required: fp16
    assert not any("accuracy" in line for line in lines)  # no labels, no accuracy figure
    missing = run_infer(out, "--check", "--precision", "int8")
    assert (
        missing.returncode == 1
        and missing.stdout.splitlines()[-1] == "check FAILED: this bundle has no int8 artifact to run here"
    )


def test_check_needs_only_numpy_and_a_runtime(built, labelled):
    """Without Pillow (a bare Jetson image: numpy + TensorRT or ONNX Runtime) --check still checks every artifact;
    classifying an image says in one line that Pillow is needed."""
    out = built[0]
    no_pil = "sys.modules['PIL'] = None"
    done = run_infer(out, "--check", patch=no_pil)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "skip  preprocessing: not checked (Pillow is not installed: pip install pillow)" in done.stdout
    assert any(line.startswith("PASS  fp32 model.onnx") for line in done.stdout.splitlines())
    classify = run_infer(out, str(labelled / "cat" / "p0.jpg"), patch=no_pil)
    assert classify.returncode == 1 and one_line(classify).startswith("infer.py: Pillow is not installed")
