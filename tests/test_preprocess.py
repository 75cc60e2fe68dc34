"""The preprocessing contract: the training-side transform and the SHIPPED infer.py give equal input tensors.

Raw non-square files (real photos and digits on wide canvases, PNG and JPEG) go through ``load_splits``' own
dataset path (what training's evaluation and ``peftx eval`` feed the model) and through the bundle's infer.py
(``load_image`` + ``preprocess_image`` with metadata.json's record), for peftx's default (squash) and for crop_pct < 1
configs in every crop mode. The tensors must be equal to the bit, and the configs must differ from each other on
these files (so equality is not a property of the images).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from peftx.adapter_io import _record_problem
from peftx.data import ImageFileDataset, build_transform, load_splits, sample_photos
from peftx.errors import UsageError
from peftx.exports.accuracy import load_infer_module
from peftx.preprocess import TRAINING, contract, eval_transform

TEMPLATE = Path(__file__).resolve().parents[1] / "exports" / "templates" / "infer.py"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CONFIGS = {
    "squash (peftx default)": {"input_size": (3, 32, 32), "interpolation": "bicubic", **TRAINING},
    "center 0.875": {"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_mode": "center", "crop_pct": 0.875},
    "center 0.9 non-square input": {
        "input_size": (3, 28, 40),
        "interpolation": "bilinear",
        "crop_mode": "center",
        "crop_pct": 0.9,
    },
    "border 0.95": {"input_size": (3, 36, 36), "interpolation": "bicubic", "crop_mode": "border", "crop_pct": 0.95},
    "squash 0.8": {"input_size": (3, 32, 32), "interpolation": "lanczos", "crop_mode": "squash", "crop_pct": 0.8},
}


def _cfg(name: str) -> dict:
    return {**CONFIGS[name], "mean": MEAN, "std": STD}


def _shipped_record(cfg: dict) -> dict:
    """The preprocessing as metadata.json carries it (what the shipped infer.py reads)."""
    return json.loads(json.dumps(contract(cfg)))


@pytest.fixture(scope="module")
def raw_files(tmp_path_factory) -> list[Path]:
    """Real non-square image files: photo crops of several aspect ratios and digits on a 3:1 canvas."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("raw")
    photos = sample_photos()
    files = []
    for i, (w, h) in enumerate([(640, 427), (300, 420), (611, 203), (97, 301), (256, 255)]):
        path = root / f"photo{i}.{'jpg' if i % 2 else 'png'}"
        photos[i % 2].crop((0, 0, w, h)).save(path)
        files.append(path)
    digits = load_digits()
    for i in range(3):
        canvas = np.zeros((8, 24), np.uint8)
        canvas[:, 8 * i : 8 * i + 8] = np.clip(np.rint(digits.images[i] * 255 / 16), 0, 255).astype(np.uint8)
        path = root / f"digit{i}.png"
        Image.fromarray(canvas).convert("RGB").resize((72, 24), Image.Resampling.NEAREST).save(path)
        files.append(path)
    return files


@pytest.fixture(scope="module")
def shipped():
    return load_infer_module(TEMPLATE)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_shipped_infer_py_gives_the_training_tensors_on_raw_non_square_files(name, raw_files, shipped):
    cfg = _cfg(name)
    dataset = ImageFileDataset([(p, 0) for p in raw_files], build_transform(cfg, train=False, hflip=False))
    train_side = ImageFileDataset([(p, 0) for p in raw_files], build_transform(cfg, train=True, hflip=False))
    record = _shipped_record(cfg)
    for i, path in enumerate(raw_files):
        ours = dataset[i][0].numpy()
        theirs = shipped.preprocess(path, record)[0]
        assert theirs.dtype == np.float32 and theirs.shape == (3, *cfg["input_size"][1:])
        assert np.array_equal(ours, theirs), f"{path.name}: max |Δ| {np.abs(ours - theirs).max()}"
        assert np.array_equal(train_side[i][0].numpy(), theirs)  # training without flips sees the same pixels


def test_the_configs_differ_on_these_files_so_equality_is_not_an_accident(raw_files, shipped):
    """Where squash and centre-crop would agree the test above proves nothing: they must differ here, as they do
    for the pre-contract bundles (training squashed, infer.py centre-cropped)."""
    squash, center = _cfg("squash (peftx default)"), _cfg("center 0.875")
    for path in raw_files[:4] + raw_files[-3:]:
        trained = eval_transform(squash)(Image.open(path).convert("RGB")).numpy()
        old_bundle = shipped.preprocess(path, _shipped_record(center))[0]  # what a centre-cropping infer.py fed
        assert np.abs(trained - old_bundle).max() > 0.1, path.name


def test_equal_on_a_grid_of_sizes_modes_filters_and_crop_pcts(shipped):
    photos = sample_photos()
    rng = np.random.default_rng(0)
    images = [photos[i % 2].crop((0, 0, int(rng.integers(60, 640)), int(rng.integers(60, 427)))) for i in range(4)]
    grid = itertools.product(
        ("squash", "center", "border"),
        (1.0, 0.875, 0.95),
        ((3, 32, 32), (3, 24, 40)),
        ("bicubic", "bilinear", "nearest", "box", "hamming", "lanczos"),
    )
    for mode, pct, size, interpolation in grid:
        cfg = {
            "input_size": size,
            "interpolation": interpolation,
            "mean": MEAN,
            "std": STD,
            "crop_pct": pct,
            "crop_mode": mode,
        }
        transform, record = eval_transform(cfg), _shipped_record(cfg)
        for image in images:
            assert np.array_equal(transform(image).numpy(), shipped.preprocess_image(image, record)), (cfg, image.size)


def test_load_splits_uses_the_recorded_contract(tmp_path, raw_files, shipped):
    """The datasets training and `peftx eval` build from an ImageFolder apply the contract they are given."""
    for split in ("train", "val", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        for path in raw_files[:3]:
            Image.open(path).convert("RGB").save(tmp_path / split / "a" / f"{path.stem}.png")
    cfg = _cfg("center 0.9 non-square input")
    test = load_splits(tmp_path, cfg).test
    for i, (path, _) in enumerate(test.samples):
        assert np.array_equal(test[i][0].numpy(), shipped.preprocess(path, _shipped_record(cfg))[0])


def test_a_record_without_crop_mode_reads_as_the_whole_image_it_was_trained_on():
    """Runs written before the contract trained on the whole image resized to H x W, whatever crop_pct said."""
    legacy = {
        "input_size": [3, 32, 32],
        "interpolation": "bicubic",
        "mean": list(MEAN),
        "std": list(STD),
        "crop_pct": 0.9,
    }
    c = contract(legacy)
    assert c["crop_mode"] == "squash" and c["crop_pct"] == 1.0
    photo = sample_photos()[0]
    expected = torch.from_numpy(np.asarray(photo.resize((32, 32), Image.Resampling.BICUBIC), np.float32) / 255.0)
    expected = ((expected - torch.tensor(MEAN)) / torch.tensor(STD)).permute(2, 0, 1)
    assert torch.equal(eval_transform(legacy)(photo), expected)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"crop_mode": "stretch"}, "crop_mode 'stretch' is not a crop mode"),
        ({"crop_pct": 1.2}, r"crop_pct 1.2 is outside \(0, 1\]"),
        ({"crop_pct": 0}, r"crop_pct 0 is outside"),
        ({"interpolation": "cubicle"}, "unknown interpolation 'cubicle'"),
        ({"input_size": (1, 32, 32)}, r"is not \[3, height, width\]"),
        ({"mean": (0.5, 0.5)}, "has 2 values for 3 channels"),
        ({"std": (0.5, 0.0, 0.5)}, "is not positive"),
    ],
)
def test_the_contract_refuses_what_the_shipped_code_cannot_reproduce(change, match):
    with pytest.raises(UsageError, match=match):
        contract({**_cfg("center 0.875"), **change})


def test_a_damaged_recorded_contract_is_a_damaged_adapter_file():
    base = {"num_classes": 3, "config": {"method": "rlrr"}}
    good = contract(_cfg("center 0.875"))
    assert _record_problem({**base, "data_config": good}) is None
    assert "crop_mode" in _record_problem({**base, "data_config": {**good, "crop_mode": "stretch"}})
    assert "interpolation" in _record_problem({**base, "data_config": {**good, "interpolation": "x"}})
    assert "crop_pct" in _record_problem({**base, "data_config": {**good, "crop_pct": 2.0}})
