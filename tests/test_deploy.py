"""merge-export end to end: adapter file -> rebuilt unmerged model -> merged ONNX bundle, validated; every method and
family. The merged graph must be the plain backbone's graph: same op histogram, same parameter count."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import TINY_MODELS, make_tiny, perturb_adapter, plain_reference, tiny_data_cfg
from safetensors.torch import save_file

from peftx.adapter import adapt
from peftx.adapter_io import save_adapter
from peftx.deploy import merge_export, validate
from peftx.errors import AdapterMismatchError, ExportError, OutputError, UsageError
from peftx.exports.onnx_export import export_onnx, op_histogram, param_count
from peftx.methods import METHOD_NAMES, make_config
from peftx.tolerances import ONNX_FP32

CASES = [(m, f) for m in METHOD_NAMES for f in TINY_MODELS]


def make_run(tmp_path, method: str, family: str):
    """A run directory as `peftx train` leaves it: the adapter plus the backbone spec it was trained on."""
    plain = make_tiny(family)
    # Like pretrained weights, no two tensors equal: fresh init leaves many identical ones (LayerNorm ones, zero
    # biases) which the ONNX exporter stores once behind Identity nodes, so the plain graph would differ from the
    # merged one for a reason no real model has.
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    weights = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(weights))
    name, kw = TINY_MODELS[family]
    kw = dict(kw)
    spec = {"name": name, "weights": str(weights), "img_size": kw.pop("img_size"), "model_kwargs": kw}
    model = adapt(copy.deepcopy(plain), make_config(method), spec=spec)
    perturb_adapter(model, std=0.1)
    run = tmp_path / "run"
    save_adapter(model, run, extra={"data_config": tiny_data_cfg(family), "class_names": [f"c{i}" for i in range(5)]})
    return run, plain_reference(plain, model), model


@pytest.mark.parametrize("method,family", CASES, ids=[f"{m}-{f}" for m, f in CASES])
def test_merge_export_matches_plain_graph_and_unmerged_outputs(tmp_path, method, family):
    run, plain, model = make_run(tmp_path, method, family)
    from conftest import real_batch

    x = real_batch(family, 4)
    with torch.no_grad():
        assert (model.eval()(x) - plain(x)).abs().max() > 1e-2  # the adapter changes the output
    report = merge_export(run, batch=(1, 4, 8), simplify=False, tensorrt="off")
    assert report.status == "ok"
    bundle = run / "bundle"
    plain_onnx = export_onnx(plain, tmp_path / "plain.onnx", input_size=tiny_data_cfg(family)["input_size"])
    assert op_histogram(bundle / "model.onnx") == op_histogram(plain_onnx)  # no adapter op survives
    assert param_count(bundle / "model.onnx") == param_count(plain_onnx)
    parity = json.loads((bundle / "parity.json").read_text())
    ort = next(r for r in parity["results"] if r["candidate"] == "onnxruntime fp32")
    assert ort["passed"] and ort["overall"]["max_abs"] <= ONNX_FP32.atol and ort["overall"]["top1_agreement"] == 1.0
    meta = json.loads((bundle / "metadata.json").read_text())
    assert meta["status"] == "ok" and meta["provenance"]["method"] == method
    assert meta["class_names"] == [f"c{i}" for i in range(5)]


def test_validate_and_tamper_and_no_overwrite(tmp_path):
    run, _, _ = make_run(tmp_path, "rlrr", "vit")
    merge_export(run, batch=(1, 2, 4), tensorrt="off")
    bundle = run / "bundle"
    assert validate(bundle, tensorrt="off").passed
    assert validate(run, tensorrt="off").passed  # the run directory merge-export took: its bundle/
    before = (bundle / "model.onnx").read_bytes()
    with pytest.raises(OutputError, match="already exists"):
        merge_export(run, batch=(1, 2, 4), tensorrt="off")
    assert (bundle / "model.onnx").read_bytes() == before
    onnx_path = bundle / "model.onnx"
    onnx_path.write_bytes(before[:-16] + bytes(16))
    with pytest.raises(ExportError, match="model.onnx"):
        validate(bundle, tensorrt="off")


def test_adapter_changed_since_export_is_refused(tmp_path):
    run, _, _ = make_run(tmp_path, "lora", "vit")
    merge_export(run, batch=(1, 2, 4), tensorrt="off")
    make_run(tmp_path, "aoft", "vit")  # overwrites run/adapter.safetensors with another adapter
    with pytest.raises(AdapterMismatchError, match="changed since the bundle"):
        validate(run / "bundle", tensorrt="off")


def test_validate_cli_takes_the_run_directory_and_bundle_table_fits(tmp_path, monkeypatch):
    from cli_render import assert_renders
    from typer.testing import CliRunner

    from peftx.cli.app import app
    from peftx.cli.commands.export_cmd import bundle_items
    from peftx.cli.output import key_values

    run, _, _ = make_run(tmp_path, "lora", "vit")
    report = merge_export(run, batch=(1, 2, 4), tensorrt="off", simplify=False)
    items = bundle_items(report)
    assert items["status"] == "ok" and "model.onnx" in items["files"]
    for width in (80, 100):
        assert_renders(key_values("bundle", items), width, [v for k, v in items.items() if k != "files"])
    res = CliRunner().invoke(app, ["validate", str(run), "--tensorrt", "off"])
    assert res.exit_code == 0, res.stderr
    assert f"bundle {run / 'bundle'} passed" in " ".join(res.stdout.split())


def test_bad_batch_and_precision(tmp_path):
    from peftx.deploy import parse_batch

    assert parse_batch("1:8:32") == (1, 8, 32) and parse_batch("4") == (4, 4, 4)
    for bad in ("0:1:2", "8:4:16", "a:b:c", "1:2"):
        with pytest.raises(UsageError, match="--batch"):
            parse_batch(bad)
    with pytest.raises(UsageError, match="precision"):
        merge_export(tmp_path, precision="int4")
    with pytest.raises(UsageError, match="--calibration 8: at least 32"):  # INT8's options fail before any loading
        merge_export(tmp_path, precision="int8", calibration=8)


@pytest.mark.slow
def test_cli_merge_export_and_validate_follow_the_target(tmp_path):
    """`peftx merge-export RUN --target jetpack5` then `peftx validate --target jetpack5`: the CLI hands the target
    through, the bundle records it, and a bundle made for the default is refused for jetpack5."""
    from typer.testing import CliRunner

    from peftx.cli.app import app

    run, _, _ = make_run(tmp_path, "rlrr", "vit")
    cli = CliRunner()
    done = cli.invoke(
        app, ["merge-export", str(run), "--target", "jetpack5", "--batch", "1:2:4", "--tensorrt", "off", "--json"]
    )
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["target"]["name"] == "trt8.5" and report["target"]["requested"] == "jetpack5"
    assert report["readiness"]["ok"] and report["readiness"]["target"] == "trt8.5"
    meta = json.loads((run / "bundle" / "metadata.json").read_text())
    assert meta["target"]["export_opset"] == 16 and meta["onnx"]["exporter"] == "torchscript opset 16"
    done = cli.invoke(app, ["validate", str(run / "bundle"), "--target", "jetpack5", "--tensorrt", "off", "--json"])
    assert done.exit_code == 0, done.output
    default = tmp_path / "default-bundle"
    done = cli.invoke(app, ["merge-export", str(run), "-o", str(default), "--batch", "1:2:4", "--tensorrt", "off"])
    assert done.exit_code == 0, done.output
    assert "trt8.6 (TensorRT >= 8.6): TensorRT-ready" in done.stdout
    done = cli.invoke(app, ["validate", str(default), "--target", "jetpack5", "--tensorrt", "off", "--json"])
    assert done.exit_code == ExportError.exit_code and "not TensorRT-ready for jetpack5" in done.stderr


@pytest.mark.parametrize(
    "name,kw",
    [
        ("vit_base_patch16_224_miil", {}),  # timm's config: qkv_bias=False (the RLRR shift f had nowhere to go)
        ("vit_tiny_patch16_224", {"pre_norm": True}),  # CLIP-style: a patch conv without bias (the SSF shift)
    ],
    ids=["miil-no-qkv-bias", "pre-norm-no-patch-bias"],
)
def test_a_run_that_trains_always_merges_and_exports(tmp_path, tiny_weights, digit_folder, name, kw):
    """`peftx train` then `peftx merge-export` with RLRR on the models whose merge used to fail after training."""
    import timm
    from conftest import TINY_IMG, TINY_KW, tiny_config

    from peftx.train import train

    kw = dict(TINY_KW, **kw)
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    plain = timm.create_model(name, pretrained=False, num_classes=0, img_size=TINY_IMG, **kw)
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(weights))
    run = tmp_path / "run"
    summary = train(
        tiny_config(weights, run, model=name, model_kwargs=kw, data=str(digit_folder), method="rlrr", epochs=1)
    )
    assert summary["best_epoch"] == 1
    report = merge_export(run, batch=(1, 2, 4), simplify=False, tensorrt="off")
    assert report.status == "ok"
