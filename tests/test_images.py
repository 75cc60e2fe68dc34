"""Images as users have them, on a real run and its real bundle (issue 24).

One tiny run (a random-init ViT with a trained linear head on real sklearn digits, saved as 8-bit PNGs) and one
bundle of it, written with ``-o`` outside the run directory. On them:

* the issue's case: the same test set as 16-bit grayscale PNGs (what EL and industrial cameras write) scores what
  the 8-bit set scores, in ``peftx eval`` and in the bundle's own infer.py, image for image (Pillow's
  ``convert("RGB")`` clipped every grey level of such a file to white: the test shows that too);
* the bundle's infer.py as a user runs it: ``--json`` and ``--csv`` records, ``| head -1`` without a traceback,
  a truncated file named as truncated, a float TIFF outside 0..1 refused with one line;
* ``merge-export -o EXISTING`` refused before the model is loaded, and ``validate RUN`` naming the bundle that
  lives elsewhere. Every file is real and every process the shipped one.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config, write_digit_folder, write_tiny_weights
from PIL import Image

import peftx.deploy as deploy
from peftx.deploy import bundle_dir, merge_export
from peftx.errors import ExportError, OutputError
from peftx.evaluate import evaluate
from peftx.preprocess import DECODE_RULE
from peftx.train import train


def _as_16_bit(src: Path, dst: Path) -> None:
    """The 8-bit folder's images as 16-bit grayscale PNGs of the same picture (v * 257: the full 16-bit range)."""
    for path in sorted(src.rglob("*.png")):
        out = dst / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        gray = np.asarray(Image.open(path).convert("L"), dtype=np.uint16)
        Image.fromarray(gray * 257).save(out)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(run directory, its bundle written with -o elsewhere, 8-bit test folder, 16-bit test folder)."""
    tmp = tmp_path_factory.mktemp("images")
    folder = write_digit_folder(tmp / "data", 4, {"train": 24, "val": 8, "test": 12})
    run = tmp / "runs" / "linear"
    train(tiny_config(write_tiny_weights(tmp / "tiny.safetensors"), run, data=str(folder), method="linear", epochs=8))
    bundle = tmp / "deploy" / "bundle-jp5"
    merge_export(run, output=bundle, batch=(1, 4, 8), tensorrt="off", accuracy_limit=0)
    sixteen = tmp / "data16"
    _as_16_bit(folder / "test", sixteen / "test")
    return run, bundle, folder, sixteen


def _infer(bundle: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-I", str(bundle / "infer.py"), *args], capture_output=True, text=True, timeout=300, **kw
    )


def _json_records(bundle: Path, folder: Path) -> dict[str, dict]:
    """infer.py --json over every class folder of ``folder``: record per file name ('<class>/<i>.png')."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    done = _infer(bundle, *map(str, classes), "--json", "--top", "3")
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    return {str(Path(r["path"]).relative_to(folder)): r for r in records}


@pytest.mark.slow
def test_a_16_bit_test_set_scores_what_its_8_bit_version_scores(made):
    run, bundle, folder, sixteen = made
    files = sorted(sixteen.rglob("*.png"))
    assert len(files) == 48 and {Image.open(p).mode for p in files} <= {"I;16", "I"}
    # what Pillow's convert("RGB") made of these files (what eval and infer.py saw before): every stroke clipped to
    # white, the grey levels of the 8-bit originals gone
    for path in files[:5]:
        assert set(np.unique(np.asarray(Image.open(path).convert("RGB")))) <= {0, 255}
        assert len(np.unique(np.asarray(Image.open(folder / path.relative_to(sixteen))))) > 2
    eight = evaluate(run, data=str(folder), split="test")
    sixteen_bit = evaluate(run, data=str(sixteen), split="test")
    assert eight["n"] == sixteen_bit["n"] == 48 and eight["accuracy"] > 0.4  # chance is 0.25
    assert sixteen_bit["accuracy"] == eight["accuracy"]
    assert sixteen_bit["confusion_matrix"] == eight["confusion_matrix"]
    # the bundle's infer.py on the raw files: the same classes and probabilities, file for file
    ours, theirs = _json_records(bundle, folder / "test"), _json_records(bundle, sixteen / "test")
    assert sorted(ours) == sorted(theirs) and len(ours) == 48
    for name, record in ours.items():
        assert theirs[name]["top"] == record["top"], name
    meta = json.loads((bundle / "metadata.json").read_text())
    assert meta["image_decoding"]["rule"] == DECODE_RULE and "16-bit" in meta["image_decoding"]["description"]
    assert "DECODE_RULE = " + json.dumps(DECODE_RULE) in (bundle / "image_decoding.py").read_text()  # infer.py's


def test_infer_py_json_and_csv_give_one_record_per_image(made):
    _, bundle, folder, _ = made
    images = folder / "test" / "2"
    names = sorted(p.name for p in images.glob("*.png"))
    done = _infer(bundle, str(images), "--json", "--top", "3")
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [Path(r["path"]).name for r in records] == names
    meta = json.loads((bundle / "metadata.json").read_text())
    for record in records:
        top = record["top"]
        assert [t["rank"] for t in top] == [1, 2, 3] and {t["label"] for t in top} <= set(meta["class_names"])
        probs = [t["probability"] for t in top]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        # probability is the softmax of the logits: their ratio is exp of the logit difference
        assert math.isclose(probs[0] / probs[1], math.exp(top[0]["logit"] - top[1]["logit"]), rel_tol=1e-4)
    done = _infer(bundle, str(images), "--csv", "--top", "2")
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert list(rows[0]) == ["path"] + [f"{w}_{r}" for r in (1, 2) for w in ("label", "index", "probability", "logit")]
    assert [Path(r["path"]).name for r in rows] == names
    for row, record in zip(rows, records, strict=True):
        assert row["label_1"] == record["top"][0]["label"] and row["label_2"] == record["top"][1]["label"]
        assert math.isclose(float(row["probability_1"]), record["top"][0]["probability"], rel_tol=1e-5)
    both = _infer(bundle, str(images), "--json", "--csv")
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_infer_py_into_a_closed_pipe_ends_quietly(made):
    """`python infer.py DIR | head -1`: the reader goes away after one line; no traceback, exit 141 (as cat's)."""
    _, bundle, folder, _ = made
    many = [str(folder / "test" / c) for c in ("0", "1", "2", "3")] * 40  # ~2,000 records: more than a pipe holds
    proc = subprocess.Popen(
        [sys.executable, "-I", str(bundle / "infer.py"), *many, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # what head does after its line
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, stderr
    assert json.loads(first)["top"] and "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
    assert stderr.strip().splitlines() == [line for line in stderr.strip().splitlines() if line.startswith("backend")]
    shell = subprocess.run(
        f"{sys.executable} -I {bundle / 'infer.py'} {' '.join(many)} | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert len(shell.stdout.splitlines()) == 1 and "Traceback" not in shell.stderr, shell.stderr


def test_a_truncated_image_is_named_as_truncated(made, tmp_path):
    _, bundle, folder, _ = made
    from peftx.data import sample_photos

    jpeg, png = tmp_path / "cut.jpg", tmp_path / "cut.png"
    buffer = io.BytesIO()
    sample_photos()[0].save(buffer, format="JPEG", quality=90)
    jpeg.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # a copy that stopped half-way
    data = next((folder / "test" / "0").glob("*.png")).read_bytes()
    png.write_bytes(data[: len(data) - 30])
    for path in (jpeg, png):
        done = _infer(bundle, str(path))
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        *before, line = done.stderr.strip().splitlines()  # a JPEG's header verifies: the backend line comes first
        assert all(b.startswith("backend: ") for b in before), done.stderr
        assert line.startswith(f"infer.py: {path} is truncated or corrupt: ") and "pass .jpg" not in line, line


def test_a_file_the_decoding_rule_refuses_stops_infer_py_with_one_line(made, tmp_path):
    _, bundle, _, _ = made
    hot = tmp_path / "thermal.tif"
    Image.fromarray(np.linspace(0, 4095, 64, dtype=np.float32).reshape(8, 8), "F").save(hot)
    done = _infer(bundle, str(hot))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert str(hot) in line and "mode F (32-bit float)" in line and "values 0..4095" in line
    assert "scale it to 0..1" in line


def test_merge_export_to_an_existing_bundle_is_refused_before_the_model_loads(made, monkeypatch):
    run, bundle, _, _ = made

    def loading(*_a, **_k):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(deploy, "load_reference", loading)
    with pytest.raises(OutputError, match=re.escape(f"{bundle} already exists")) as err:
        merge_export(run, output=bundle, tensorrt="off")
    assert "--force" in err.value.hint
    (run / "bundle").mkdir()  # the default output (RUN/bundle) too
    (run / "bundle" / "metadata.json").write_text("{}")
    try:
        with pytest.raises(OutputError, match="already exists"):
            merge_export(run, tensorrt="off")
    finally:
        (run / "bundle" / "metadata.json").unlink()
        (run / "bundle").rmdir()


def test_validate_on_a_run_names_its_bundles_written_elsewhere(made, tmp_path, monkeypatch):
    run, bundle, _, _ = made
    with pytest.raises(ExportError, match="has no bundle/ of its own; its bundle is") as err:
        bundle_dir(run)
    assert str(bundle) in err.value.message and err.value.hint == f"validate one: peftx validate {bundle}"
    # a run exported before bundles.json existed: found by a look next to the run (its metadata names the adapter)
    record = run / deploy.BUNDLES_FILE
    saved = record.read_text()
    record.unlink()
    monkeypatch.chdir(bundle.parent.parent)  # the working directory the user exported from
    try:
        with pytest.raises(ExportError, match=re.escape(str(bundle))):
            bundle_dir(run)
        monkeypatch.chdir(tmp_path)
        lonely = tmp_path / "lonely"
        lonely.mkdir()
        (lonely / "adapter.safetensors").write_bytes((run / "adapter.safetensors").read_bytes())
        with pytest.raises(ExportError, match="export it first"):
            bundle_dir(lonely)
    finally:
        record.write_text(saved)
