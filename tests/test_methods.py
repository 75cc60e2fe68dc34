"""Method-level facts (AOFT generator, RLRR init and structure) and adapter-file error paths."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import make_tiny, perturb_adapter
from safetensors.torch import save_file

from peftx.adapter import adapt
from peftx.adapter_io import ADAPTER_FILE, load_adapter, read_adapter, save_adapter
from peftx.errors import AdapterFileError, AdapterMismatchError, NonFiniteError, UnsupportedModelError, UsageError
from peftx.methods import make_config
from peftx.methods.orthogonal import DENOM_EPS, ao_basis, orthogonality_error, random_unit_vector
from peftx.tolerances import ORTHOGONALITY_FP32


@pytest.mark.parametrize("D,d", [(64, 1), (64, 8), (384, 16), (768, 768)])
def test_ao_basis_orthonormal_for_unit_q(D, d):
    q = random_unit_vector(D, torch.Generator().manual_seed(D + d))
    m = ao_basis(q, d)
    assert m.shape == (D, d)
    assert torch.equal(m[:, 0], q)  # column 0 is q itself
    assert orthogonality_error(m) <= ORTHOGONALITY_FP32


def test_ao_basis_drift_off_the_unit_sphere():
    """AOFT does not force ||q|| = 1: report how far from orthogonal the columns drift as ||q|| moves."""
    q = random_unit_vector(128, torch.Generator().manual_seed(0))
    drift = {s: orthogonality_error(ao_basis(q * s, 16)) for s in (1.0, 1.01, 1.1, 1.5, 2.0)}
    print("||q|| -> max|AO^T AO - I|:", {k: f"{v:.2e}" for k, v in drift.items()})
    assert drift[1.0] <= ORTHOGONALITY_FP32
    values = list(drift.values())
    assert all(a < b for a, b in itertools.pairwise(values))  # drift grows with the distance from the sphere
    assert drift[1.01] < 0.1  # near the sphere the columns stay nearly orthonormal


@pytest.mark.parametrize("gap", [0.0, 1e-12, 1e-9, 1e-6, DENOM_EPS / 10, -0.5], ids=lambda g: f"1+q0={g:g}")
def test_ao_basis_guard_near_the_pole(gap):
    """1 + q0 at or near 0 (or below): the clamped denominator keeps AO and its gradient finite AND bounded by
    what the guard allows, |u|^2 / DENOM_EPS; without it they grow as 1 / (1 + q0) (5e7 at 1e-9 here)."""
    u = torch.randn(31, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.1
    q = torch.cat([torch.tensor([-1.0 + gap], dtype=torch.float64), u]).requires_grad_()
    m = ao_basis(q, 4)
    assert torch.isfinite(m).all()
    assert m.abs().max() <= 1 + u.abs().max() ** 2 / DENOM_EPS
    (m**2).sum().backward()
    assert torch.isfinite(q.grad).all()
    assert q.grad.abs().max() <= 1 / DENOM_EPS**2  # unguarded: ~|u|^3 / (1 + q0)^2, 1e15 at 1e-9


def test_rlrr_official_init_and_qkv_structure():
    model = adapt(make_tiny("vit"), make_config("rlrr"))
    qkv = model.get_submodule("blocks.0.attn.qkv")
    dim = qkv.in_features
    assert qkv.s_col.shape == (3, dim)  # one column scale per q, k, v (official ViT code)
    assert qkv.s_row.abs().max() <= math.sqrt(6) and qkv.s_col.abs().max() <= math.sqrt(6 / dim)
    assert torch.count_nonzero(qkv.f) == 0
    w = qkv.base_layer.weight
    rel = (qkv.merge_weight(w) - w).norm() / w.norm()
    assert 0.01 < rel < 0.3  # non-zero at init (about 0.07 at ViT-B scale)
    swin = adapt(make_tiny("swin"), make_config("rlrr"))
    assert swin.get_submodule("layers.0.blocks.0.attn.qkv").s_col.shape[0] == 1  # Swin shares one s_col
    red = swin.get_submodule("layers.1.downsample.reduction")
    assert red.base_layer.bias is None and red.f.shape == (red.out_features,)


def test_low_rank_adapters_start_at_zero_delta():
    for method in ("lora", "aoft"):
        model = adapt(make_tiny("vit"), make_config(method))
        assert model.get_submodule("blocks.0.attn.qkv").delta_weight().abs().max() == 0
        assert model.get_submodule("blocks.0.attn.qkv").slices == (0, 2)  # q and v


def test_unsupported_model_and_targets():
    import timm

    with pytest.raises(UnsupportedModelError, match="ResNet"):
        adapt(timm.create_model("resnet18", pretrained=False, num_classes=3), make_config("rlrr"))
    with pytest.raises(UsageError, match="reduction"):
        adapt(make_tiny("vit"), make_config("lora", targets=("reduction",)))
    with pytest.raises(UsageError, match="qkv"):
        make_config("rlrr", targets=("q",))
    with pytest.raises(UsageError, match="unknown target"):
        make_config("aoft", targets=("attn",))
    with pytest.raises(UsageError, match="unknown method 'dora'.*choose from rlrr, aoft, lora, linear, full"):
        make_config("dora")
    with pytest.raises(UsageError, match="already"):
        adapt(adapt(make_tiny("vit"), make_config("lora")), make_config("lora"))


@pytest.fixture
def saved(tmp_path):
    model = adapt(make_tiny("vit"), make_config("aoft"))
    perturb_adapter(model)
    save_adapter(model, tmp_path)
    return tmp_path


def test_wrong_backbone_weights(saved):
    with pytest.raises(AdapterMismatchError, match="other base weights"):
        load_adapter(make_tiny("vit", seed=7), saved)


def test_wrong_class_count(saved):
    with pytest.raises(AdapterMismatchError, match="5 classes"):
        load_adapter(make_tiny("vit", num_classes=3), saved)


def test_failed_load_leaves_model_untouched(saved):
    model = make_tiny("vit", seed=7)
    with pytest.raises(AdapterMismatchError):
        load_adapter(model, saved)
    assert getattr(model, "peftx_state", None) is None
    assert not any("peftx" in type(m).__module__ for m in model.modules())


def _rewrite(saved, mutate):
    path = saved / ADAPTER_FILE
    config, tensors = read_adapter(path)
    mutate(tensors)
    import json

    save_file(tensors, str(path), metadata={"peftx_config": json.dumps(config)})
    return path


@pytest.mark.parametrize(
    "mutate,err,match",
    [
        (lambda t: t.pop(next(iter(t))), AdapterFileError, "missing"),
        (lambda t: t.__setitem__("blocks.9.attn.qkv.lam", torch.zeros(1, 8)), AdapterFileError, "unexpected"),
        (lambda t: t.__setitem__("blocks.0.attn.qkv.lam", torch.zeros(2, 3)), AdapterFileError, "shape"),
        (
            lambda t: t.__setitem__("blocks.0.attn.qkv.lam", torch.zeros(2, 8, dtype=torch.int64)),
            AdapterFileError,
            "dtype",
        ),
        (lambda t: t["blocks.0.attn.qkv.lam"].__setitem__((0, 0), float("nan")), NonFiniteError, "NaN"),
    ],
    ids=["missing", "extra", "shape", "dtype", "nan"],
)
def test_bad_tensors(saved, mutate, err, match):
    _rewrite(saved, mutate)
    with pytest.raises(err, match=match):
        load_adapter(make_tiny("vit"), saved)


def test_pickle_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Boom()}, tmp_path / ADAPTER_FILE)
    with pytest.raises(AdapterFileError, match="pickle"):
        load_adapter(make_tiny("vit"), tmp_path)
    assert not marker.exists()


def test_truncated_and_missing_files(saved, tmp_path):
    path = saved / ADAPTER_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(AdapterFileError, match="not a readable safetensors"):
        load_adapter(make_tiny("vit"), saved)
    with pytest.raises(AdapterFileError, match="not found"):
        load_adapter(make_tiny("vit"), tmp_path / "nope")
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(plain))
    with pytest.raises(AdapterFileError, match="no peftx metadata"):
        read_adapter(plain)


@pytest.mark.parametrize("low_bytes", [b"\x80", b"PK"], ids=["0x80", "PK"])
def test_safetensors_whose_header_length_looks_like_a_pickle_still_loads(saved, low_bytes):
    """The first bytes of a safetensors file are its header length: 0x80 or 'PK' there must not read as a pickle."""
    import json
    import struct

    from peftx.checks import is_pickle_file

    path = saved / ADAPTER_FILE
    config, tensors = read_adapter(path)

    def write(pad: int) -> int:
        save_file(tensors, str(path), metadata={"peftx_config": json.dumps({**config, "pad": "x" * pad})})
        return struct.unpack("<Q", path.read_bytes()[:8])[0]

    n0 = write(0)
    want = int.from_bytes(low_bytes, "little")  # the low byte(s) of the header length
    mod = 256 ** len(low_bytes)
    target = n0 + (want - n0) % mod
    for pad in range(target - n0 - 8, target - n0 + 9):  # the header grows one byte per pad char, 8-aligned
        if pad >= 0 and write(pad) % mod == want:
            break
    head = path.read_bytes()[:8]
    assert head.startswith(low_bytes), head
    assert struct.unpack("<Q", head)[0] > 0 and not is_pickle_file(path)
    load_adapter(make_tiny("vit"), saved)  # accepted and loaded

    torch.save({"x": torch.zeros(2)}, saved / "zip.pt")
    torch.save({"x": torch.zeros(2)}, saved / "raw.pt", _use_new_zipfile_serialization=False)
    assert is_pickle_file(saved / "zip.pt") and is_pickle_file(saved / "raw.pt")


# ---------------------------------------------------------------------------------------------------- the registry


def test_registry_lists_and_finds_every_builtin_method():
    from peftx.methods import get_method, method_names

    assert method_names() == ("rlrr", "aoft", "lora", "linear", "full")
    for name in method_names():
        m = get_method(name)
        assert m.name == name and m.config_class.method == name and make_config(name).method == name
    assert get_method("full").trains_backbone and not get_method("linear").wraps_layers


def test_registration_is_checked():
    from peftx.methods import Method, register
    from peftx.methods.lora import LoRAConfig

    with pytest.raises(TypeError):
        register(object)  # type: ignore[arg-type]

    class Clash(Method):
        name = "lora"
        config_class = LoRAConfig

    with pytest.raises(ValueError, match="already registered"):
        register(Clash)

    class Mismatch(Method):
        name = "other"
        config_class = LoRAConfig

    with pytest.raises(ValueError, match="config_class.method"):
        register(Mismatch)


@pytest.fixture
def ia3():
    """A method defined outside peftx, in ONE module (here: this fixture) plus ONE registration line: a learned
    per-output-channel scale of fc2, W' = diag(1 + s) W (IA3-like). Removed from the registry afterwards."""
    from dataclasses import dataclass
    from typing import ClassVar

    from torch import nn

    from peftx.methods import Method, register, registry
    from peftx.methods.base import AdapterConfig, AdapterLinear

    @dataclass
    class IA3Config(AdapterConfig):
        method: ClassVar[str] = "ia3"
        init_std: float = 0.0

    class IA3Linear(AdapterLinear):
        def __init__(self, base, name, init_std):
            super().__init__(base, name)
            self.s = nn.Parameter(torch.randn(base.out_features) * init_std)

        def merge_weight(self, weight):
            return weight * (1 + self.s.to(weight.dtype)).unsqueeze(1)

        def unmerge_weight(self, merged):
            return merged / (1 + self.s.to(merged.dtype)).unsqueeze(1)

    class IA3(Method):
        name = "ia3"
        config_class = IA3Config
        cli_options = {"init-std": "init_std"}
        no_decay = frozenset({"s"})

        def resolve_targets(self, config, layout):
            return {"fc2"}

        def wrap_linear(self, site, base, config, targets, note):
            return IA3Linear(base, site.path, config.init_std) if site.role in targets else None

    register(IA3)  # the one registration line
    yield IA3
    registry._REGISTERED.pop("ia3", None)
    registry._INSTANCES.pop("ia3", None)


def test_a_new_method_is_one_module_and_one_registration_line(ia3, tmp_path):
    """Nothing in the core, the trainer's groups or the CLI option mapping names a method: a method registered from
    outside adapts, splits its weight decay, merges into the plain class, saves / loads, and takes CLI options."""
    from conftest import plain_reference, real_batch

    from peftx.adapter import merge_and_unload, split_weight_decay, state_of
    from peftx.methods import method_names, options_from_cli
    from peftx.tolerances import MERGE_FP32
    from peftx.train import TrainConfig

    assert "ia3" in method_names()
    assert options_from_cli("ia3", {"init_std": None}, ["init-std=0.3"]) == {"init_std": 0.3}
    TrainConfig(method="ia3", method_options={"init_std": 0.3})  # the trainer accepts it
    plain = make_tiny("vit")
    model = adapt(make_tiny("vit"), make_config("ia3", init_std=0.3))
    perturb_adapter(model)
    decay, no_decay = split_weight_decay(model)
    assert decay == ["head.weight"] and set(no_decay) == {"blocks.0.mlp.fc2.s", "blocks.1.mlp.fc2.s", "head.bias"}
    x = real_batch("vit", 4)
    with torch.no_grad():
        ref = model(x)
        assert (ref - plain_reference(plain, model)(x)).abs().max() > 1e-2
        merged = merge_and_unload(model)
        assert type(merged) is type(plain) and merged.state_dict().keys() == plain.state_dict().keys()
        assert (merged(x) - ref).abs().max() <= MERGE_FP32.bound(ref.abs().max().item())
    save_adapter(model, tmp_path)
    fresh = load_adapter(make_tiny("vit"), tmp_path)
    assert state_of(fresh).config.method == "ia3"
    with torch.no_grad():
        assert torch.equal(fresh(x), ref)


def test_cli_options_map_through_each_method():
    from peftx.methods import options_from_cli

    given = {"rank": 4, "alpha": None, "targets": "q, v", "init": None}
    assert options_from_cli("lora", {**given, "alpha": 2.0}) == {"r": 4, "alpha": 2.0, "targets": ["q", "v"]}
    assert options_from_cli("aoft", given) == {"rank": 4, "targets": ["q", "v"]}
    assert options_from_cli("rlrr", {"init": "zeros"}, ["ssf=false", "ssf-init-std=0.01"]) == {
        "init": "zeros",
        "ssf": False,
        "ssf_init_std": 0.01,
    }
    assert options_from_cli("lora", {}, ["r=2", "alpha=1e-1"]) == {"r": 2, "alpha": 0.1}
    assert options_from_cli("full", {"rank": None}) == {}
    with pytest.raises(UsageError, match="--rank is not an option of method rlrr") as e:
        options_from_cli("rlrr", {"rank": 4})
    assert "--init, --targets, --ssf, --ssf-init-std" in e.value.hint and "\n" not in e.value.message
    with pytest.raises(UsageError, match="--init is not an option of method lora"):
        options_from_cli("lora", {"init": "zeros"})
    with pytest.raises(UsageError, match="--alpha is not an option of method linear") as e:
        options_from_cli("linear", {"alpha": 1.0})
    assert "linear takes none" in e.value.hint
    with pytest.raises(UsageError, match="method aoft has no such option"):
        options_from_cli("aoft", {}, ["init=zeros"])
    with pytest.raises(UsageError, match="not KEY=VALUE"):
        options_from_cli("aoft", {}, ["rank"])
    with pytest.raises(UsageError, match="rank: 'four' is not an integer"):
        options_from_cli("aoft", {}, ["rank=four"])
    with pytest.raises(UsageError, match="ssf: 'maybe' is not true or false"):
        options_from_cli("rlrr", {}, ["ssf=maybe"])


def test_rlrr_without_ssf_and_notes_in_the_adapter_record(tmp_path):
    import json

    model = adapt(make_tiny("vit"), make_config("rlrr", ssf=False))
    assert not any(type(m).__name__ == "SSF" for m in model.modules())
    model = adapt(make_tiny("vit_no_qkv_bias"), make_config("rlrr"))
    save_adapter(model, tmp_path)
    notes = json.loads((tmp_path / "adapter_config.json").read_text())["notes"]
    assert len(notes) == 2 and all("attn.qkv: no bias shift f" in n for n in notes)
