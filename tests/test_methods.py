"""Method-level facts (AOFT generator, RLRR init and structure) and adapter-file error paths."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from peftx.adapter import adapt
from peftx.adapter_io import ADAPTER_FILE, load_adapter, read_adapter, save_adapter
from peftx.errors import AdapterFileError, AdapterMismatchError, NonFiniteError, UnsupportedModelError, UsageError
from peftx.methods import make_config
from peftx.methods.orthogonal import DENOM_EPS, ao_basis, orthogonality_error, random_unit_vector
from peftx.tolerances import ORTHOGONALITY_FP32

from conftest import make_tiny, perturb_adapter


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
    assert all(a < b for a, b in zip(values, values[1:]))  # drift grows with the distance from the sphere
    assert drift[1.01] < 0.1  # near the sphere the columns stay nearly orthonormal


def test_ao_basis_guard_at_the_pole():
    q = torch.zeros(32)
    q[0] = -1.0  # 1 + q0 = 0 exactly
    m = ao_basis(q.requires_grad_(), 4)
    assert torch.isfinite(m).all()
    m.sum().backward()
    assert torch.isfinite(q.grad).all()
    assert DENOM_EPS > 0


def test_rlrr_official_init_and_qkv_structure():
    model = adapt(make_tiny("vit"), make_config("rlrr"))
    qkv = model.get_submodule("blocks.0.attn.qkv")
    dim = qkv.in_features
    assert qkv.s_col.shape == (3, dim)  # one column scale per q, k, v (official ViT code)
    assert qkv.s_row.abs().max() <= math.sqrt(6) and qkv.s_col.abs().max() <= math.sqrt(6 / dim)
    assert torch.count_nonzero(qkv.f) == 0
    w = qkv.base_layer.weight
    rel = (qkv.merge_weight(w) - w).norm() / w.norm()
    assert 0.01 < rel < 0.3  # non-zero at init (METHODS.md: about 0.07 at ViT-B scale)
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
    with pytest.raises(UsageError, match="unknown method"):
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


@pytest.mark.parametrize("mutate,err,match", [
    (lambda t: t.pop(next(iter(t))), AdapterFileError, "missing"),
    (lambda t: t.__setitem__("blocks.9.attn.qkv.lam", torch.zeros(1, 8)), AdapterFileError, "unexpected"),
    (lambda t: t.__setitem__("blocks.0.attn.qkv.lam", torch.zeros(2, 3)), AdapterFileError, "shape"),
    (lambda t: t.__setitem__("blocks.0.attn.qkv.lam", torch.zeros(2, 8, dtype=torch.int64)), AdapterFileError,
     "dtype"),
    (lambda t: t["blocks.0.attn.qkv.lam"].__setitem__((0, 0), float("nan")), NonFiniteError, "NaN"),
], ids=["missing", "extra", "shape", "dtype", "nan"])
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
