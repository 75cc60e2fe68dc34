"""A bundle's infer.py on the Python a device has, in subprocesses of other interpreters.

``jp5``: JetPack 5's stack (CPython 3.8, Pillow 7.0.0, numpy 1.21.6, onnxruntime 1.16.3); ``new``: the newest
(CPython 3.13 or 3.12, the newest Pillow, numpy 2 and onnxruntime). Each is a venv made by
scripts/setup-device-venvs.sh (``make test`` makes them first), run with ``-I``: neither peftx nor torch exists there.
The bundle is a real INT8 bundle of a tiny timm ViT written by the library here; the same infer.py run by the
interpreter of this suite (the lock's stack) is the yardstick each device stack's answers are compared with.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CROP_DATA_CONFIG, make_tiny, write_tiny_bundle
from PIL import Image

from peftx.data import labelled_folder, sample_photos
from peftx.errors import ParityError
from peftx.exports import int8
from peftx.exports.accuracy import select
from peftx.preprocess import eval_transform

pytestmark = pytest.mark.slow  # infer.py run in the JetPack 5 and newest device venvs: make test-fast skips the module

ROOT = Path(__file__).resolve().parents[1]
STACKS = ("jp5", "new")
CLASSES = [f"c{i}" for i in range(5)]
DATA_CONFIG = CROP_DATA_CONFIG
# What each stack must be (a venv that silently resolved something else would not test the device's stack).
EXPECTED = {
    "jp5": lambda v: (
        v["python"][:2] == [3, 8] and v["PIL"] == "7.0.0" and v["numpy"] == "1.21.6" and v["onnxruntime"] == "1.16.3"
    ),
    "new": lambda v: (
        v["python"][:2] >= [3, 12] and int(v["PIL"].split(".")[0]) >= 11 and int(v["numpy"].split(".")[0]) >= 2
    ),
}
PROBE = (
    "import importlib.util, json, sys, PIL, numpy, onnxruntime\n"
    "print(json.dumps({'python': list(sys.version_info[:3]), 'PIL': PIL.__version__, 'numpy': numpy.__version__,\n"
    "    'onnxruntime': onnxruntime.__version__,\n"
    "    'importable': [m for m in ('peftx', 'torch', 'timm') if importlib.util.find_spec(m) is not None]}))\n"
)


def device_python(name: str) -> Path:
    """The interpreter of device venv ``name``; the test skips (saying how to make it) when the venv does not exist."""
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "setup-device-venvs.sh"), "--path", name], capture_output=True, text=True
    )
    venv = Path(done.stdout.strip() or "/nonexistent")
    if done.returncode != 0 or not (venv / ".complete").is_file():
        pytest.skip(
            f"the {name} device venv does not exist ({done.stderr.strip() or venv}): run "
            "scripts/setup-device-venvs.sh (make test does)"
        )
    return venv / "bin" / "python"


def run(python: Path | str, *args: str, cwd: Path, code: str | None = None) -> subprocess.CompletedProcess:
    """``python -I`` (no PYTHONPATH, user site or working directory on sys.path) on infer.py or on ``code``."""
    head = ["-c", code] if code is not None else []
    return subprocess.run(
        [str(python), "-I", *head, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin"},
    )


def one_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    return lines[0]


def top_k(stdout: str) -> dict[str, list[tuple[int, float]]]:
    """infer.py's printout: {image: [(class index, probability), ...]} ('# path' heads each image of several)."""
    out: dict[str, list[tuple[int, float]]] = {}
    current = ""
    for line in stdout.splitlines():
        if line.startswith("# "):
            current = Path(line[2:]).name
        else:
            _rank, prob, index, _label = line.split("\t")
            out.setdefault(current, []).append((int(index), float(prob)))
    return out


def verdicts(stdout: str) -> list[str]:
    """--check's verdict lines without their figures: 'PASS  fp32 model.onnx (onnxruntime)', ..."""
    keep = ("PASS", "FAIL", "fail", "skip")
    return [re.split(r":", line, maxsplit=1)[0] for line in stdout.splitlines() if line.startswith(keep)]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """REAL image files, as a user has them: non-square JPEG crops of sklearn's photos and a grayscale PNG digit."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(5)
    for i, photo in enumerate(sample_photos() * 3):
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.2, 0.8)), int(h * rng.uniform(0.2, 0.8))
        left, top = int(rng.integers(0, w - cw)), int(rng.integers(0, h - ch))
        photo.crop((left, top, left + cw, top + ch)).save(root / f"photo{i}.jpg", quality=92)
    digit = np.clip(np.rint(load_digits().images[7] * (255 / 16)), 0, 255).astype(np.uint8)
    Image.fromarray(digit).resize((24, 24), Image.NEAREST).save(root / "digit.png")  # mode L: grayscale
    return root


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An INT8 bundle (model.onnx, model_fp16.onnx, model_int8.onnx) of a tiny ViT, labelled with its own top-1 on
    real photo crops written to disk (the gate then measures INT8 agreement; see tests/test_int8.py)."""
    model = make_tiny("vit", seed=3)
    transform = eval_transform(DATA_CONFIG)
    photos, rng = sample_photos(), np.random.default_rng(11)
    crops = []
    for i in range(120):
        photo = photos[i % 2]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.3, 0.9)), int(h * rng.uniform(0.3, 0.9))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crops.append(photo.crop((left, top, left + cw, top + ch)).convert("RGB"))
    with torch.no_grad():
        labels = model(torch.stack([transform(c) for c in crops])).argmax(1).tolist()
    folder = tmp_path_factory.mktemp("labelled")
    for i, (crop, label) in enumerate(zip(crops, labels, strict=True)):
        (folder / CLASSES[label]).mkdir(exist_ok=True)
        crop.save(folder / CLASSES[label] / f"{i}.png")
    dataset = labelled_folder(folder, CLASSES, DATA_CONFIG)
    calibration = int8.select_calibration(dataset, dataset.targets, 48, 0, "photo crops")
    out = tmp_path_factory.mktemp("bundles") / "bundle"
    try:
        write_tiny_bundle(
            out,
            model,
            data_config=DATA_CONFIG,
            class_names=CLASSES,
            images=torch.stack([transform(c) for c in crops[:8]]),
            precision="int8",
            accuracy_set=select(dataset, "photo crops", None),
            int8=calibration,
        )
    except ParityError:  # the INT8 gate is not what is tested here (tests/test_int8.py): the bundle is written anyway
        pass
    assert (out / "model_int8.onnx").is_file() and (out / "reference").is_dir()
    return out


@pytest.fixture(scope="module")
def host(
    bundle: Path, images: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, subprocess.CompletedProcess]:
    """The yardstick: the same infer.py under this suite's interpreter (the lock's Pillow, numpy, onnxruntime)."""
    cwd = tmp_path_factory.mktemp("elsewhere")
    return {
        "files": run(sys.executable, str(bundle / "infer.py"), str(images), "--precision", "fp32", cwd=cwd),
        "int8": run(sys.executable, str(bundle / "infer.py"), str(images), "--precision", "int8", cwd=cwd),
        "check": run(sys.executable, str(bundle / "infer.py"), "--check", cwd=cwd),
        "check_int8": run(sys.executable, str(bundle / "infer.py"), "--check", "--precision", "int8", cwd=cwd),
    }


@pytest.mark.parametrize("stack", STACKS)
def test_the_device_venv_is_the_stack_it_stands_for_and_holds_no_peftx_or_torch(stack):
    python = device_python(stack)
    done = run(python, cwd=ROOT, code=PROBE)  # from the clone's root: -I keeps its peftx/ off sys.path
    assert done.returncode == 0, done.stderr
    import json

    versions = json.loads(done.stdout)
    assert versions["importable"] == [], f"{stack} can import {versions['importable']}"
    assert EXPECTED[stack](versions), versions


@pytest.mark.parametrize("stack", STACKS)
def test_files_and_a_directory_classify_as_on_the_host_from_another_directory(stack, bundle, images, host, tmp_path):
    python = device_python(stack)
    assert host["files"].returncode == 0, host["files"].stderr
    expected = top_k(host["files"].stdout)
    names = sorted(expected)
    assert len(names) == len(list(images.iterdir())) >= 7
    # a directory, given relative to a working directory that is neither the bundle's nor the images'
    shutil.copytree(images, tmp_path / "work" / "imgs")
    by_dir = run(python, str(bundle / "infer.py"), "imgs", "--precision", "fp32", cwd=tmp_path / "work")
    assert by_dir.returncode == 0, by_dir.stderr
    assert "backend: onnxruntime (model.onnx, fp32)" in by_dir.stderr
    files = run(python, str(bundle / "infer.py"), *(str(images / n) for n in names[:3]), cwd=tmp_path)  # int8
    assert files.returncode == 0, files.stderr
    # FP32 on a PNG: the same probabilities to the printed 4 decimals, give or take one unit (Pillow 7.0 and the
    # newest resize to the same tensor, bit for bit: benchmarks/pillow_resize.py). On a JPEG the stacks' libjpeg
    # decode a few pixel values 1-3 levels apart (docs/device.md), which moves these probabilities by up to ~1e-3.
    got = top_k(by_dir.stdout)
    assert sorted(got) == names
    for name, rows in got.items():
        atol = 5e-3 if name.endswith(".jpg") else 1.5e-4
        assert rows[0][0] == expected[name][0][0], (stack, name, rows, expected[name])
        assert np.allclose([p for _, p in rows], [p for _, p in expected[name]], rtol=0, atol=atol), (name, rows)
    # the bundle's own precision (int8) for files given by absolute path
    assert "backend: onnxruntime (model_int8.onnx, int8)" in files.stderr
    assert sorted(top_k(files.stdout)) == names[:3] and all(len(r) == 5 for r in top_k(files.stdout).values())
    single = run(python, str(bundle / "infer.py"), str(images / names[0]), "--top", "2", cwd=tmp_path)
    assert single.returncode == 0 and len(single.stdout.splitlines()) == 2, single.stderr


@pytest.mark.parametrize("stack", STACKS)
def test_int8_and_fp32_run_under_the_device_onnxruntime(stack, bundle, images, host, tmp_path):
    python = device_python(stack)
    expected = top_k(host["int8"].stdout)
    done = run(python, str(bundle / "infer.py"), str(images), "--precision", "int8", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "model_int8.onnx" in done.stderr
    got = top_k(done.stdout)
    assert sorted(got) == sorted(expected)
    agree = np.mean([got[n][0][0] == expected[n][0][0] for n in got])
    assert agree >= 0.85, (stack, agree)  # INT8 kernels differ between onnxruntime releases; top-1 mostly holds
    fp32 = run(python, str(bundle / "infer.py"), str(images), "--precision", "fp32", cwd=tmp_path)
    assert fp32.returncode == 0 and "model.onnx, fp32" in fp32.stderr, fp32.stderr


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("precision", [None, "int8"])
def test_check_gives_the_hosts_verdicts_and_the_preprocessing_holds(stack, precision, bundle, host, tmp_path):
    python = device_python(stack)
    extra = ("--precision", precision) if precision else ()
    yardstick = host["check_int8" if precision else "check"]
    done = run(python, str(bundle / "infer.py"), "--check", *extra, cwd=tmp_path)
    assert done.returncode == yardstick.returncode, done.stdout + done.stderr + yardstick.stdout
    assert verdicts(done.stdout) == verdicts(yardstick.stdout), done.stdout
    lines = done.stdout.splitlines()
    # this stack's Pillow + numpy re-make the shipped tensors from the raw files within the recorded bound
    assert any(line.startswith("PASS  preprocessing: ") for line in lines), done.stdout
    env = next(line for line in lines if line.startswith("env   Python "))
    if stack == "jp5":
        assert "Python 3.8." in env and "Pillow 7.0.0" in env and "numpy 1.21.6" in env and "onnxruntime 1.16.3" in env
    assert "TensorRT not installed" in env
    if precision is None:
        assert any(line.startswith("PASS  fp32 model.onnx (onnxruntime)") for line in lines), done.stdout


@pytest.mark.parametrize("stack", STACKS)
def test_bad_input_and_missing_packages_are_one_line_under_each_stack(stack, bundle, tmp_path):
    python = device_python(stack)
    missing = run(python, str(bundle / "infer.py"), "nope.jpg", cwd=tmp_path)
    assert missing.returncode == 2 and one_line(missing) == "infer.py: nope.jpg does not exist"
    # numpy missing: one line (it is the only package every use needs), not an ImportError traceback
    no_numpy = (
        "import runpy, sys\nsys.modules['numpy'] = None\nsys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    done = run(python, str(bundle / "infer.py"), "--check", cwd=tmp_path, code=no_numpy)
    assert done.returncode == 1 and one_line(done).startswith("infer.py: numpy is not installed — pip install numpy")
    # a Pillow older than any this infer.py was run with is named by --check (the version is what PIL reports)
    old_pillow = "import PIL, PIL.Image\nPIL.__version__ = '6.2.1'\n" + no_numpy.replace(
        "sys.modules['numpy'] = None\n", ""
    )
    done = run(python, str(bundle / "infer.py"), "--check", cwd=tmp_path, code=old_pillow)
    assert "warn  Pillow 6.2.1 is older than any this infer.py was tested with (7.0.0): upgrade it" in done.stdout


# --- JPEG decoding: another libjpeg is told apart from another preprocessing -----------------------------------------


@pytest.fixture(scope="module")
def jpeg_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An FP32 bundle whose reference/ holds JPEG photo crops (as a user's own photos are) and PNG digits."""
    from sklearn.datasets import load_digits

    model = make_tiny("vit", seed=2, num_classes=2)
    folder = tmp_path_factory.mktemp("jpegs")
    photos, digits, rng = sample_photos(), load_digits().images, np.random.default_rng(3)
    for c, name in enumerate(("a", "b")):
        (folder / name).mkdir()
        for i in range(4):
            photo = photos[(i + c) % 2]
            w, h = photo.size
            cw, ch = int(w * rng.uniform(0.3, 0.6)), int(h * rng.uniform(0.3, 0.6))
            photo.crop((0, 0, cw, ch)).save(folder / name / f"p{i}.jpg", quality=90)
            pixels = np.clip(np.rint(digits[4 * c + i] * (255 / 16)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"d{i}.png")
    dataset = labelled_folder(folder, ["a", "b"], DATA_CONFIG)
    out = tmp_path_factory.mktemp("jpeg-bundle") / "bundle"
    write_tiny_bundle(
        out,
        model,
        data_config=DATA_CONFIG,
        class_names=["a", "b"],
        images=torch.stack([dataset[i][0] for i in range(4)]),
        batch=(1, 2, 4),
        accuracy_set=select(dataset, "photo crops and digits", None),
    )
    raw = sorted(p.suffix for p in (out / "reference").iterdir())
    assert ".jpg" in raw and ".png" in raw, raw
    return out


def test_jetpack5s_jpeg_decoder_is_named_and_the_preprocessing_still_judged(jpeg_bundle, tmp_path):
    """Pillow 7.0's libjpeg decodes these JPEGs to other pixels (measured: docs/device.md): --check names those
    files and judges the preprocessing on the PNGs, which it decodes alike; the newest Pillow decodes all alike."""
    done = run(device_python("jp5"), str(jpeg_bundle / "infer.py"), "--check", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(line for line in done.stdout.splitlines() if "preprocessing" in line)
    assert line.startswith("PASS  preprocessing: ") and "through Pillow 7.0.0" in line, line
    assert "decode to other pixels under this Pillow (its image decoder, not the preprocessing" in line
    named = re.search(r"\(((?:reference/\S+?(?:, )?)+)\) decode", line)
    assert named and all(name.endswith(".jpg") for name in named.group(1).split(", ")), line
    newest = run(device_python("new"), str(jpeg_bundle / "infer.py"), "--check", cwd=tmp_path)
    assert newest.returncode == 0 and "decode to other pixels" not in newest.stdout, newest.stdout


def test_a_resize_difference_still_fails_under_jetpack5(jpeg_bundle, tmp_path):
    """The split must not excuse a real preprocessing difference: Pillow 7 forced to nearest-neighbour fails."""
    patch = (
        "import runpy, sys\nfrom PIL import Image\nresize = Image.Image.resize\n"
        "Image.Image.resize = lambda self, size, resample=None, *a, **k: resize(self, size, Image.NEAREST)\n"
        "sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    done = run(device_python("jp5"), str(jpeg_bundle / "infer.py"), "--check", cwd=tmp_path, code=patch)
    assert done.returncode == 1 and done.stdout.splitlines()[-1].startswith("check FAILED: preprocessing"), done.stdout


# --- the bundle's README.md -----------------------------------------------------------------------------------------


def test_the_bundles_readme_says_what_ci_checked_and_its_commands_run(bundle, jpeg_bundle, images, host, tmp_path):
    from peftx.exports.templates import infer as shipped

    text = (bundle / "README.md").read_text(encoding="utf-8")
    fp32 = (jpeg_bundle / "README.md").read_text(encoding="utf-8")
    assert not re.search(r"@[A-Z0-9_]+@", text + fp32), "an unreplaced @PLACEHOLDER@"
    assert "precision **int8**" in text and "`model_int8.onnx`" in text and "./build_engine.sh fp32|fp16|int8" in text
    assert "precision **fp32**" in fp32 and "int8" not in fp32.replace("INT8", "")
    assert "\n## DeepStream\n" in text
    # the JetPack 5 stack it names is the one CI runs infer.py under
    pins = dict(
        line.split("==") for line in (ROOT / "requirements-device-jp5.txt").read_text().splitlines() if "==" in line
    )
    assert f"numpy=={pins['numpy']}" in text and f"onnxruntime=={pins['onnxruntime']}" in text
    assert f"Pillow 7.0.0 + numpy {pins['numpy']} + onnxruntime {pins['onnxruntime']}" in text.replace("\n", " ")
    assert pins["pillow"] == "7.0.0"
    # the cuda-python per JetPack is the one infer.py names on that JetPack
    for spec in set(shipped.CUDA_PYTHON_FOR_L4T.values()):
        assert f"`pip install '{spec}'`" in text
    # every infer.py command it shows runs (under JetPack 5's stack), with real files for the placeholders
    python = device_python("jp5")
    (tmp_path / "photos").mkdir()
    for name in ("photo.jpg", "more.jpg"):
        shutil.copy(images / "photo0.jpg", tmp_path / name)
    shutil.copy(images / "photo1.jpg", tmp_path / "photos" / "x.jpg")
    shutil.copytree(bundle, tmp_path / "b")
    commands = [line.split("#")[0].split() for line in text.splitlines() if line.startswith("    python3 infer.py")]
    assert len(commands) >= 5
    for argv in commands:
        args = [str(tmp_path / a) if a in ("photo.jpg", "more.jpg", "photos/") else a for a in argv[2:]]
        done = run(python, str(tmp_path / "b" / "infer.py"), *args, cwd=tmp_path)
        want = host["check_int8" if "int8" in args else "check"].returncode if "--check" in args else 0
        assert done.returncode == want, (argv, done.stdout, done.stderr)


def test_the_setup_script_reuses_its_venvs_and_says_what_is_wrong_in_one_line():
    for name in STACKS:
        device_python(name)  # skips when they were never made
    script = str(ROOT / "scripts" / "setup-device-venvs.sh")
    again = subprocess.run(["bash", script], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout == "" and "creating" not in again.stderr, again.stderr
    bad = subprocess.run(["bash", script, "--path", "jp4"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr == "setup-device-venvs.sh: --path needs a name: jp5 or new, got 'jp4'\n"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "PEFTX_DEVICE_PYTHON_JP5": "/nonexistent/python3.8"}
    missing = subprocess.run(["bash", script], capture_output=True, text=True, timeout=60, env=env)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        "setup-device-venvs.sh: /nonexistent/python3.8 does not run"
    ]
