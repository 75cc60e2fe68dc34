"""The backbones of 2026 (docs/backbones.md): every method on every other timm class peftx adapts (Eva: DINOv3,
EVA-02, Perception Encoder, RoPE ViTs; BEiT; Swin V2; distilled DeiT), on tiny random-init configs and real images.

Each (family x method) case trains (gradients reach exactly what the method trains, one step lowers the loss),
merges EXACTLY into the same timm class (plain state dict, no peftx module), round-trips through an adapter file,
and has the parameter count the method's rules give. Each family exports once per export form (trt8.5 = JetPack 5:
opset 16, LayerNorm decomposed; trt8.6 / trt10 / trt11: opset 17) and passes ONNX Runtime parity against the
UNMERGED model and every target's parser op list. NaFlexVit is refused before anything is built.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    FAMILY_MODELS,
    NUM_CLASSES,
    make_tiny,
    perturb_adapter,
    plain_reference,
    real_batch,
    tiny_data_cfg,
    tiny_spec,
)

from peftx.adapter import (
    adapt,
    adapter_modules,
    count_parameters,
    fingerprint,
    merge_and_unload,
    state_of,
    trainable_names,
)
from peftx.adapter_io import load_adapter, save_adapter
from peftx.errors import UnsupportedModelError
from peftx.methods import METHOD_NAMES, make_config
from peftx.tolerances import MERGE_FP32, ONNX_FP32

CASES = [(m, f) for f in FAMILY_MODELS for m in METHOD_NAMES]


def _expected_count(method: str, model) -> int:
    """Trainable parameters from the rules in the method modules' docstrings, computed from the plain layers."""
    from timm.layers import RmsNorm

    st = state_of(model)
    if method == "full":
        return sum(p.numel() for p in model.parameters())
    total = sum(p.numel() for h in st.layout.heads for p in model.get_submodule(h).parameters())
    cfg = make_config(method)
    for site in st.layout.linears:
        m = model.get_submodule(site.path)
        lin = getattr(m, "base_layer", m)
        out, inp = lin.out_features, lin.in_features
        if method == "rlrr":  # s_row, s_col per column group; f where a bias of the layer's own can take it
            own_bias = lin.bias is not None and not site.direct_weight
            total += out + site.col_groups * inp + (out if own_bias or site.fold_norm else 0)
        elif method in ("lora", "aoft") and site.role == "qkv":  # default targets q and v
            if site.part is None:  # fused: the q and v row blocks
                d = out // 3
                total += 2 * (cfg.r * (inp + d) if method == "lora" else d + inp + cfg.rank)
            elif site.part in (0, 2):  # separate q_proj / v_proj: the whole layer
                total += cfg.r * (inp + out) if method == "lora" else out + inp + cfg.rank
    if method == "rlrr":
        for s in st.layout.ssf_sites:
            norm = model.get_submodule(s.path)
            base = getattr(norm, "base", norm)
            shift = not isinstance(base, RmsNorm) and not (
                s.fold_conv and model.get_submodule(s.fold_conv).bias is None and s.pos_embed is None
            )
            total += s.dim * (2 if shift else 1)
    return total


@pytest.mark.parametrize("method,family", CASES, ids=[f"{m}-{f}" for m, f in CASES])
def test_family_trains_and_merges_exactly_into_its_timm_class(method, family, tmp_path):
    import timm

    plain = make_tiny(family)
    model = adapt(copy.deepcopy(plain), make_config(method))
    trainable, total = count_parameters(model)
    assert trainable == _expected_count(method, model)
    assert total == sum(p.numel() for p in model.parameters())
    perturb_adapter(model)
    reference = plain_reference(plain, model)
    x = real_batch(family)
    with torch.no_grad():
        ref = model(x)
        # The adapter matters (a hundred times the merge tolerance at least), so parity cannot pass by accident.
        assert (ref - reference(x)).abs().max() > 1e-3

    # Gradients reach exactly what the method trains (the adapted weight is also what q_bias attention reads).
    model.train()
    model(x).logsumexp(dim=1).sum().backward()
    names = set(trainable_names(model))
    for n, p in model.named_parameters():
        if n in names:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None and not p.requires_grad, n
    model.zero_grad()
    model.eval()
    y = torch.arange(len(x)) % NUM_CLASSES
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    loss0 = torch.nn.functional.cross_entropy(model(x), y)
    loss0.backward()
    opt.step()
    with torch.no_grad():
        assert torch.nn.functional.cross_entropy(model(x), y) < loss0
        ref = model(x)

    # Adapter file round trip onto a fresh plain model.
    save_adapter(model, tmp_path)
    fresh = load_adapter(make_tiny(family), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), ref)

    # Merge: the same timm class, its exact state dict layout, no peftx code, the unmerged function.
    with torch.no_grad():
        merged = merge_and_unload(model).eval()
        out = merged(x)
    name, kw = tiny_spec(family)
    built = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, exportable=True, **kw)
    assert type(merged) is type(built) and not any("peftx" in type(m).__module__ for m in merged.modules())
    assert {k: v.shape for k, v in merged.state_dict().items()} == {k: v.shape for k, v in built.state_dict().items()}
    assert (out - ref).abs().max() <= MERGE_FP32.bound(ref.abs().max().item())
    built.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(built.eval()(x), out)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (unmerged RLRR model, merged plain model): RLRR touches every site kind (qkv, proj, fc1, fc2,
    reduction, every norm and the patch tokens)."""
    cache: dict[str, tuple[torch.nn.Module, torch.nn.Module]] = {}

    def get(family: str):
        if family not in cache:
            model = adapt(make_tiny(family), make_config("rlrr"))
            perturb_adapter(model)
            model.eval()
            cache[family] = (model, merge_and_unload(model).eval())
        return cache[family]

    return get, tmp_path_factory.mktemp("families-onnx")


EXPORTS = [(f, t) for f in FAMILY_MODELS for t in ("trt8.5", "trt8.6")]
# torch's TorchScript exporter writes a graph ONNX Runtime cannot run for timm's mixed-RoPE ViTs (an Expand of the
# class token to a wrong shape; plain timm, no peftx involved): export falls back to torch.export, opset 18, which
# TensorRT 10 / 11 parse and 8.5 / 8.6 do not.
OPSET18_ONLY = {"rope_vit_mixed"}


@pytest.mark.parametrize("family,target", EXPORTS, ids=[f"{f}-{t}" for f, t in EXPORTS])
def test_family_exports_for_every_target(exported, family, target):
    """The merged model as the target's export form, ONNX Runtime against the UNMERGED model, and the graph against
    the target's parser op list (trt8.6's opset-17 graph is also the trt10 / trt11 graph: checked against those).
    A family a target cannot take is refused with the reason."""
    from peftx.errors import ExportError
    from peftx.exports.onnx_export import export_onnx
    from peftx.exports.parity import compare, make_input_sets
    from peftx.exports.runners import OnnxRuntimeRunner, TorchRunner
    from peftx.exports.targets import all_targets, resolve_target
    from peftx.exports.tensorrt_ops import check_target_readiness

    get, tmp = exported
    model, merged = get(family)
    profile = resolve_target(target)
    if family in OPSET18_ONLY and profile.layernorm == "decomposed":
        with pytest.raises(ExportError, match="torchscript: .*does not run in ONNX Runtime"):
            export_onnx(
                copy.deepcopy(merged),
                tmp / f"{family}-{target}.onnx",
                input_size=tiny_data_cfg(family)["input_size"],
                opset=profile.export_opset,
                layernorm=profile.layernorm,
            )
        return
    path = export_onnx(
        copy.deepcopy(merged),
        tmp / f"{family}-{target}.onnx",
        input_size=tiny_data_cfg(family)["input_size"],
        opset=profile.export_opset,
        layernorm=profile.layernorm,
    )
    x = real_batch(family)
    result = compare(
        TorchRunner(model, name="unmerged"), OnnxRuntimeRunner(path), make_input_sets(x.numpy(), (1, 3)), ONNX_FP32
    )
    assert result.passed, result.overall
    readiness = check_target_readiness({"model.onnx": path}, profile)
    names = [p.name for p in all_targets()]
    if family in OPSET18_ONLY:
        assert readiness.problems == [f"model.onnx: opset 18 is outside 9..17 parsed by TensorRT 8.6 ({target})"]
        assert set(readiness.newer) == {"trt10", "trt11"} and not any(readiness.newer.values()), readiness.newer
        return
    assert readiness.ok, readiness.problems
    if target == "trt8.6":
        assert set(readiness.newer) == set(names[names.index("trt8.6") + 1 :])
        assert not any(readiness.newer.values()), readiness.newer


def test_distilled_deit_trains_both_heads_and_exports_their_average():
    """DeiT distilled: head (cls token) and head_dist (distillation token) are both new, zero-initialised and
    trained; timm averages them outside distillation training, so the merged model returns that average. The base
    fingerprint ignores both heads (head_dist is random for a new class count)."""
    plain = make_tiny("deit_distilled")
    other = make_tiny("deit_distilled")
    with torch.no_grad():
        other.head_dist.weight.normal_()
    assert fingerprint(plain, state_of(adapt(copy.deepcopy(plain), make_config("lora"))).layout.heads) == fingerprint(
        other, ("head", "head_dist")
    )
    model = adapt(copy.deepcopy(plain), make_config("lora"))
    assert state_of(model).layout.heads == ("head", "head_dist")
    assert not model.head.weight.any() and not model.head_dist.weight.any()
    assert {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"} <= set(trainable_names(model))
    perturb_adapter(model)
    x = real_batch("deit_distilled")
    merged = merge_and_unload(model).eval()
    with torch.no_grad():
        tokens = merged.forward_features(x)
        both = (merged.head(tokens[:, 0]) + merged.head_dist(tokens[:, 1])) / 2
        assert (merged.head(tokens[:, 0]) - merged.head_dist(tokens[:, 1])).abs().max() > 1e-2
        assert torch.allclose(merged(x), both)


def test_rlrr_rules_on_the_new_layer_kinds():
    """What RLRR leaves out, and says so: the shift f of a qkv whose biases are the attention's q_bias / v_bias
    (Eva, BEiT, Swin V2), of a bias-free k_proj, of Swin V2's reduction (its norm comes after it); the SSF shift on
    an RMSNorm (no beta). SwiGLU: a packed fc1 keeps one s_col per half (x, gate), like q / k / v."""
    eva = adapt(make_tiny("eva02"), make_config("rlrr"))
    qkv = eva.get_submodule("blocks.0.attn.qkv")
    assert qkv.f is None and qkv.col_groups == 3
    assert eva.get_submodule("blocks.0.mlp.fc1").s_col.shape[0] == 2
    notes = state_of(eva).notes
    assert any(n.startswith("blocks.0.attn.qkv: no bias shift f (the attention adds its own q_bias") for n in notes)

    split = adapt(make_tiny("eva02_qkv_split"), make_config("rlrr"))
    assert split.get_submodule("blocks.0.attn.k_proj").f is None
    assert split.get_submodule("blocks.0.attn.q_proj").f is not None
    assert split.get_submodule("blocks.0.mlp.fc1_g").f is not None

    rms = adapt(make_tiny("rope_vit_rmsnorm"), make_config("rlrr"))
    norm1 = rms.get_submodule("blocks.0.norm1")
    assert norm1.ssf_shift is None and norm1.ssf_scale is not None
    assert any("blocks.0.norm1: SSF scale only (an RMSNorm has no bias" in n for n in state_of(rms).notes)

    swin = adapt(make_tiny("swinv2"), make_config("rlrr"))
    assert swin.get_submodule("layers.1.downsample.reduction").f is None
    assert swin.get_submodule("layers.0.blocks.0.attn.qkv").col_groups == 1  # one s_col for q, k, v (official Swin)


def test_low_rank_methods_on_separate_projections_and_gated_mlps():
    """LoRA / AOFT's default targets q and v reach the separate q_proj / v_proj (not k_proj), and target fc1 gives
    a packed SwiGLU fc1 one factor pair per half, as the split fc1_x / fc1_g get one each."""
    model = adapt(make_tiny("eva02_qkv_split"), make_config("lora"))
    wrapped = {n for n, _ in adapter_modules(model)}
    assert {"blocks.0.attn.q_proj", "blocks.0.attn.v_proj"} <= wrapped and "blocks.0.attn.k_proj" not in wrapped
    packed = adapt(make_tiny("eva02"), make_config("aoft", targets=("fc1",)))
    fc1 = packed.get_submodule("blocks.0.mlp.fc1")
    assert fc1.groups == 2 and fc1.slices == (0, 1)
    split = adapt(make_tiny("dinov3_qkvb_swiglu"), make_config("lora", targets=("fc1",)))
    assert {"blocks.0.mlp.fc1_g", "blocks.0.mlp.fc1_x"} <= {n for n, _ in adapter_modules(split)}


def test_naflexvit_is_refused_before_anything_is_built():
    import timm

    model = timm.create_model(
        "naflexvit_base_patch16_gap", pretrained=False, num_classes=3, depth=1, embed_dim=32, num_heads=2
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match="variable-length sequence of patches") as err:
        adapt(model, make_config("rlrr"))
    assert "vit_base_patch16_siglip_224" in err.value.hint
    assert not hasattr(model, "peftx_state") and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_peft_conversion_refuses_what_peft_would_get_wrong():
    """peft's LoRA layer is bypassed where timm's attention reads qkv.weight itself (q_bias / v_bias attention), and
    a peft adapter file saves one classifier: those adapters are refused, with merge-export as the way out. An Eva
    whose qkv carries its own bias (RoPE ViT) converts."""
    from peftx.errors import UsageError
    from peftx.peft_convert import lora_tensors

    with pytest.raises(UsageError, match=r"reads blocks\.0\.attn\.qkv\.weight itself") as err:
        lora_tensors(adapt(make_tiny("eva02"), make_config("lora")))
    assert "merge-export" in err.value.hint
    with pytest.raises(UsageError, match=r"2 classifiers \(head, head_dist\)"):
        lora_tensors(adapt(make_tiny("deit_distilled"), make_config("lora")))
    tensors, ranks, head = lora_tensors(adapt(make_tiny("rope_vit"), make_config("lora")))
    assert head == "head" and set(ranks) == {"blocks.0.attn.qkv", "blocks.1.attn.qkv"}


@pytest.mark.parametrize("past_2gb", [False, True], ids=["one-file", "graph+data"])
def test_export_gathers_the_exporters_external_data_into_one_form(tmp_path, monkeypatch, past_2gb):
    """Past 2 GB the TorchScript exporter writes every weight to a file of its own beside the graph. export_onnx
    reads them back and saves the model in peftx's form (onnx_io): one file below the size limit, graph +
    model.onnx.data above it, and nothing else left in the directory. A tiny model stands in for the size: the
    exporter's graph is re-saved as torch saves a large one, and the limit is lowered for the second case."""
    import onnx

    from peftx.exports import onnx_export, onnx_io
    from peftx.exports.parity import compare, make_input_sets
    from peftx.exports.runners import OnnxRuntimeRunner, TorchRunner

    real = onnx_export._EXPORTERS["torchscript"]

    def per_tensor_files(model, example, path, opset):
        real(model, example, path, opset)
        proto = onnx.load(str(path))
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
        assert len(list(path.parent.iterdir())) > 10  # one file per weight, as torch writes them

    monkeypatch.setitem(onnx_export._EXPORTERS, "torchscript", per_tensor_files)
    if past_2gb:
        monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_MIN_BYTES", 0)
    model = make_tiny("dinov3")
    path = onnx_export.export_onnx(
        model, tmp_path / "model.onnx", input_size=(3, 32, 32), metadata={"k": "v"}, exporter="torchscript"
    )
    expected = ["model.onnx", "model.onnx.data"] if past_2gb else ["model.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == expected
    assert [p.name for p in onnx_io.files(path)] == expected
    if past_2gb:
        weights = 4 * sum(p.numel() for p in model.parameters())
        assert (tmp_path / "model.onnx.data").stat().st_size > 0.9 * weights > 10 * path.stat().st_size
    assert onnx_export.read_metadata(path)["k"] == "v"
    x = real_batch("dinov3")
    result = compare(TorchRunner(model), OnnxRuntimeRunner(path), make_input_sets(x.numpy(), (1, 3)), ONNX_FP32)
    assert result.passed, result.overall


def test_jetpack5_fp16_keeps_every_rmsnorm_fp32(tmp_path):
    """TensorRT 8.5 takes norms decomposed; an RMSNorm's mean of squares overflows FP16 like a LayerNorm's variance,
    so its subgraph (Pow, ReduceMean, Add, Sqrt, Div) is found in the shipped graph, one per RmsNorm module, and
    pinned FP32 in model_fp16.onnx and in build_engine.sh's --layerPrecisions."""
    import onnx
    from timm.layers import RmsNorm

    from peftx.exports.bundle import read_bundle, write_bundle
    from peftx.exports.layernorm import decomposed_rmsnorms

    model = adapt(make_tiny("rope_vit_rmsnorm"), make_config("lora"))
    perturb_adapter(model)
    model.eval()
    modules = sum(isinstance(m, RmsNorm) for m in model.modules())
    cfg = tiny_data_cfg("rope_vit_rmsnorm")
    out = tmp_path / "bundle"
    write_bundle(
        model,
        merge_and_unload(copy.deepcopy(model)).eval(),
        out,
        input_size=cfg["input_size"],
        data_config=cfg,
        class_names=[f"c{i}" for i in range(5)],
        provenance={"method": "test"},
        images=real_batch("rope_vit_rmsnorm", n=8),
        batch=(1, 4, 8),
        precision="fp16",
        tensorrt="off",
        simplify=False,
        target="jetpack5",
    )
    found = decomposed_rmsnorms(onnx.load(str(out / "model.onnx")))
    assert len(found) == modules > 0
    pinned = {name for norm in found for name in norm.nodes}
    meta = read_bundle(out)
    assert pinned <= set(meta["fp16"]["pinned_nodes"]) and meta["status"] == "ok"
    fp16 = onnx.shape_inference.infer_shapes(onnx.load(str(out / "model_fp16.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in fp16.graph.value_info}
    outputs = [o for node in fp16.graph.node if node.name in pinned for o in node.output]
    assert len(outputs) == len(pinned) and all(types.get(o) == onnx.TensorProto.FLOAT for o in outputs)
    script = (out / "build_engine.sh").read_text()
    assert all(f"{name}:fp32" in script for name in pinned)
