"""Datasets and transforms, on real data: sklearn digits and photos, and tiny trees of real PNG/JPEG files."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision import transforms as T

from peftx.data import (
    VAL_FRACTION,
    VAL_MAX_PER_CLASS,
    Splits,
    build_transform,
    draw_val,
    images_from_dir,
    load_eval_split,
    load_splits,
    parse_vtab_list,
    read_val_split,
    real_images,
    sample_photos,
    write_val_split,
)
from peftx.errors import DataError, UsageError

CFG = {
    "input_size": (3, 32, 32),
    "interpolation": "bicubic",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "crop_pct": 1.0,
}


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return sample_photos()[0]


def write_image(path: Path, photo: Image.Image, seed: int, fmt: str = "PNG") -> Path:
    """A real 24x24 image: a seeded crop of a sample photo."""
    rng = np.random.default_rng(seed)
    left, top = int(rng.integers(0, 600)), int(rng.integers(0, 400))
    path.parent.mkdir(parents=True, exist_ok=True)
    photo.crop((left, top, left + 24, top + 24)).save(path, format=fmt)
    return path


def make_folder(root: Path, photo: Image.Image, counts: dict[str, dict[str, int]]) -> Path:
    """ROOT/<split>/<class>/<i>.png with counts[split][class] images each."""
    seed = 0
    for split, per_class in counts.items():
        for cls, n in per_class.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                seed += 1
                write_image(root / split / cls / f"{i}.png", photo, seed)
    return root


BALANCED = {"train": {"cat": 3, "dog": 3}, "val": {"cat": 1, "dog": 1}, "test": {"cat": 2, "dog": 1}}


def make_vtab(task: Path, photo: Image.Image, lists: dict[str, list[tuple[str, int]]] | None = None) -> Path:
    """A VTAB-1k task dir with images/ and the three list files."""
    lists = lists or {
        "train800.txt": [(f"images/tr{i}.png", i % 3) for i in range(6)],
        "val200.txt": [(f"images/va{i}.png", i % 3) for i in range(3)],
        "test.txt": [(f"images/te{i}.png", i % 3) for i in range(4)],
    }
    for seed, (name, rows) in enumerate(lists.items()):
        for j, (rel, _) in enumerate(rows):
            write_image(task / rel, photo, 100 * seed + j)
        (task / name).write_text("".join(f"{rel} {label}\n" for rel, label in rows))
    return task


# ----------------------------------------------------------------------------------------------------- digits


def test_digits_split_is_stratified_60_15_25_and_seeded() -> None:
    splits = load_splits("demo", CFG)
    assert isinstance(splits, Splits)
    sizes = [len(splits.train), len(splits.val), len(splits.test)]
    assert sizes == [1077, 270, 450] and sum(sizes) == 1797
    assert splits.class_names == [str(d) for d in range(10)]
    for ds, frac in ((splits.train, 0.60), (splits.val, 0.15), (splits.test, 0.25)):
        per_class = Counter(ds.targets)
        assert set(per_class) == set(range(10))
        assert all(abs(n / (1797 * frac / 10) - 1) < 0.1 for n in per_class.values())  # stratified
    again = load_splits("digits", CFG)
    assert again.test.targets == splits.test.targets
    assert torch.equal(again.test[5][0], splits.test[5][0])
    other = load_splits("demo", CFG, seed=7)
    assert other.test.targets != splits.test.targets


def test_digits_items_are_normalised_rgb_tensors() -> None:
    splits = load_splits("demo", {**CFG, "input_size": (3, 24, 40)})
    x, y = splits.val[0]
    assert x.shape == (3, 24, 40) and x.dtype == torch.float32 and isinstance(y, int)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grey digits made RGB
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.max() > 0.5 and x.min() < -0.9  # 0-16 spread over 0-255


# ----------------------------------------------------------------------------------------------------- transforms


def test_training_transform_is_the_eval_geometry_plus_a_flip_and_nothing_random_else(photo: Image.Image) -> None:
    """No random crops: training sees the evaluation pixels, mirrored half of the time (VTAB-1k's recipe)."""
    crop = photo.crop((0, 0, 400, 250))  # non-square, so a crop or an aspect change would show
    for cfg in (CFG, {**CFG, "crop_mode": "center", "crop_pct": 0.875}):
        evaluation = build_transform(cfg, train=False, hflip=True)(crop)  # hflip is ignored outside training
        assert torch.equal(evaluation, build_transform(cfg, train=True, hflip=False)(crop))
        train = build_transform(cfg, train=True, hflip=True)
        seen = set()
        for seed in range(12):
            torch.manual_seed(seed)
            x = train(crop)
            assert torch.equal(x, evaluation) or torch.equal(x, evaluation.flip(-1))
            seen.add(torch.equal(x, evaluation))
        assert seen == {True, False}  # both the image and its mirror occur


def test_transform_normalises_with_config_mean_std(photo: Image.Image) -> None:
    cfg = {**CFG, "input_size": (3, 20, 30), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    x = build_transform(cfg, train=False, hflip=False)(photo)
    assert x.shape == (3, 20, 30)
    raw = T.ToTensor()(photo.resize((30, 20), Image.Resampling.BICUBIC))
    expected = (raw - torch.tensor(cfg["mean"])[:, None, None]) / torch.tensor(cfg["std"])[:, None, None]
    assert torch.allclose(x, expected, atol=0.02)  # PIL bicubic vs torchvision's antialiased resize rounding


def test_transform_rejects_unknown_interpolation() -> None:
    with pytest.raises(UsageError, match="cubicle"):
        build_transform({**CFG, "interpolation": "cubicle"}, train=False, hflip=False)


# ----------------------------------------------------------------------------------------------------- ImageFolder


def test_image_folder_splits(tmp_path: Path, photo: Image.Image) -> None:
    root = make_folder(tmp_path / "ds", photo, BALANCED)
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0junk")  # hidden OS files are skipped
    splits = load_splits(root, CFG, hflip=True)
    assert splits.class_names == ["cat", "dog"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 2, 3)
    assert sorted(splits.train.targets) == [0, 0, 0, 1, 1, 1]
    x, y = splits.test[0]
    assert x.shape == (3, 32, 32) and y == 0
    assert str(root) in splits.source


def test_image_folder_test_split_is_optional(tmp_path: Path, photo: Image.Image) -> None:
    root = make_folder(tmp_path / "ds", photo, {k: v for k, v in BALANCED.items() if k != "test"})
    assert load_splits(root, CFG).test is None


def test_image_folder_without_val_draws_a_seeded_stratified_split(tmp_path: Path, photo: Image.Image) -> None:
    root = make_folder(tmp_path / "ds", photo, {"train": {"cat": 10, "dog": 5, "emu": 2, "yak": 1}})
    splits = load_splits(root, CFG, seed=3)
    val = [(p.relative_to(root / "train").as_posix(), label) for p, label in splits.val.samples]
    # 20 % of each class, at least 1, never a class's only image
    assert Counter(label for _, label in val) == {0: 2, 1: 1, 2: 1}
    assert len(splits.train) + len(splits.val) == 18
    assert not {p for p, _ in splits.val.samples} & {p for p, _ in splits.train.samples}
    drawn = splits.val_drawn
    assert drawn["seed"] == 3 and drawn["fraction"] == VAL_FRACTION and drawn["files"] == [f for f, _ in val]
    assert "val drawn from train/" in splits.source
    assert load_splits(root, CFG, seed=3).val_drawn["files"] == drawn["files"]  # the same seed, the same split
    others = [load_splits(root, CFG, seed=s).val_drawn["files"] for s in (4, 5, 6)]
    assert any(o != drawn["files"] for o in others)


def test_drawn_split_per_class_is_independent_and_capped(tmp_path: Path) -> None:
    samples = [(tmp_path / f"c{c}" / f"{i}.png", c) for c in range(2) for i in range(1000)]
    chosen = draw_val(samples, ["a", "b"], seed=0)
    assert Counter(label for p, label in samples if p in chosen) == {0: VAL_MAX_PER_CLASS, 1: VAL_MAX_PER_CLASS}
    # adding images to class "b" leaves class "a"'s draw as it was
    more = samples + [(tmp_path / "c1" / f"x{i}.png", 1) for i in range(10)]
    again = draw_val(more, ["a", "b"], seed=0)
    assert {p for p in chosen if p.parent.name == "c0"} == {p for p in again if p.parent.name == "c0"}


def test_recorded_val_files_rebuild_the_run_split(tmp_path: Path, photo: Image.Image) -> None:
    root = make_folder(tmp_path / "ds", photo, {"train": {"cat": 10, "dog": 10}})
    first = load_splits(root, CFG, seed=1)
    (tmp_path / "run").mkdir()
    write_val_split(tmp_path / "run", first.val_drawn)
    files = read_val_split(tmp_path / "run")
    assert files == first.val_drawn["files"]
    # images added since: a fresh draw could differ, the recorded list does not
    make_folder(tmp_path / "extra", photo, {"train": {"cat": 5}})
    for i, png in enumerate(sorted((tmp_path / "extra" / "train" / "cat").glob("*.png"))):
        png.rename(root / "train" / "cat" / f"new{i}.png")
    again = load_splits(root, CFG, seed=99, val_files=files)
    assert [p for p, _ in again.val.samples] == [p for p, _ in first.val.samples]
    assert len(again.train) == len(first.train) + 5
    (root / "train" / files[0]).unlink()
    with pytest.raises(DataError, match="no longer there") as err:
        load_splits(root, CFG, val_files=files)
    assert files[0].split("/")[-1] in err.value.message


def test_a_val_split_cannot_be_drawn_from_single_images(tmp_path: Path, photo: Image.Image) -> None:
    root = make_folder(tmp_path / "ds", photo, {"train": {"cat": 1, "dog": 1}})
    with pytest.raises(DataError, match="too few training images to draw one") as err:
        load_splits(root, CFG)
    assert str(root) in err.value.message and "val/" in err.value.hint


def test_class_without_training_images_is_refused(tmp_path: Path, photo: Image.Image) -> None:
    root = make_folder(tmp_path / "ds", photo, BALANCED)
    (root / "train" / "emu").mkdir()
    with pytest.raises(DataError, match="has no training images") as err:
        load_splits(root, CFG)
    assert str(root / "train" / "emu") in err.value.message


def test_val_class_absent_from_train_is_refused(tmp_path: Path, photo: Image.Image) -> None:
    root = make_folder(tmp_path / "ds", photo, {**BALANCED, "val": {"cat": 1, "emu": 1}})
    with pytest.raises(DataError, match="not a training class") as err:
        load_splits(root, CFG)
    assert str(root / "val" / "emu") in err.value.message


def test_empty_split_is_refused(tmp_path: Path, photo: Image.Image) -> None:
    root = make_folder(tmp_path / "ds", photo, {**BALANCED, "test": {"cat": 0}})
    with pytest.raises(DataError, match="holds no images") as err:
        load_splits(root, CFG)
    assert str(root / "test") in err.value.message


def test_non_image_files_are_skipped_and_counted(tmp_path: Path, photo: Image.Image) -> None:
    root = make_folder(tmp_path / "ds", photo, BALANCED)
    strays = [
        root / "train" / "dog" / "notes.txt",
        root / "train" / "README",
        root / "val" / "cat" / ".DS_Store",
        root / "test" / "Thumbs.db",
    ]
    for path in strays:
        path.write_text("not an image")
    splits = load_splits(root, CFG)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 2, 3)
    assert sorted(splits.skipped) == sorted(strays)


def test_a_corrupt_file_with_an_image_extension_is_refused(tmp_path: Path, photo: Image.Image) -> None:
    root = make_folder(tmp_path / "ds", photo, BALANCED)
    (root / "train" / "dog" / "notes.jpg").write_text("text saved as .jpg")
    with pytest.raises(DataError, match="is not a readable image") as err:
        load_splits(root, CFG)
    assert "notes.jpg" in err.value.message


def test_corrupt_image_is_refused_when_splits_are_built(tmp_path: Path, photo: Image.Image) -> None:
    root = make_folder(tmp_path / "ds", photo, BALANCED)
    bad = root / "val" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(DataError, match="not a readable image") as err:
        load_splits(root, CFG)
    assert str(bad) in err.value.message


def test_image_outside_class_folder_is_refused(tmp_path: Path, photo: Image.Image) -> None:
    root = make_folder(tmp_path / "ds", photo, BALANCED)
    stray = write_image(root / "train" / "stray.png", photo, 999)
    with pytest.raises(DataError, match="not inside a class folder") as err:
        load_splits(root, CFG)
    assert str(stray) in err.value.message


def test_undecodable_image_raises_data_error_naming_it_on_read(tmp_path: Path, photo: Image.Image) -> None:
    # A truncated JPEG passes the cheap header check (JPEG verify() does not decode) and fails only on decode.
    root = make_folder(tmp_path / "ds", photo, BALANCED)
    jpg = root / "val" / "cat" / "z_truncated.jpg"
    photo.save(jpg, format="JPEG")
    jpg.write_bytes(jpg.read_bytes()[:2000])
    splits = load_splits(root, CFG)
    index = [str(p) for p, _ in splits.val.samples].index(str(jpg))
    with pytest.raises(DataError, match="is truncated or corrupt") as err:
        splits.val[index]
    assert str(jpg) in err.value.message


def test_imbalance_over_10x_warns(tmp_path: Path, photo: Image.Image, caplog: pytest.LogCaptureFixture) -> None:
    root = make_folder(tmp_path / "ok", photo, {**BALANCED, "train": {"cat": 10, "dog": 1}})
    with caplog.at_level(logging.WARNING, logger="peftx.data"):
        load_splits(root, CFG)
    assert not caplog.records  # exactly 10x is tolerated
    root = make_folder(tmp_path / "bad", photo, {**BALANCED, "train": {"cat": 11, "dog": 1}})
    with caplog.at_level(logging.WARNING, logger="peftx.data"):
        load_splits(root, CFG)
    assert len(caplog.records) == 1 and "imbalanced" in caplog.text and "cat" in caplog.text


# ----------------------------------------------------------------------------------------------------- eval split


def test_eval_split_of_a_test_only_folder_matches_classes_by_name(tmp_path: Path, photo: Image.Image) -> None:
    trained = ["ant", "cat", "dog"]
    root = make_folder(tmp_path / "only", photo, {"test": {"dog": 2, "cat": 1}})
    (root / "test" / "dog" / "notes.txt").write_text("skipped")
    chosen = load_eval_split(root, CFG, "test", trained)
    assert sorted(label for _, label in chosen.dataset.samples) == [1, 2, 2]  # the run's indices, not 0..1
    assert len(chosen.skipped) == 1 and "2 of the run's 3 classes" in chosen.source
    classes = tmp_path / "classes"  # a folder of class folders, no split level: ROOT/<class>/...
    write_image(classes / "ant" / "1.png", photo, 7)
    write_image(classes / "dog" / "1.png", photo, 8)
    chosen = load_eval_split(classes, CFG, "test", trained)
    assert sorted(label for _, label in chosen.dataset.samples) == [0, 2]
    x, y = chosen.dataset[0]
    assert x.shape == (3, 32, 32) and y == 0


def test_eval_split_refuses_classes_the_run_was_not_trained_on(tmp_path: Path, photo: Image.Image) -> None:
    root = make_folder(tmp_path / "only", photo, {"test": {"cat": 1, "emu": 1}})
    with pytest.raises(DataError, match="is not a training class") as err:
        load_eval_split(root, CFG, "test", ["cat", "dog"])
    assert "emu" in err.value.message and "cat, dog" in err.value.hint
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        load_eval_split(tmp_path / "empty", CFG, "test", ["cat"])


def test_eval_split_of_a_whole_tree_checks_the_class_list(tmp_path: Path, photo: Image.Image) -> None:
    root = make_folder(tmp_path / "ds", photo, BALANCED)
    assert len(load_eval_split(root, CFG, "test", ["cat", "dog"]).dataset) == 3
    with pytest.raises(DataError, match="the adapter was trained on"):
        load_eval_split(root, CFG, "test", ["cat", "dog", "emu"])


# ----------------------------------------------------------------------------------------------------- VTAB-1k


def test_vtab_task_splits(tmp_path: Path, photo: Image.Image) -> None:
    task = make_vtab(tmp_path / "vtab-1k" / "eurosat", photo)
    (task / "train800val200.txt").write_text((task / "train800.txt").read_text() + (task / "val200.txt").read_text())
    splits = load_splits(task, CFG, hflip=True)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 3, 4)
    assert splits.class_names == ["0", "1", "2"]
    assert splits.train.targets == [0, 1, 2, 0, 1, 2]
    x, y = splits.test[3]
    assert x.shape == (3, 32, 32) and y == 0
    assert "eurosat" in splits.source


def test_vtab_label_absent_from_train_warns(
    tmp_path: Path, photo: Image.Image, caplog: pytest.LogCaptureFixture
) -> None:
    # VTAB-1k's 800 training images cannot cover all 397 SUN397 classes: warn, do not refuse.
    lists = {
        "train800.txt": [("images/a.png", 0), ("images/b.png", 1)],
        "val200.txt": [("images/c.png", 1)],
        "test.txt": [("images/d.png", 4)],
    }
    task = make_vtab(tmp_path / "sun397", photo, lists)
    with caplog.at_level(logging.WARNING, logger="peftx.data"):
        splits = load_splits(task, CFG)
    assert splits.class_names == ["0", "1", "2", "3", "4"]
    assert "no training image" in caplog.text


def test_vtab_missing_list_file_is_refused(tmp_path: Path, photo: Image.Image) -> None:
    task = make_vtab(tmp_path / "dtd", photo)
    (task / "test.txt").unlink()
    with pytest.raises(DataError, match="test.txt") as err:
        load_splits(task, CFG)
    assert str(task) in err.value.message


def test_vtab_empty_list_is_refused(tmp_path: Path, photo: Image.Image) -> None:
    task = make_vtab(tmp_path / "dtd", photo)
    (task / "val200.txt").write_text("\n")
    with pytest.raises(DataError, match="lists no images") as err:
        load_splits(task, CFG)
    assert str(task / "val200.txt") in err.value.message


def test_vtab_root_instead_of_task_is_refused_with_task_names(tmp_path: Path, photo: Image.Image) -> None:
    make_vtab(tmp_path / "vtab" / "dtd", photo)
    make_vtab(tmp_path / "vtab" / "svhn", photo)
    with pytest.raises(DataError, match="holding 2 task") as err:
        load_splits(tmp_path / "vtab", CFG)
    assert "dtd" in err.value.message and "svhn" in err.value.message


def test_parse_vtab_list_accepts_spaces_blank_lines_and_crlf(tmp_path: Path, photo: Image.Image) -> None:
    write_image(tmp_path / "images" / "a b.png", photo, 1)
    write_image(tmp_path / "images" / "c.png", photo, 2)
    lst = tmp_path / "train800.txt"
    lst.write_bytes(b"images/a b.png 3\r\n\r\nimages/c.png 99999\r\n")  # 99999: the largest index accepted
    assert parse_vtab_list(lst, tmp_path) == [
        (tmp_path / "images" / "a b.png", 3),
        (tmp_path / "images" / "c.png", 99_999),
    ]


@pytest.mark.parametrize(
    "line, match",
    [
        ("images/ok.png", "expected 'relative/path label'"),
        ("images/ok.png three", "'three' is not an integer"),
        ("images/ok.png 1.5", "is not an integer"),
        ("images/ok.png -1", "label -1 is negative"),
        ("images/ok.png 1000000000", "label 1000000000 is not a plausible class index"),
        ("/etc/passwd 0", "is absolute"),
        ("C:\\data\\x.png 0", "is absolute"),
        ("images/../../outside.png 0", "leaves the task directory"),
        ("images/link.png 0", "resolves outside the task directory"),
        ("images/missing.png 0", "does not exist"),
    ],
)
def test_parse_vtab_list_refuses_bad_lines_with_file_and_line(
    tmp_path: Path, photo: Image.Image, line: str, match: str
) -> None:
    task = tmp_path / "task"
    write_image(task / "images" / "ok.png", photo, 1)
    outside = write_image(tmp_path / "outside.png", photo, 2)
    (task / "images" / "link.png").symlink_to(outside)
    lst = task / "test.txt"
    lst.write_text(f"images/ok.png 0\n{line}\n")
    with pytest.raises(DataError, match=match) as err:
        parse_vtab_list(lst, task)
    assert err.value.message.startswith(f"{lst}:2:")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    line=st.text(
        alphabet=st.characters(
            blacklist_categories=("Cs",), blacklist_characters="\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
        ),
        max_size=40,
    )
)
@example(line="a\x00b 0").via("NUL byte in a path")
@example(line="images/" + "x" * 300 + ".png 1").via("file name too long")
def test_parse_vtab_list_never_fails_with_anything_but_data_error(tmp_path: Path, line: str) -> None:
    (tmp_path / "root").mkdir(exist_ok=True)  # empty: no listed path can exist, so only a blank line parses
    lst = tmp_path / "test.txt"
    lst.write_text(f"{line}\n", encoding="utf-8")
    try:
        rows = parse_vtab_list(lst, tmp_path / "root")
    except DataError as err:
        assert err.message.startswith(f"{lst}:1:")
    else:
        assert rows == [] and not line.strip()


# ----------------------------------------------------------------------------------------------------- specs


def test_unknown_specs_list_the_accepted_forms(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as err:
        load_splits(tmp_path / "nope", CFG)
    assert "demo" in err.value.hint and "VTAB-1k" in err.value.hint
    (tmp_path / "random").mkdir()
    with pytest.raises(DataError, match="not a dataset peftx recognises") as err:
        load_splits(tmp_path / "random", CFG)
    assert "ImageFolder" in err.value.hint and str(tmp_path / "random") in err.value.message


# ----------------------------------------------------------------------------------------------------- real images


def test_sample_photos_are_the_two_sklearn_photos() -> None:
    photos = sample_photos()
    assert [(p.mode, p.size) for p in photos] == [("RGB", (640, 427)), ("RGB", (640, 427))]
    assert np.asarray(photos[0]).std() > 20  # real content, not a blank


def test_real_images_are_deterministic_real_and_preprocessed() -> None:
    cfg = {**CFG, "input_size": (3, 28, 36)}
    batch = real_images(7, cfg, seed=3)
    assert batch.shape == (7, 3, 28, 36) and batch.dtype == torch.float32 and torch.isfinite(batch).all()
    transform = build_transform(cfg, train=False, hflip=False)
    photos = sample_photos()
    assert torch.equal(batch[0], transform(photos[0])) and torch.equal(batch[1], transform(photos[1]))
    assert torch.equal(batch, real_images(7, cfg, seed=3))
    assert not torch.equal(batch[2:], real_images(7, cfg, seed=4)[2:])
    assert all((batch[i] - batch[j]).abs().max() > 0.1 for i in range(7) for j in range(i))  # all distinct
    assert real_images(1, cfg).shape == (1, 3, 28, 36)
    with pytest.raises(UsageError):
        real_images(0, cfg)


def test_images_from_dir_loads_sorted_real_images_up_to_limit(tmp_path: Path, photo: Image.Image) -> None:
    a = write_image(tmp_path / "imgs" / "a.png", photo, 1)
    write_image(tmp_path / "imgs" / "sub" / "b.jpg", photo, 2, fmt="JPEG")
    (tmp_path / "imgs" / "notes.txt").write_text("skipped: not an image extension")
    batch = images_from_dir(tmp_path / "imgs", CFG)
    assert batch.shape == (2, 3, 32, 32)
    assert torch.equal(batch[0], build_transform(CFG, train=False, hflip=False)(Image.open(a).convert("RGB")))
    assert images_from_dir(tmp_path / "imgs", CFG, limit=1).shape == (1, 3, 32, 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        images_from_dir(tmp_path / "empty", CFG)
    with pytest.raises(DataError, match="does not exist") as err:
        images_from_dir(tmp_path / "none", CFG)
    assert str(tmp_path / "none") in err.value.message
    bad = tmp_path / "imgs" / "c.png"
    bad.write_bytes(b"garbage")
    with pytest.raises(DataError, match="is not an image PIL can identify") as err:
        images_from_dir(tmp_path / "imgs", CFG)
    assert str(bad) in err.value.message
