"""peftx.sources: which kind of source a path or a bundle's provenance is (the registry), and the overrides each kind
refuses. Loading each kind for real is tests/test_peft_import.py's and tests/test_deploy.py's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftx.errors import UsageError
from peftx.sources import (
    KINDS,
    CheckpointSource,
    PeftSource,
    RunSource,
    recorded_source,
    source_for,
)

SPEC = {"name": "vit_tiny_patch16_224", "img_size": 32, "model_kwargs": {"depth": 2}, "weights": "/w.safetensors"}


def _peft_dir(root: Path) -> Path:
    root.mkdir()
    (root / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    return root


def _run_dir(root: Path) -> Path:
    root.mkdir()
    (root / "adapter_config.json").write_text(json.dumps({"method": "rlrr"}))  # a peftx run's, no peft_type
    (root / "adapter.safetensors").write_bytes(b"")
    return root


def test_a_path_is_read_by_the_first_kind_that_claims_it(tmp_path) -> None:
    peft, run = _peft_dir(tmp_path / "peft"), _run_dir(tmp_path / "run")
    assert KINDS[-1] is RunSource  # claims everything: asked last
    assert source_for(peft) == PeftSource(peft)
    assert source_for(str(run)) == RunSource(run)
    assert source_for(run / "adapter.safetensors") == RunSource(run / "adapter.safetensors")
    given = CheckpointSource("vit_tiny_patch16_224", tmp_path / "ft.safetensors")
    assert source_for(given) is given  # a source object is its own source


def test_a_bundle_provenance_names_its_kind(tmp_path) -> None:
    peft = _peft_dir(tmp_path / "peft")
    (peft / "adapter_model.safetensors").write_bytes(b"")  # the file whose sha256 the bundle recorded
    recorded = recorded_source(
        {"method": "peft", "backbone_spec": SPEC, "base_fingerprint": "abc", "adapter_config": {"r": 4}},
        peft / "adapter_model.safetensors",
    )
    assert recorded == PeftSource(
        peft,
        model_name=SPEC["name"],
        weights=SPEC["weights"],
        img_size=32,
        model_kwargs={"depth": 2},
        expected_fingerprint="abc",
        expected_config={"r": 4},
    )
    ckpt = recorded_source({"method": "checkpoint", "backbone_spec": SPEC, "num_classes": 5}, tmp_path / "ft.pt")
    assert ckpt == CheckpointSource(SPEC["name"], tmp_path / "ft.pt", 5, img_size=32, model_kwargs={"depth": 2})
    assert recorded_source({"method": "lora"}, tmp_path / "run") == RunSource(tmp_path / "run")
    with pytest.raises(UsageError, match="records no backbone for its peft source"):
        recorded_source({"method": "peft", "backbone_spec": {}}, peft)


def test_each_kind_takes_or_refuses_the_command_line_overrides(tmp_path) -> None:
    run = RunSource(tmp_path / "run")
    assert run.with_overrides(model_name="vit_small_patch16_224", weights=None, img_size=None) == RunSource(
        tmp_path / "run", model_name="vit_small_patch16_224"
    )
    with pytest.raises(UsageError, match="--img-size is for peft adapters and checkpoints"):
        run.with_overrides(img_size=64)
    peft = PeftSource(tmp_path / "peft")
    assert peft.with_overrides(img_size=64, weights=None).img_size == 64
    ckpt = CheckpointSource("vit_tiny_patch16_224", tmp_path / "ft.safetensors")
    assert ckpt.with_overrides(model_name=None, weights=None, img_size=None) is ckpt
    with pytest.raises(UsageError, match="--weights does not apply to a plain checkpoint"):
        ckpt.with_overrides(weights="other.safetensors")
