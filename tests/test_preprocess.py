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
import shutil
import sys
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
# What the bundle ships beside infer.py: peftx's own decoding module, the file itself.
DECODING = Path(__file__).resolve().parents[1] / "peftx" / "image_decoding.py"
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
def shipped(tmp_path_factory):
    """The template infer.py as a bundle ships it: image_decoding.py (peftx's own file) beside it."""
    here = tmp_path_factory.mktemp("shipped")
    shutil.copyfile(TEMPLATE, here / "infer.py")
    shutil.copyfile(DECODING, here / "image_decoding.py")
    return load_infer_module(here / "infer.py")


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


# -- image modes: how a FILE becomes 8-bit RGB (peftx.preprocess.to_rgb and the shipped infer.py's copy) -----------


def _photo() -> Image.Image:
    return sample_photos()[1].crop((40, 20, 200, 120))  # 160 x 100, non-square, a real photo


def _write_mode_files(root: Path) -> dict[str, Path]:
    """Real files of every mode the decoding rule reads, written by PIL as cameras, scanners and editors write them."""
    from PIL import Image as PILImage

    root.mkdir(parents=True, exist_ok=True)
    photo = _photo()
    gray = np.asarray(photo.convert("L"), dtype=np.uint16)
    wide = (gray * 257 + np.random.default_rng(0).integers(0, 257, gray.shape)).astype(np.uint16)  # all 16 bits used
    files = {}

    def save(name: str, image: PILImage.Image, **kw) -> None:
        image.save(root / name, **kw)
        files[name] = root / name

    save("gray16.png", PILImage.fromarray(wide))  # I;16 (Pillow 7 reads it as I)
    save("gray16b.tif", PILImage.fromarray(wide).convert("I").convert("I;16B"))
    save("int32.tif", PILImage.fromarray(wide.astype(np.int32), "I"))
    save("float.tif", PILImage.fromarray((wide / 65535.0).astype(np.float32), "F"))
    palette = photo.convert("P", palette=PILImage.Palette.ADAPTIVE, colors=64)
    save("palette_alpha.png", palette, transparency=bytes(0 if i in (3, 7) else 128 + i for i in range(64)))
    save("palette_key.gif", palette, transparency=5)
    rgba = np.asarray(photo.convert("RGBA")).copy()
    rgba[..., 3] = np.linspace(0, 255, rgba.shape[1]).astype(np.uint8)[None]  # fully transparent to opaque
    save("rgba.png", PILImage.fromarray(rgba, "RGBA"))
    save("la.png", PILImage.fromarray(np.stack([np.asarray(photo.convert("L")), rgba[..., 3]], axis=2), "LA"))
    save("cmyk.jpg", photo.convert("CMYK"), quality=90)
    save("bilevel.png", photo.convert("1"))
    save("gray_key.png", photo.convert("L"), transparency=int(np.asarray(photo.convert("L"))[0, 0]))
    save("rgb_key.png", photo, transparency=tuple(int(v) for v in np.asarray(photo)[0, 0]))
    for name, orientation in (("phone.jpg", 6), ("mirrored.jpg", 5), ("upside_down.png", 3)):
        exif = PILImage.Exif()
        exif[0x0112] = orientation
        save(name, photo, exif=exif.tobytes(), **({"quality": 90} if name.endswith(".jpg") else {}))
    save("rotated.tif", photo, tiffinfo={0x0112: 8})
    save("rgb.png", photo)
    return files


@pytest.fixture(scope="module")
def mode_files(tmp_path_factory) -> dict[str, Path]:
    return _write_mode_files(tmp_path_factory.mktemp("modes"))


def test_the_mode_files_are_what_they_claim(mode_files):
    """The fixture's files really are in the modes the tests below are about (a 16-bit PNG is not 8-bit ...)."""
    modes = {name: Image.open(path).mode for name, path in mode_files.items()}
    assert modes["gray16.png"] in ("I;16", "I") and modes["gray16b.tif"] == "I;16B" and modes["int32.tif"] == "I"
    assert modes["float.tif"] == "F" and modes["cmyk.jpg"] == "CMYK" and modes["bilevel.png"] == "1"
    assert modes["palette_alpha.png"] == modes["palette_key.gif"] == "P" and modes["rgba.png"] == "RGBA"
    assert modes["la.png"] == "LA" and "transparency" in Image.open(mode_files["gray_key.png"]).info
    assert Image.open(mode_files["phone.jpg"]).getexif().get(0x0112) == 6
    # What Pillow's convert("RGB") made of the 16-bit file (the issue): a white frame.
    assert np.asarray(Image.open(mode_files["gray16.png"]).convert("RGB")).min() == 255


@pytest.mark.parametrize("config", ["squash (peftx default)", "center 0.875", "border 0.95"])
def test_every_mode_gives_the_same_tensor_on_the_training_side_and_in_the_shipped_infer_py(config, mode_files, shipped):
    """Raw files of every mode through the training/eval dataset and through the template infer.py: equal bits."""
    cfg = _cfg(config)
    names = sorted(mode_files)
    dataset = ImageFileDataset([(mode_files[n], 0) for n in names], build_transform(cfg, train=False, hflip=False))
    for i, name in enumerate(names):
        ours = dataset[i][0].numpy()
        theirs = shipped.preprocess(mode_files[name], _shipped_record(cfg))[0]
        assert np.array_equal(ours, theirs), f"{name}: max |Δ| {np.abs(ours - theirs).max()}"


def test_the_two_decoders_give_the_same_8_bit_rgb_and_the_rule_says_what_it_does(mode_files, shipped):
    from PIL import ImageOps

    from peftx.data import decode_image

    decoded = {}
    for name, path in mode_files.items():
        ours, theirs = decode_image(path), shipped.load_image(path)
        assert ours.mode == theirs.mode == "RGB" and np.array_equal(np.asarray(ours), np.asarray(theirs)), name
        decoded[name] = np.asarray(ours).astype(np.int64)
    photo = np.asarray(_photo()).astype(np.int64)
    gray = np.asarray(_photo().convert("L")).astype(np.int64)
    # 16-bit grayscale: round(v / 257), i.e. the 8-bit picture (within the noise added to the low byte), not white
    for name in ("gray16.png", "gray16b.tif", "int32.tif", "float.tif"):
        assert np.abs(decoded[name][..., 0] - gray).max() <= 1 and decoded[name].std() > 5, name  # white has std 0
        assert np.array_equal(decoded[name], decoded["gray16.png"]), name
    # alpha over white: the transparent left edge is white, the opaque right edge is the photo
    assert (decoded["rgba.png"][:, 0] == 255).all() and np.array_equal(decoded["rgba.png"][:, -1], photo[:, -1])
    assert (decoded["la.png"][:, 0] == 255).all() and np.array_equal(decoded["la.png"][:, -1, 0], gray[:, -1])
    index = np.asarray(Image.open(mode_files["palette_alpha.png"]))
    assert (decoded["palette_alpha.png"][index == 3] == 255).all()
    opaque = np.asarray(Image.open(mode_files["palette_key.gif"]).convert("RGB")).astype(np.int64)
    key = np.asarray(Image.open(mode_files["palette_key.gif"])) == 5
    assert key.any() and (decoded["palette_key.gif"][key] == 255).all()
    assert np.array_equal(decoded["palette_key.gif"][~key], opaque[~key])
    keyed = (photo == photo[0, 0]).all(axis=2)
    assert (decoded["rgb_key.png"][keyed] == 255).all() and np.array_equal(
        decoded["rgb_key.png"][~keyed], photo[~keyed]
    )
    # CMYK: 255 * (1 - C) * (1 - K), whatever formula this Pillow's convert uses
    cmyk = np.asarray(Image.open(mode_files["cmyk.jpg"])).astype(np.int64)
    assert np.array_equal(decoded["cmyk.jpg"], ((255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) + 127) // 255)
    assert set(np.unique(decoded["bilevel.png"])) <= {0, 255}
    # EXIF orientation: what Pillow's own ImageOps.exif_transpose shows; TIFF's tag applied by Pillow's decoder
    for name in ("phone.jpg", "mirrored.jpg", "upside_down.png"):
        expected = np.asarray(ImageOps.exif_transpose(Image.open(mode_files[name])).convert("RGB"))
        assert np.array_equal(decoded[name], expected), name
    assert decoded["phone.jpg"].shape == (160, 100, 3) and decoded["rotated.tif"].shape == (160, 100, 3)
    assert np.array_equal(decoded["rotated.tif"], np.rot90(photo))  # orientation 8: 90 degrees counter-clockwise


@pytest.mark.parametrize(
    "name,make,match",
    [
        ("hot.tif", lambda: Image.fromarray(np.full((8, 8), 4095.0, np.float32), "F"), r"mode F .*values 4095\.\.4095"),
        ("nan.tif", lambda: Image.fromarray(np.full((8, 8), np.nan, np.float32), "F"), "mode F .*NaN"),
        ("signed.tif", lambda: Image.fromarray(np.full((8, 8), -5, np.int32), "I"), r"mode I .*-5\.\.-5"),
        ("lab.tif", lambda: Image.new("LAB", (8, 8)), "image mode LAB is not one peftx decodes"),
    ],
)
def test_a_file_the_rule_refuses_is_refused_alike_with_one_line(name, make, match, tmp_path, shipped):
    import subprocess
    import sys

    from peftx.data import decode_image, load_splits
    from peftx.errors import DataError

    path = tmp_path / name
    make().save(path)
    with pytest.raises(DataError, match=match) as caught:
        decode_image(path)
    assert str(path) in caught.value.message and caught.value.hint
    with pytest.raises(shipped.ImageModeError, match=match):
        shipped.load_image(path)
    if name != "lab.tif":  # a value range is seen when the pixels are decoded: tests/test_images.py, on a real bundle
        return
    # a mode no side reads: the shipped script refuses it before any model is loaded, with one line naming the file,
    # the mode and the fix (exit 2, no traceback); training refuses it when the data is loaded
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "infer.py").write_text(TEMPLATE.read_text())
    (bundle / "image_decoding.py").write_text(DECODING.read_text())
    (bundle / "metadata.json").write_text(
        json.dumps({"status": "ok", "preprocessing": _shipped_record(_cfg("center 0.875"))})
    )
    done = subprocess.run([sys.executable, str(bundle / "infer.py"), str(path)], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert str(path) in line and " — " in line
    (tmp_path / "data" / "train" / "a").mkdir(parents=True)
    make().save(tmp_path / "data" / "train" / "a" / name)
    with pytest.raises(DataError, match="mode LAB"):
        load_splits(tmp_path / "data", _cfg("center 0.875"))


def test_mixed_modes_are_counted_for_the_training_preamble(tmp_path, mode_files):
    from peftx.cli.render import image_lines
    from peftx.data import load_splits

    for i, name in enumerate(["rgb.png", "gray16.png", "rgba.png", "phone.jpg", "cmyk.jpg"]):
        folder = tmp_path / "train" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(mode_files[name].read_bytes())
    splits = load_splits(tmp_path, _cfg("center 0.875"))
    sixteen = Image.open(mode_files["gray16.png"]).mode
    assert splits.image_modes == {"RGB": 2, sixteen: 1, "RGBA": 1, "CMYK": 1} and splits.exif_rotated == 1
    lines = image_lines(splits.image_modes, splits.exif_rotated)
    assert lines[0].startswith("mixed image modes: 2 RGB, 1 16-bit grayscale (I;16)") and "1 file turned" in lines[0]
    assert lines[1].startswith("decoded to 8-bit RGB by rule rgb8/1 (16-bit / 257, transparency over white, CMYK")
    assert image_lines({"RGB": 5}, 0) == [] and "(" not in image_lines({"RGB": 3, "L": 2}, 0)[1].split("(docs")[0]


def test_the_shipped_infer_py_decodes_with_the_file_beside_it(shipped):
    """metadata.json records peftx's DECODE_RULE for the bundle's infer.py: it decodes with image_decoding.py beside
    it (the bundle's copy of peftx's file), not with anything else."""
    from peftx import preprocess

    assert Path(shipped._decoding.__file__) == Path(shipped.__file__).parent / "image_decoding.py"
    assert shipped._decoding is not sys.modules.get("peftx.image_decoding")
    assert shipped.DECODE_RULE == preprocess.DECODE_RULE
    assert shipped.to_rgb is shipped._decoding.to_rgb and shipped.ImageModeError is shipped._decoding.ImageModeError
