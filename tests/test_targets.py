"""Deployment targets: profiles and aliases, the op lists as data with their sources, and what each target's export
SHIPS — checked on real tiny ViT and Swin bundles (TensorRT's own parser cannot exist here; the op lists transcribed
from each release's onnx-tensorrt docs/operators.md stand in for it, and the engine-building side is tested in
test_build_engine.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import make_tiny, perturb_adapter, real_batch, tiny_data_cfg, write_tiny_bundle

from peftx.errors import ExportError, UsageError
from peftx.exports.bundle import export_step, read_bundle, validate_bundle
from peftx.exports.layernorm import decomposed_layernorms, fused_layernorms
from peftx.exports.onnx_export import export_onnx, read_metadata
from peftx.exports.parity import compare, make_input_sets
from peftx.exports.runners import OnnxRuntimeRunner
from peftx.exports.targets import (
    ALIASES,
    DEFAULT_TARGET,
    PROFILES,
    all_targets,
    auto_target,
    jetpack_for_l4t,
    profile_for_tensorrt,
    resolve_target,
)
from peftx.exports.tensorrt_ops import check_tensorrt_readiness
from peftx.fsutil import sha256_file
from peftx.tolerances import TARGET_EXPORT_FP32

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("vit", "swin")


# --- profiles, aliases, auto ---------------------------------------------------------------------------------------


def test_aliases_resolve_to_their_profile_with_the_jetpack_tensorrt_as_floor():
    expected = {
        "jetpack5": ("trt8.5", "8.5"),
        "jetpack6.0": ("trt8.6", "8.6"),
        "jetpack6": ("trt10", "10.3"),
        "jetpack7": ("trt10", "10.13"),
    }
    assert set(ALIASES) == set(expected)
    for alias, (name, floor) in expected.items():
        target = resolve_target(alias)
        assert (target.name, target.tensorrt_min, target.requested) == (name, floor, alias)
    assert resolve_target(None).name == DEFAULT_TARGET == "trt8.6"
    assert [p.name for p in all_targets()] == ["trt8.5", "trt8.6", "trt10", "trt11"]
    assert resolve_target("JetPack6.0").name == "trt8.6"  # names are case-insensitive


def test_an_unknown_target_is_a_usage_error_that_suggests_the_closest_names():
    with pytest.raises(UsageError, match=r"unknown target 'jetpak5' — did you mean: jetpack5") as info:
        resolve_target("jetpak5")
    assert "peftx targets" in info.value.hint and "trt8.5" in info.value.hint
    with pytest.raises(UsageError) as info:
        resolve_target("xyzzy")
    assert info.value.message == "unknown target 'xyzzy'"  # nothing close: no guess


@pytest.mark.parametrize(
    "version, name, floor",
    [
        ("8.5.2.2", "trt8.5", "8.5"),
        ("8.6.2", "trt8.6", "8.6"),
        ("9.3.0", "trt8.6", "9.3"),
        ("10.3.0.26", "trt10", "10.3"),
        ("10.13.2", "trt10", "10.13"),
        ("11.4.1", "trt11", "11.4"),
    ],
)
def test_auto_picks_the_installed_tensorrt_profile(version, name, floor):
    target, why = auto_target(version)
    assert (target.name, target.tensorrt_min) == (name, floor) and version in why
    assert profile_for_tensorrt(version).name == name


@pytest.mark.parametrize(
    "l4t, alias",
    [
        ("35.4.1", "jetpack5"),
        ("36.3.0", "jetpack6.0"),
        ("36.4.3", "jetpack6"),
        ("38.2.1", "jetpack7"),
        ("32.7.4", None),
    ],
)
def test_auto_without_tensorrt_uses_the_jetsons_jetpack(l4t, alias):
    assert jetpack_for_l4t(l4t) == alias
    target, why = auto_target(None, l4t)
    assert target.requested == (alias or "") and (target.name == DEFAULT_TARGET if alias is None else alias in why)


def test_auto_falls_back_to_the_default_below_8_5_and_without_anything():
    assert profile_for_tensorrt("8.4.3") is None
    old, why = auto_target("8.4.3")
    assert old.name == DEFAULT_TARGET and "older than every target" in why
    assert auto_target(None, None)[0].name == DEFAULT_TARGET


def test_profiles_say_what_later_int8_and_preprocessing_work_needs():
    assert PROFILES["trt8.5"].int8.trtexec_flags == ("--int8",) and PROFILES["trt11"].int8.trtexec_flags == ()
    assert all(p.int8.qdq and p.int8.zero_point_zero for p in PROFILES.values())
    for profile in PROFILES.values():  # the ops an INT8 export must avoid are exactly those the op list marks N
        ops = profile.operators()["operators"]
        assert all(not ops[op]["supported"] for op in profile.int8.unsupported_ops), profile.name
        assert ops["QuantizeLinear"]["supported"] and ops["DequantizeLinear"]["supported"]
    assert not PROFILES["trt8.5"].uint8_io and PROFILES["trt10"].uint8_io  # 8.x lists no UINT8 data type
    assert PROFILES["trt8.5"].explicit_batch_flag and not PROFILES["trt10"].explicit_batch_flag


# --- the op lists as data --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, ref, version, commit_known",
    [
        ("trt8.5", "8.5-GA", "8.5", True),
        ("trt8.6", "release/8.6-GA", "8.6", True),
        ("trt10", "10.1-GA", "10.0", True),
        ("trt11", "main", "10.15", False),
    ],
)
def test_each_op_list_names_its_source_branch_and_version(name, ref, version, commit_known):
    ops = PROFILES[name].operators()
    assert ops["repository"] == "https://github.com/onnx/onnx-tensorrt" and ops["ref"] == ref
    assert ops["tensorrt_version"] == version and ops["source"].endswith("docs/operators.md")
    assert (ops["commit"] is not None) == commit_known and (not commit_known or ops["commit"] in ops["source"])
    assert PROFILES[name].opset_max == ops["opset_max"]
    assert len(ops["operators"]) > 150


def test_layernormalization_is_absent_from_8_5_and_present_from_8_6():
    assert not PROFILES["trt8.5"].operators()["operators"]["LayerNormalization"]["supported"]
    for name in ("trt8.6", "trt10", "trt11"):
        assert PROFILES[name].operators()["operators"]["LayerNormalization"]["supported"]


def test_missing_lists_are_said_so_not_invented():
    trt11 = PROFILES["trt11"].operators()
    assert any("stand-in" in r and "11.x" in r for r in trt11["remarks"])
    trt10 = PROFILES["trt10"].operators()
    assert any("No 10.3-GA" in r for r in trt10["remarks"])


def test_errata_keep_the_transcription_and_carry_their_evidence():
    raw = json.loads((ROOT / "exports/data/onnx_tensorrt_ops_10.1-GA.json").read_text())
    assert "INF64" in raw["operators"]["ConstantOfShape"]["types"]  # what the file says, kept as written
    fixed = PROFILES["trt10"].operators()["operators"]["ConstantOfShape"]
    assert "INT64" in fixed["types"] and "typo" in fixed["erratum"]


def test_the_transcriber_reads_both_header_styles_and_every_row_form(tmp_path):
    sample = (
        "# Supported ONNX Operators\n\nTensorRT 8.6 supports operators up to Opset 17. Latest ...\n\n"
        "TensorRT supports the following ONNX data types: DOUBLE, FLOAT32, FLOAT16, INT8, and BOOL\n\n"
        "> Note: There is limited support for INT32.\n\n## Operator Support Matrix\n\n"
        "| Operator | Supported  | Supported Types | Restrictions |\n|---|---|---|---|\n"
        "| Abs                       | Y          | FP32, FP16, INT32 |\n"
        "| Bernoulli                 | N          |\n"
        "| NonMaxSuppression         | Y [EXPERIMENTAL] | FP32, FP16 | Inputs must be initializers.\n"
        "| DynamicQuantizeLinear     | N          | Not supported. Compose it.\n"
    )
    (tmp_path / "ops.md").write_text(sample)
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/transcribe_trt_operators.py"),
            str(tmp_path / "ops.md"),
            "--ref",
            "8.6-GA",
            "--commit",
            "abc123",
            "--erratum",
            "Abs=FP32|importer says so",
            "--out",
            str(tmp_path / "ops.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / "ops.json").read_text())
    assert (data["tensorrt_version"], data["opset_max"], data["ref"], data["commit"]) == ("8.6", 17, "8.6-GA", "abc123")
    assert data["data_types"] == ["DOUBLE", "FP32", "FP16", "INT8", "BOOL"]
    assert data["operators"]["Abs"] == {"supported": True, "types": ["FP32", "FP16", "INT32"]}
    assert data["operators"]["Bernoulli"] == {"supported": False, "types": []}
    assert data["operators"]["NonMaxSuppression"]["experimental"] is True
    assert data["operators"]["DynamicQuantizeLinear"]["restrictions"].startswith("Not supported")
    assert data["errata"]["Abs"] == {"types": ["FP32"], "evidence": "importer says so"}


# --- what each target's bundle ships (real tiny models, real images) ------------------------------------------------


def _model(family: str) -> torch.nn.Module:
    model = make_tiny(family, seed=3)
    perturb_adapter(model, std=0.02)  # non-trivial weights everywhere: LayerNorm affine included
    return model


def _bundle(family: str, out: Path, target: str | None, **kw):
    options = dict(precision="fp16", tensorrt="auto", simplify=True, target=target)
    return write_tiny_bundle(out, _model(family), family=family, **{**options, **kw})


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """For ViT and Swin: the default bundle and the jetpack5 one (onnxslim on, as shipped)."""
    root = tmp_path_factory.mktemp("target_bundles")
    made = {}
    for family in FAMILIES:
        for target in ("default", "jetpack5"):
            out = root / f"{family}-{target}"
            _bundle(family, out, None if target == "default" else target)
            made[family, target] = out
    return made


def _shipped(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=False)


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


@pytest.mark.parametrize("family", FAMILIES)
def test_jetpack5_ships_only_tensorrt_8_5_ops_at_opset_17_or_less_without_layernormalization(bundles, family):
    supported = {op for op, e in PROFILES["trt8.5"].operators()["operators"].items() if e["supported"]}
    for name in ("model.onnx", "model_fp16.onnx"):
        model = _shipped(bundles[family, "jetpack5"] / name)
        used = {n.op_type for n in model.graph.node}
        assert used <= supported, f"{name}: {sorted(used - supported)} not in 8.5-GA's list"
        assert _opset(model) <= 17 and "LayerNormalization" not in used
    default = _shipped(bundles[family, "default"] / "model.onnx")
    assert "LayerNormalization" in {n.op_type for n in default.graph.node}  # the contrast: 8.5 could not take it


@pytest.mark.parametrize("family", FAMILIES)
def test_the_default_trt8_6_bundle_ships_only_tensorrt_8_6_ops(bundles, family):
    meta = read_bundle(bundles[family, "default"])
    assert meta["target"]["name"] == "trt8.6" and meta["target"]["op_list"]["ref"] == "release/8.6-GA"
    supported = {op for op, e in PROFILES["trt8.6"].operators()["operators"].items() if e["supported"]}
    for name in ("model.onnx", "model_fp16.onnx"):
        model = _shipped(bundles[family, "default"] / name)
        assert {n.op_type for n in model.graph.node} <= supported and _opset(model) <= 17


@pytest.mark.parametrize("family", FAMILIES)
def test_jetpack5_outputs_equal_the_default_export(bundles, family):
    inputs = make_input_sets(real_batch(family, n=8, seed=5), (1, 3, 7), random_batch=3)
    with OnnxRuntimeRunner(bundles[family, "default"] / "model.onnx") as default:
        reference = {name: default.infer(batch) for name, batch in inputs.items()}
    assert reference["real_b7"].std(axis=0).min() > 1e-3, "the images must give different outputs"
    # As written (ONNX Runtime's optimizer off: it would fuse the decomposed LayerNorm back into one kernel and make
    # both graphs run the same code), and as ONNX Runtime runs it by default.
    for optimize in (False, True):
        candidate = OnnxRuntimeRunner(bundles[family, "jetpack5"] / "model.onnx", optimize=optimize)
        result = compare(reference, candidate, inputs, TARGET_EXPORT_FP32)
        assert result.passed, (optimize, result.overall.failures)
        assert result.overall.max_abs <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layernorm_is_decomposed_and_kept_fp32_in_the_fp16_onnx(bundles, family):
    model = make_tiny(family)
    modules = sum(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    shipped = _shipped(bundles[family, "jetpack5"] / "model.onnx")
    found = decomposed_layernorms(shipped)
    assert len(found) == modules and not fused_layernorms(shipped)
    pinned = {name for ln in found for name in ln.nodes}
    fp16 = onnx.shape_inference.infer_shapes(_shipped(bundles[family, "jetpack5"] / "model_fp16.onnx"))
    types = {v.name: v.type.tensor_type.elem_type for v in fp16.graph.value_info}
    outputs = {out: node.name for node in fp16.graph.node if node.name in pinned for out in node.output}
    assert set(outputs.values()) == pinned, "every pinned node is still in the FP16 graph, under its name"
    assert all(types.get(out) == onnx.TensorProto.FLOAT for out in outputs), "the LayerNorm subgraph must stay FP32"
    meta = read_bundle(bundles[family, "jetpack5"])
    assert set(meta["fp16"]["pinned_nodes"]) == pinned and meta["target"]["fp32_nodes_in_fp16_builds"] == len(pinned)
    half = {v.name for v in fp16.graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}
    assert half, "the rest of the graph is FP16"


def test_the_target_is_recorded_in_metadata_json_and_the_onnx(bundles):
    out = bundles["vit", "jetpack5"]
    meta = read_bundle(out)
    assert (meta["target"]["name"], meta["target"]["requested"], meta["target"]["tensorrt_min"]) == (
        "trt8.5",
        "jetpack5",
        "8.5",
    )
    assert meta["target"]["export_opset"] == 16 and meta["target"]["layernorm"] == "decomposed"
    for name in ("model.onnx", "model_fp16.onnx"):
        props = read_metadata(out / name)
        assert (props["peftx_target"], props["peftx_target_profile"], props["peftx_target_tensorrt_min"]) == (
            "jetpack5",
            "trt8.5",
            "8.5",
        )


@pytest.mark.parametrize("target", ["default", "jetpack5"])
def test_readiness_describes_the_files_as_shipped(bundles, target):
    out = bundles["swin", target]
    readiness = json.loads((out / "trt_readiness.json").read_text())
    assert readiness["ok"] is True and readiness["target"] == ("trt8.6" if target == "default" else "trt8.5")
    assert set(readiness["files"]) == {"model.onnx", "model_fp16.onnx", "model_deepstream.onnx"}
    for name, report in readiness["files"].items():
        assert report["sha256"] == sha256_file(out / name) == read_bundle(out)["sha256"][name]
        assert report["ops"] == dict(
            sorted(__import__("collections").Counter(n.op_type for n in _shipped(out / name).graph.node).items())
        )
    assert set(readiness["newer_targets"]) == (
        {"trt10", "trt11"} if target == "default" else {"trt8.6", "trt10", "trt11"}
    )
    assert all(v["ok"] for v in readiness["newer_targets"].values())


def test_a_simplified_graph_that_the_target_cannot_parse_is_not_shipped(tmp_path, monkeypatch):
    """A simplifier that re-fuses LayerNorm (same function: parity passes) must not reach a TensorRT 8.5 bundle."""
    fused = tmp_path / "fused.onnx"
    export_onnx(_model("vit"), fused, input_size=tiny_data_cfg("vit")["input_size"])

    def refusing_simplifier(src, dst):
        from peftx.exports.simplify import SimplifyResult

        model = onnx.load(str(fused))
        onnx.helper.set_model_props(model, read_metadata(src))
        onnx.save(model, str(dst))
        return SimplifyResult(True, "a simplifier that fuses LayerNorm", 1, 1, {})

    monkeypatch.setattr(export_step, "simplify_onnx", refusing_simplifier)
    report = _bundle("vit", tmp_path / "b", "jetpack5")
    shipped = _shipped(tmp_path / "b" / "model.onnx")
    assert "LayerNormalization" not in {n.op_type for n in shipped.graph.node}
    assert report.simplify["applied"] is False and "not ready for trt8.5" in report.simplify["reason"]
    assert any("onnxslim graph was rejected" in note for note in report.parity.notes)


def test_a_bundle_is_checked_against_another_target_and_fails_loudly(bundles, tmp_path):
    import shutil

    out = shutil.copytree(bundles["vit", "default"], tmp_path / "copy")
    reference = _model("vit")
    images = real_batch("vit", n=8)
    before = (out / "parity.json").read_bytes()
    with pytest.raises(ExportError, match=r"not TensorRT-ready for jetpack5: .*LayerNormalization") as info:
        validate_bundle(out, reference, images, tensorrt="off", target="jetpack5")
    assert "--target jetpack5" in info.value.hint
    assert (out / "parity.json").read_bytes() == before, "nothing is rewritten when readiness fails"
    report = validate_bundle(out, reference, images, tensorrt="off", target="trt10")  # newer: ready
    assert report.passed
    report = validate_bundle(out, reference, images, tensorrt="off")  # its own target
    assert report.passed and json.loads((out / "trt_readiness.json").read_text())["target"] == "trt8.6"


def test_readiness_rules_follow_the_target(tmp_path):
    """The same graph, judged by each release's rules: LayerNormalization, opset ceilings, INT64 cast-down."""
    path = export_onnx(make_tiny("vit"), tmp_path / "m.onnx", input_size=tiny_data_cfg("vit")["input_size"])
    assert not check_tensorrt_readiness(path, target="jetpack5").ok
    problem = next(p for p in check_tensorrt_readiness(path, target="trt8.5").problems if "LayerNormalization" in p)
    assert "TensorRT 8.5" in problem
    for name in ("trt8.6", "trt10", "trt11"):
        report = check_tensorrt_readiness(path, target=name)
        assert report.ok, (name, report.problems)
        assert report.target == name and report.sha256 == sha256_file(path)
    assert any(
        "INT64 tensors are cast down to INT32" in w for w in check_tensorrt_readiness(path, target="trt8.6").warnings
    )
    model = onnx.load(str(path))
    model.opset_import[0].version = 18
    onnx.save(model, str(tmp_path / "m18.onnx"))
    assert any(
        "opset 18 is outside 9..17" in p
        for p in check_tensorrt_readiness(tmp_path / "m18.onnx", target="trt8.6").problems
    )
    assert check_tensorrt_readiness(tmp_path / "m18.onnx", target="trt10").ok
    uint8 = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Cast", ["x"], ["y"], to=onnx.TensorProto.FLOAT)],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.UINT8, ["batch", 3])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 3])],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 17)],
    )
    onnx.save(uint8, str(tmp_path / "u8.onnx"))
    assert any("UINT8" in p for p in check_tensorrt_readiness(tmp_path / "u8.onnx", target="trt8.6").problems)
    assert check_tensorrt_readiness(tmp_path / "u8.onnx", target="trt10").ok  # 10.x takes UINT8 network inputs


def test_decomposed_export_refuses_what_cannot_decompose(tmp_path):
    model = make_tiny("vit")
    size = tiny_data_cfg("vit")["input_size"]
    with pytest.raises(UsageError, match="opset 17 exports LayerNorm as one"):
        export_onnx(model, tmp_path / "x.onnx", input_size=size, opset=17, layernorm="decomposed")
    with pytest.raises(UsageError, match="starts at opset 18"):
        export_onnx(model, tmp_path / "x.onnx", input_size=size, layernorm="decomposed", exporter="dynamo")
    with pytest.raises(UsageError, match="below 17"):
        export_onnx(model, tmp_path / "x.onnx", input_size=size, opset=16)
    assert not (tmp_path / "x.onnx").exists()


def test_unknown_target_fails_before_any_work(tmp_path):
    with pytest.raises(UsageError, match="unknown target 'trt9'"):
        _bundle("vit", tmp_path / "nope", "trt9")
    assert list(tmp_path.iterdir()) == []


def test_the_targets_listing_matches_the_profiles(capsys):
    from typer.testing import CliRunner

    from peftx.cli.app import app

    done = CliRunner().invoke(app, ["targets", "--json"])
    assert done.exit_code == 0, done.output
    listed = json.loads(done.stdout)
    assert listed["default"] == DEFAULT_TARGET
    assert [t["name"] for t in listed["targets"]] == list(PROFILES)
    by_name = {t["name"]: t for t in listed["targets"]}
    assert by_name["trt10"]["aliases"] == ["jetpack6", "jetpack7"] and by_name["trt11"]["fp16"] == "fp16_onnx"
    assert by_name["trt8.5"]["opset_range"] == [9, 17] and by_name["trt8.5"]["export_opset"] == 16
    human = CliRunner().invoke(app, ["targets"], env={"COLUMNS": "80"})
    assert human.exit_code == 0 and all(len(line) <= 80 for line in human.stdout.splitlines()[:8])
    assert "trt8.6*" in human.stdout


def test_doctor_reports_this_machine_and_the_auto_target(tmp_path):
    from typer.testing import CliRunner

    from peftx.cli.app import app
    from peftx.exports.environment import doctor_report

    for command in ("doctor", "env"):
        done = CliRunner().invoke(app, [command, "--json"])
        assert done.exit_code == 0, done.output
        report = json.loads(done.stdout)
        assert report["torch"]["version"] == torch.__version__ and report["python"]
        assert report["onnxruntime"]["providers"] and "CPUExecutionProvider" in report["onnxruntime"]["providers"]
        assert report["auto_target"]["name"] in PROFILES
    # On a (fake) Jetson file tree without the TensorRT Python package, auto names that JetPack.
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text(
        "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, "
        "EABI: aarch64, DATE: Tue Aug  1 19:57:35 UTC 2023\n"
    )
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson Xavier NX Developer Kit\0")
    report = doctor_report(tmp_path)
    assert report["jetson"] == {
        "model": "NVIDIA Jetson Xavier NX Developer Kit",
        "l4t": "35.4.1",
        "jetpack": "jetpack5",
    }
    if report["tensorrt"]["version"] is None:
        assert report["auto_target"]["name"] == "trt8.5" and "jetpack5" in report["auto_target"]["why"]


def test_inputs_of_the_same_batch_give_the_same_outputs_in_both_exports(bundles):
    """Batch independence survives the decomposition (a reshape baked with the trace batch would break it)."""
    images = real_batch("swin", n=7, seed=2)
    with OnnxRuntimeRunner(bundles["swin", "jetpack5"] / "model.onnx") as runner:
        together = runner.infer(images)
        alone = np.concatenate([runner.infer(images[i : i + 1]) for i in range(len(images))])
    np.testing.assert_allclose(together, alone, atol=1e-5)
