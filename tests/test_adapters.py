"""The adapter matrix: method x model family, on tiny real timm models and real images."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from conftest import (
    EDGE_MODELS,
    NUM_CLASSES,
    TINY_MODELS,
    make_tiny,
    perturb_adapter,
    plain_reference,
    real_batch,
    tiny_data_cfg,
)
from safetensors.torch import save_file

from peftx.adapter import (
    adapt,
    adapter_modules,
    adapter_state_dict,
    count_parameters,
    merge,
    merge_and_unload,
    state_of,
    trainable_names,
    unmerge,
)
from peftx.adapter_io import load_adapter, save_adapter
from peftx.errors import ExportError, NonFiniteError
from peftx.methods import METHOD_NAMES, get_method, make_config
from peftx.tolerances import MERGE_FP32, ONNX_FP32

CASES = [(m, f) for m in METHOD_NAMES for f in TINY_MODELS]


def adapted(method: str, family: str):
    """(plain reference without the adapter, adapted model) — both eval, adapter non-trivial."""
    plain = make_tiny(family)
    model = adapt(copy.deepcopy(plain), make_config(method))
    perturb_adapter(model)
    return plain_reference(plain, model), model


@pytest.fixture(params=CASES, ids=[f"{m}-{f}" for m, f in CASES])
def case(request):
    method, family = request.param
    plain, model = adapted(method, family)
    return method, family, plain, model, real_batch(family)


def test_adapter_changes_output(case):
    _, _, plain, model, x = case
    with torch.no_grad():
        assert (model(x) - plain(x)).abs().max() > 1e-2


def test_only_adapter_and_head_get_gradients(case):
    _, _, _, model, x = case
    model.train()
    model(x).logsumexp(dim=1).sum().backward()
    trainable = set(trainable_names(model))
    head = state_of(model).layout.head
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None and not p.requires_grad, n
    method = get_method(state_of(model).config.method)
    beyond_head = {n for n in trainable if not n.startswith(head + ".")}
    if method.trains_backbone:
        assert trainable == {n for n, _ in model.named_parameters()}
    elif method.wraps_layers:
        assert beyond_head and all(
            n in {f"{p}.{o}" for p, m in adapter_modules(model) for o, _ in m.own_parameters()} for n in beyond_head
        )
    else:
        assert not beyond_head  # linear probing: the head alone


def test_one_step_lowers_loss_on_real_images(case):
    _, _, _, model, x = case
    y = torch.arange(len(x)) % NUM_CLASSES
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    model.eval()  # no dropout: the same function before and after the step
    loss0 = torch.nn.functional.cross_entropy(model(x), y)
    loss0.backward()
    opt.step()
    with torch.no_grad():
        loss1 = torch.nn.functional.cross_entropy(model(x), y)
    assert loss1 < loss0


def test_merge_parity_and_plain_class(case):
    _, _, plain, model, x = case
    with torch.no_grad():
        ref = model(x)
        assert (ref - plain(x)).abs().max() > 1e-2  # the adapter matters, so parity cannot pass by accident
        merged = merge_and_unload(model)
        out = merged(x)
    assert type(merged) is type(plain)
    assert not any("peftx" in type(m).__module__ for m in merged.modules())
    assert (out - ref).abs().max() <= MERGE_FP32.bound(ref.abs().max().item())
    assert {k: v.shape for k, v in merged.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}


def test_inplace_merge_then_unmerge_restores_base(case):
    _, _, _, model, x = case
    base = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x)
        merge(model)
        changed = max((v - base[k]).abs().max().item() for k, v in model.state_dict().items())
        if adapter_modules(model):
            assert changed > 1e-3
        else:  # linear / full wrap nothing: their merge is the identity
            assert changed == 0
        assert (model(x) - ref).abs().max() <= MERGE_FP32.bound(ref.abs().max().item())
        unmerge(model)
        for k, v in model.state_dict().items():
            assert torch.allclose(v, base[k], rtol=1e-5, atol=1e-6), k
        assert (model(x) - ref).abs().max() <= MERGE_FP32.bound(ref.abs().max().item())


def test_save_load_round_trip(case, tmp_path):
    method, family, _, model, x = case
    save_adapter(model, tmp_path)
    fresh = load_adapter(make_tiny(family).eval(), tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["method"] == method and cfg["num_classes"] == NUM_CLASSES
    assert cfg["base_fingerprint"] == state_of(model).base_fingerprint


def _expected_count(method: str, model) -> int:
    """Trainable parameters from the methods' definitions (the papers), computed independently of peftx."""
    cfg = make_config(method)
    st = state_of(model)
    if method == "full":
        return sum(p.numel() for p in model.parameters())
    total = sum(p.numel() for p in model.get_submodule(st.layout.head).parameters())
    for site in st.layout.linears:
        lin = (
            model.get_submodule(site.path).base_layer
            if hasattr(model.get_submodule(site.path), "base_layer")
            else model.get_submodule(site.path)
        )
        out, inp = lin.out_features, lin.in_features
        if method == "rlrr":  # s_row, s_col per group, and f where the layer has a bias or a norm to fold f into
            total += out + site.col_groups * inp + (out if lin.bias is not None or site.fold_norm else 0)
        elif site.role == "qkv" and method in ("lora", "aoft"):  # default low-rank targets: the q and v slices
            d = out // 3
            total += 2 * (cfg.r * (inp + d) if method == "lora" else (d + inp + cfg.rank))
    if method == "rlrr":
        total += sum(2 * s.dim for s in st.layout.ssf_sites)
    return total


@pytest.mark.parametrize("method,family", CASES, ids=[f"{m}-{f}" for m, f in CASES])
def test_parameter_counts(method, family):
    model = adapt(make_tiny(family), make_config(method))
    trainable, total = count_parameters(model)
    assert trainable == _expected_count(method, model)
    assert total == sum(p.numel() for p in model.parameters())
    assert trainable == sum(v.numel() for v in adapter_state_dict(model).values())


def test_rlrr_vit_base_counts_and_file_size(tmp_path):
    """The RLRR paper's count: ViT-B/16 RLRR trains 288,768 + the head (769 * 10 for 10 classes)."""
    import timm

    model = adapt(timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10), make_config("rlrr"))
    trainable, _ = count_parameters(model)
    assert trainable == 288_768 + 7_690
    path = save_adapter(model, tmp_path)
    assert path.stat().st_size < 2 * 1024 * 1024


@pytest.mark.slow
def test_merged_model_loads_with_timm_alone(tmp_path):
    _, model = adapted("rlrr", "swin")
    x = real_batch("swin", 2)
    merged = merge_and_unload(model)
    save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, str(tmp_path / "m.safetensors"))
    torch.save(x, tmp_path / "x.pt")
    name, kw = TINY_MODELS["swin"]
    code = (
        "import sys, torch, timm; from safetensors.torch import load_file\n"
        f"m = timm.create_model({name!r}, pretrained=False, num_classes={NUM_CLASSES}, **{kw!r}).eval()\n"
        f"m.load_state_dict(load_file({str(tmp_path / 'm.safetensors')!r}), strict=True)\n"
        "assert not any(k.startswith('peftx') for k in sys.modules)\n"
        f"torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})).detach(), {str(tmp_path / 'y.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    with torch.no_grad():
        ref = model(x)
    assert (torch.load(tmp_path / "y.pt") - ref).abs().max() <= MERGE_FP32.bound(ref.abs().max().item())


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    """Same keys (every wrapper still there) and bit-identical tensors (torch.equal: inf equals inf)."""
    now = model.state_dict()
    assert now.keys() == before.keys()
    for k, v in now.items():
        assert torch.equal(v, before[k]), k


def test_safe_merge_refuses_non_finite_and_touches_nothing():
    _, model = adapted("rlrr", "vit")
    with torch.no_grad():  # the last SSF and an fc2 in the middle: planned after layers that merge fine
        model.get_submodule("blocks.1.mlp.fc2").s_row[3] = float("inf")
    before = _snapshot(model)
    with pytest.raises(NonFiniteError, match="blocks.1.mlp.fc2"):
        merge(model)
    _assert_unchanged(model, before)
    assert not any(m.merged for _, m in adapter_modules(model))
    with pytest.raises(NonFiniteError):
        merge_and_unload(model, inplace=True)
    _assert_unchanged(model, before)
    assert state_of(model) is not None and not any(m.merged for _, m in adapter_modules(model))


def test_failed_inplace_unload_leaves_the_model_adapted_and_unchanged():
    """A fold that cannot be done (Swin's reduction shift, once its weight loses full row rank) is found while
    planning: merge_and_unload(inplace=True) raises and every wrapper and tensor is as it was."""
    _, model = adapted("rlrr", "swin")
    red = model.get_submodule("layers.1.downsample.reduction")
    with torch.no_grad():  # two equal rows: W δ = f has no solution for f with f0 != f1
        red.base_layer.weight[1].copy_(red.base_layer.weight[0])
        red.s_row[1] = red.s_row[0]
        red.f[1] = red.f[0] + 1.0
    x = real_batch("swin", 2)
    with torch.no_grad():
        ref = model(x)
    before = _snapshot(model)
    with pytest.raises(ExportError, match="layers.1.downsample.reduction"):
        merge_and_unload(model, inplace=True)
    _assert_unchanged(model, before)
    assert not any(m.merged for _, m in adapter_modules(model)) and len(adapter_modules(model)) > 0
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    merge(model)  # the wrappers-kept merge needs no fold: it still works, and unmerges
    unmerge(model)
    with torch.no_grad():
        assert (model(x) - ref).abs().max() <= MERGE_FP32.bound(ref.abs().max().item())


# -- sites a method may not be able to merge: every method on every such model, through to ONNX Runtime ------------

EDGE_CASES = [(m, f) for m in METHOD_NAMES for f in EDGE_MODELS]


@pytest.mark.parametrize("method,family", EDGE_CASES, ids=[f"{m}-{f}" for m, f in EDGE_CASES])
def test_every_method_merges_and_exports_on_every_site(tmp_path, method, family):
    """adapt -> non-trivial adapter -> output changed -> merge_and_unload -> the plain timm state dict (keys and
    shapes of timm.create_model itself) -> merged == unmerged (MERGE_FP32) -> ONNX -> ONNX Runtime == unmerged."""
    import timm

    from peftx.exports.onnx_export import export_onnx
    from peftx.exports.parity import compare, make_input_sets
    from peftx.exports.runners import OnnxRuntimeRunner, TorchRunner

    plain, model = adapted(method, family)
    x = real_batch(family)
    with torch.no_grad():
        ref = model(x)
        assert (ref - plain(x)).abs().max() > 1e-2  # the adapter matters, so parity cannot pass by accident
        merged = merge_and_unload(model)
        out = merged(x)
    name, kw = EDGE_MODELS[family]
    fresh = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kw)
    assert type(merged) is type(fresh) and not any("peftx" in type(m).__module__ for m in merged.modules())
    assert {k: v.shape for k, v in merged.state_dict().items()} == {k: v.shape for k, v in fresh.state_dict().items()}
    assert (out - ref).abs().max() <= MERGE_FP32.bound(ref.abs().max().item())
    size = tiny_data_cfg(family)["input_size"]
    path = export_onnx(merged.eval(), tmp_path / "m.onnx", input_size=size)
    inputs = make_input_sets(x.numpy(), (1, 3))
    result = compare(TorchRunner(model.eval(), name="unmerged"), OnnxRuntimeRunner(path), inputs, ONNX_FP32)
    assert result.passed, result.overall


def test_rlrr_bias_free_sites_are_left_out_or_folded_exactly():
    """RLRR's shift f: left out where no exact fold exists (qkv / fc1 without bias: out > in), kept and folded into
    attn.norm / mlp.norm where they feed a bias-free proj / fc2; the patch-token SSF shift of a bias-free patch conv
    lives in the position embedding's patch rows. Each omission is a note."""
    model = adapt(make_tiny("vit_no_qkv_bias"), make_config("rlrr"))
    qkv, proj = model.get_submodule("blocks.0.attn.qkv"), model.get_submodule("blocks.0.attn.proj")
    assert qkv.f is None and proj.f is not None
    assert any(n.startswith("blocks.0.attn.qkv: no bias shift f") for n in state_of(model).notes)

    model = adapt(make_tiny("vit_norms_no_proj_bias"), make_config("rlrr"))
    perturb_adapter(model)
    for sub, norm in (("attn.proj", "attn.norm"), ("mlp.fc2", "mlp.norm")):
        layer = model.get_submodule(f"blocks.0.{sub}")
        assert layer.base_layer.bias is None and layer.f is not None and layer.fold_norm == f"blocks.0.{norm}"
    assert model.get_submodule("blocks.0.mlp.fc1").f is None
    before = model.get_submodule("blocks.0.attn.norm").bias.clone()
    merged = merge_and_unload(model)
    assert not torch.allclose(merged.get_submodule("blocks.0.attn.norm").bias, before)  # f moved there

    for family, offset in (("vit_pre_norm", 1), ("vit_pre_norm_reg", 0)):
        model = adapt(make_tiny(family), make_config("rlrr"))
        perturb_adapter(model)
        ssf = model.get_submodule("patch_embed.norm")
        assert model.patch_embed.proj.bias is None and ssf.ssf_shift is not None and ssf.pos_offset == offset
        pos = model.pos_embed.detach().clone()
        merged = merge_and_unload(model)
        moved = merged.pos_embed.detach() - pos
        assert torch.equal(moved[:, :offset], torch.zeros_like(moved[:, :offset]))  # the prefix tokens' rows stay
        torch.testing.assert_close(moved[0, offset:], ssf.ssf_shift.detach().expand_as(moved[0, offset:]))


def test_rlrr_reduction_keeps_its_shift_and_merges_via_the_norm():
    """Swin's bias-free PatchMerging reduction (2C x 4C, full row rank) keeps f: it folds into downsample.norm."""
    model = adapt(make_tiny("swin"), make_config("rlrr"))
    red = model.get_submodule("layers.1.downsample.reduction")
    assert red.f is not None and red.fold_norm == "layers.1.downsample.norm" and not state_of(model).notes
