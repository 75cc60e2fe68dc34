"""Adapter layout discovery: where adapters can go, found from the model's structure (no hard-coded layer counts).

Supported timm classes (docs/backbones.md lists the model names and what each method trains on them):

* ``VisionTransformer``: ViT, DeiT, DINOv2 (LayerScale, register tokens), CLIP / SigLIP; and its subclass
  ``VisionTransformerDistilled`` (DeiT with a distillation token: BOTH heads, ``head`` and ``head_dist``, are new and
  trained; timm averages them outside distillation training, and the exported model returns that average);
* ``Eva``: EVA-02, DINOv3, Perception Encoder (``vit_pe_*``), the RoPE ViTs (``vit_*_rope_*``): fused qkv (with or
  without the separate ``q_bias`` / ``v_bias`` parameters and a k without bias) or separate q / k / v projections,
  GELU MLP or SwiGLU (packed ``fc1`` = [x; gate], or ``fc1_x`` / ``fc1_g``), LayerNorm or RMSNorm, RoPE, layer scale;
* ``Beit`` (BEiT, BEiT v2): q_bias / v_bias, relative position bias;
* ``SwinTransformer`` (v1) and ``SwinTransformerV2`` (cosine attention, continuous position bias MLP, post-norm
  blocks, q_bias / v_bias).

Refused with the reason: ``NaFlexVit`` (variable-length patch input), and anything else, or a block whose layers are
not the expected ``nn.Linear`` / norm, as an :class:`UnsupportedModelError` naming the module.

Sites where timm's attention reads the qkv weight itself (``F.linear(x, qkv.weight, cat(q_bias, k_bias, v_bias))``:
Eva, BEiT, Swin V2 with their separate q / v biases) are marked ``direct_weight``: the adapter's wrapper serves the
adapted weight there as its ``weight`` attribute, and a method must not give such a layer a bias update (the
attention would never add it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from torch import nn

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class LinearSite:
    path: str  # module path of the nn.Linear
    role: str  # qkv | proj | fc1 | fc2 | reduction
    col_groups: int = 1  # RLRR s_col groups: 3 for ViT's fused qkv (per q/k/v), 1 elsewhere (Swin shares one)
    # For a bias-free layer: the affine LayerNorm that feeds it and nothing else, when out <= in. A bias shift f on
    # the layer can then move into that LayerNorm's bias exactly (solve W δ = f; exact when W has full row rank).
    # None where no such LayerNorm exists (e.g. qkv/fc1: out > in, so W δ = f has no solution in general).
    fold_norm: str | None = None
    # Equal row blocks a slice-aware method (LoRA, AOFT) adapts each with its own factors: 3 (q, k, v) for a fused
    # qkv, 2 (x, gate) for a packed SwiGLU fc1, else 1.
    row_groups: int = 1
    # 0 / 1 / 2 for a separate q / k / v projection (role "qkv"); None for a fused qkv or any other layer.
    part: int | None = None
    # The parent reads this layer's `.weight` itself instead of calling it (q_bias / v_bias attention): the wrapper
    # must expose the adapted weight and must not add a bias of its own.
    direct_weight: bool = False


@dataclass(frozen=True)
class SSFSite:
    path: str  # a LayerNorm, or the Identity in patch_embed.norm
    dim: int
    fold_conv: str | None = None  # Identity at patch_embed.norm: the patch conv the SSF folds into
    # Patch conv without a bias (CLIP-style pre-norm ViTs): the position embedding is added to every patch token
    # right after the conv, so a per-channel shift of the patch tokens lives exactly in its patch rows
    # (from row ``pos_offset`` on: after the prefix tokens, or every row with ``no_embed_class``).
    pos_embed: str | None = None
    pos_offset: int = 0


@dataclass(frozen=True)
class Layout:
    family: str  # "vit" | "vit_distilled" | "eva" | "beit" | "swin" | "swinv2"
    linears: tuple[LinearSite, ...]
    ssf_sites: tuple[SSFSite, ...]
    head: str  # path of the classifier nn.Linear
    blocks: tuple[str, ...]  # transformer blocks (residual dropout lives on their drop_path1/2)
    roles: frozenset[str] = field(default_factory=frozenset)
    extra_heads: tuple[str, ...] = ()  # further classifier Linears trained with `head` (DeiT's head_dist)

    @property
    def heads(self) -> tuple[str, ...]:
        """Every classifier Linear: new, zero-initialised and trained by every method."""
        return (self.head, *self.extra_heads)


# A timm model as the layout reads it: family attributes (blocks, layers, patch_embed, get_classifier) that
# nn.Module does not declare, so they are looked up dynamically (and checked with _need where it matters).
TimmModel = Any

_M = TypeVar("_M", bound=nn.Module)


@overload
def _need(module: nn.Module, path: str, kind: type[_M]) -> _M: ...
@overload
def _need(module: nn.Module, path: str, kind: tuple[type, ...]) -> nn.Module: ...
def _need(module: nn.Module, path: str, kind: type | tuple[type, ...]) -> nn.Module:
    try:
        sub = module.get_submodule(path)
    except AttributeError:
        raise UnsupportedModelError(f"{type(module).__name__}: expected a layer at '{path}', found none") from None
    if not isinstance(sub, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise UnsupportedModelError(f"layer '{path}' is {type(sub).__name__}, peftx adapts only {names} there")
    return sub


def _module_path(model: nn.Module, target: nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is target:
            return name
    raise UnsupportedModelError(f"{type(model).__name__}: classifier module not found in the model")


def _vit_layout(model: TimmModel) -> Layout:
    linears, ssf, blocks = [], [], []
    _need(model, "patch_embed", nn.Module)
    proj = _need(model, "patch_embed.proj", nn.Conv2d)
    pe_norm = _need(model, "patch_embed.norm", (nn.Identity, nn.LayerNorm))
    dim = proj.out_channels
    ssf.append(_patch_site(model, pe_norm, dim))
    for i in range(len(model.blocks)):
        b = f"blocks.{i}"
        blocks.append(b)
        qkv = _need(model, f"{b}.attn.qkv", nn.Linear)
        if qkv.out_features != 3 * qkv.in_features:
            raise UnsupportedModelError(
                f"layer '{b}.attn.qkv' is not a fused q/k/v projection of width 3x{qkv.in_features}"
            )
        linears.append(LinearSite(f"{b}.attn.qkv", "qkv", col_groups=3, row_groups=3))
        # timm's Attention applies attn.norm right before proj, Mlp applies mlp.norm right before fc2 (LayerNorms
        # with scale_attn_norm / scale_mlp_norm, else Identity); qkv and fc1 follow norm1 / norm2 but have out > in.
        for sub, role, before in (
            ("attn.proj", "proj", "attn.norm"),
            ("mlp.fc1", "fc1", None),
            ("mlp.fc2", "fc2", "mlp.norm"),
        ):
            lin = _need(model, f"{b}.{sub}", nn.Linear)
            fold = _fold_norm(model, lin, f"{b}.{before}" if before else None)
            linears.append(LinearSite(f"{b}.{sub}", role, fold_norm=fold))
        ssf += [_layer_norm_site(model, f"{b}.{n}") for n in ("norm1", "norm2")]
    # The final norm: `norm` for token pooling, `fc_norm` after global pooling (timm makes the other an Identity);
    # neither with final_norm=False.
    for final in ("norm", "fc_norm"):
        if isinstance(getattr(model, final, None), nn.LayerNorm):
            ssf.append(SSFSite(final, getattr(model, final).normalized_shape[0]))
            break
    heads = _head_paths(model)
    family = "vit_distilled" if len(heads) > 1 else "vit"
    return Layout(family, tuple(linears), tuple(ssf), heads[0], tuple(blocks), extra_heads=heads[1:])


def _patch_site(model: TimmModel, pe_norm: nn.Module, dim: int) -> SSFSite:
    """The SSF site on the patch tokens: the LayerNorm in patch_embed.norm, or the Identity there (fold: the conv)."""
    if isinstance(pe_norm, nn.LayerNorm):
        return SSFSite("patch_embed.norm", dim)
    if model.patch_embed.proj.bias is not None or not isinstance(getattr(model, "pos_embed", None), nn.Parameter):
        return SSFSite("patch_embed.norm", dim, "patch_embed.proj")
    offset = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 0))
    return SSFSite("patch_embed.norm", dim, "patch_embed.proj", pos_embed="pos_embed", pos_offset=offset)


def _fold_norm(model: nn.Module, linear: nn.Linear, before: str | None) -> str | None:
    """``before`` when it is an affine LayerNorm a bias-free ``linear`` with out <= in could take a shift from."""
    if before is None or linear.bias is not None or linear.out_features > linear.in_features:
        return None
    try:
        norm = model.get_submodule(before)
    except AttributeError:  # older timm blocks have no attn.norm / mlp.norm slot
        return None
    ok = isinstance(norm, nn.LayerNorm) and norm.weight is not None and norm.bias is not None
    return before if ok else None


def _layer_norm_site(model: nn.Module, path: str) -> SSFSite:
    """An SSF site on a LayerNorm's output."""
    return SSFSite(path, _need(model, path, nn.LayerNorm).normalized_shape[0])


def _swin_block_sites(model: nn.Module, b: str) -> tuple[list[LinearSite], list[SSFSite]]:
    """A Swin (V1 or V2) block's proj, fc1 and fc2 (no LayerNorm right before any of them, so nothing to fold) and
    its SSF sites on norm1 and norm2."""
    linears: list[LinearSite] = []
    for sub, role in (("attn.proj", "proj"), ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2")):
        _need(model, f"{b}.{sub}", nn.Linear)
        linears.append(LinearSite(f"{b}.{sub}", role))
    return linears, [_layer_norm_site(model, f"{b}.{n}") for n in ("norm1", "norm2")]


def _swin_layout(model: TimmModel) -> Layout:
    linears, ssf, blocks = [], [], []
    for si, stage in enumerate(model.layers):
        s = f"layers.{si}"
        if not isinstance(stage.downsample, nn.Identity):
            _need(model, f"{s}.downsample.norm", nn.LayerNorm)
            red = _need(model, f"{s}.downsample.reduction", nn.Linear)  # bias-free, 2C x 4C, right after its norm
            fold = _fold_norm(model, red, f"{s}.downsample.norm")
            linears.append(LinearSite(f"{s}.downsample.reduction", "reduction", fold_norm=fold))
        for bi in range(len(stage.blocks)):
            b = f"{s}.blocks.{bi}"
            blocks.append(b)
            # Swin's official RLRR shares ONE s_col across q, k, v of the fused qkv.
            linears.append(LinearSite(f"{b}.attn.qkv", "qkv", col_groups=1, row_groups=3))
            _need(model, f"{b}.attn.qkv", nn.Linear)
            block_linears, block_ssf = _swin_block_sites(model, b)
            linears += block_linears
            ssf += block_ssf
    ssf.append(_layer_norm_site(model, "norm"))
    return Layout("swin", tuple(linears), tuple(ssf), _head_path(model), tuple(blocks))


def _norm_site(model: nn.Module, path: str) -> SSFSite:
    """An SSF site on a LayerNorm or RMSNorm output (RMSNorm: no beta, so RLRR trains the SSF scale only there)."""
    from timm.layers import RmsNorm

    norm = _need(model, path, (nn.LayerNorm, RmsNorm))
    shape = norm.normalized_shape
    assert isinstance(shape, tuple), path  # both classes store it as a tuple of ints
    return SSFSite(path, int(shape[0]))


def _final_norm_site(model: nn.Module) -> SSFSite | None:
    """The final norm: `norm` for token pooling, `fc_norm` after global pooling (timm makes the other an Identity)."""
    from timm.layers import RmsNorm

    for final in ("norm", "fc_norm"):
        if isinstance(getattr(model, final, None), (nn.LayerNorm, RmsNorm)):
            return _norm_site(model, final)
    return None


def _qkv_sites(model: nn.Module, b: str, col_groups: int) -> list[LinearSite]:
    """The q / k / v projection(s) of block ``b``: one fused ``attn.qkv`` or separate ``q_proj`` / ``k_proj`` /
    ``v_proj`` (Eva with qkv_fused=False: EVA-02 B/L, where k has no bias)."""
    attn = _need(model, f"{b}.attn", nn.Module)
    if getattr(attn, "qkv", None) is not None:
        qkv = _need(model, f"{b}.attn.qkv", nn.Linear)
        if qkv.out_features % 3:
            raise UnsupportedModelError(f"layer '{b}.attn.qkv' is not a fused q/k/v projection (out % 3 != 0)")
        # q_bias / v_bias as parameters of the attention: it calls F.linear(x, qkv.weight, cat(q_bias, 0, v_bias)).
        direct = getattr(attn, "q_bias", None) is not None
        if direct and qkv.bias is not None:
            raise UnsupportedModelError(f"layer '{b}.attn.qkv' has a bias and the attention a q_bias too")
        return [LinearSite(f"{b}.attn.qkv", "qkv", col_groups=col_groups, row_groups=3, direct_weight=direct)]
    sites = []
    for part, name in enumerate(("q_proj", "k_proj", "v_proj")):
        _need(model, f"{b}.attn.{name}", nn.Linear)
        sites.append(LinearSite(f"{b}.attn.{name}", "qkv", part=part))
    return sites


def _mlp_sites(model: nn.Module, b: str) -> list[LinearSite]:
    """The MLP of block ``b``: GELU ``Mlp`` (fc1, fc2), packed SwiGLU ``GluMlp`` (fc1 = [x; gate] rows, two row groups
    with their own RLRR s_col, like q / k / v) or ``SwiGLU`` (fc1_x, fc1_g: both role "fc1"); fc2 after ``mlp.norm``."""
    from timm.layers import GluMlp, Mlp, SwiGLU

    mlp = _need(model, f"{b}.mlp", (Mlp, GluMlp, SwiGLU))
    sites = []
    if isinstance(mlp, SwiGLU):
        for sub in ("fc1_g", "fc1_x"):
            _need(model, f"{b}.mlp.{sub}", nn.Linear)
            sites.append(LinearSite(f"{b}.mlp.{sub}", "fc1"))
    else:
        fc1 = _need(model, f"{b}.mlp.fc1", nn.Linear)
        groups = 2 if isinstance(mlp, GluMlp) else 1
        if fc1.out_features % groups:
            raise UnsupportedModelError(f"layer '{b}.mlp.fc1' does not split into x and gate halves")
        sites.append(LinearSite(f"{b}.mlp.fc1", "fc1", col_groups=groups, row_groups=groups))
    fc2 = _need(model, f"{b}.mlp.fc2", nn.Linear)
    sites.append(LinearSite(f"{b}.mlp.fc2", "fc2", fold_norm=_fold_norm(model, fc2, f"{b}.mlp.norm")))
    return sites


def _eva_beit_layout(model: TimmModel, family: str) -> Layout:
    """timm ``Eva`` (EVA-02, DINOv3, PE, RoPE ViTs) and ``Beit``: pre-norm (or post-norm) blocks with norm1 / attn /
    norm2 / mlp and optional layer scale gamma_1 / gamma_2 (frozen tensors of the plain model)."""
    from timm.layers import AttentionRope
    from timm.models.beit import Attention as BeitAttention
    from timm.models.eva import EvaAttention

    linears, ssf, blocks = [], [], []
    proj = _need(model, "patch_embed.proj", nn.Conv2d)
    ssf.append(_patch_site(model, _need(model, "patch_embed.norm", (nn.Identity, nn.LayerNorm)), proj.out_channels))
    for i in range(len(model.blocks)):
        b = f"blocks.{i}"
        blocks.append(b)
        attn = _need(model, f"{b}.attn", (EvaAttention, AttentionRope, BeitAttention))
        linears += _qkv_sites(model, b, col_groups=3)
        out = _need(model, f"{b}.attn.proj", nn.Linear)
        # attn.norm feeds proj alone unless a sigmoid gate multiplies in between (gated attention).
        gated = getattr(attn, "gate", None) is not None
        linears.append(
            LinearSite(f"{b}.attn.proj", "proj", fold_norm=None if gated else _fold_norm(model, out, f"{b}.attn.norm"))
        )
        linears += _mlp_sites(model, b)
        for n in ("norm1", "norm2"):
            ssf.append(_norm_site(model, f"{b}.{n}"))
    final = _final_norm_site(model)
    if final is not None:
        ssf.append(final)
    return Layout(family, tuple(linears), tuple(ssf), _head_path(model), tuple(blocks))


def _swinv2_layout(model: TimmModel) -> Layout:
    """Swin V2: post-norm blocks (x + norm1(attn(x)), x + norm2(mlp(x))), cosine attention with q_bias / v_bias and
    the continuous position bias MLP ``cpb_mlp`` (frozen: it maps fixed coordinates to the bias table, so it merges
    nowhere and exports as constants), PatchMerging as reduction THEN norm (no LayerNorm before the bias-free
    reduction: its RLRR shift has nowhere to go)."""
    from timm.models.swin_transformer_v2 import WindowAttention

    linears, ssf, blocks = [], [], []
    for si, stage in enumerate(model.layers):
        s = f"layers.{si}"
        if not isinstance(stage.downsample, nn.Identity):
            _need(model, f"{s}.downsample.reduction", nn.Linear)
            _need(model, f"{s}.downsample.norm", nn.LayerNorm)
            # The norm comes after the reduction in V2: nothing before it to fold a shift into (fold_norm None).
            linears.append(LinearSite(f"{s}.downsample.reduction", "reduction"))
        for bi in range(len(stage.blocks)):
            b = f"{s}.blocks.{bi}"
            blocks.append(b)
            _need(model, f"{b}.attn", WindowAttention)
            linears += _qkv_sites(model, b, col_groups=1)  # one s_col for q, k, v, as official Swin RLRR
            block_linears, block_ssf = _swin_block_sites(model, b)
            linears += block_linears
            ssf += block_ssf
    ssf.append(_layer_norm_site(model, "norm"))
    return Layout("swinv2", tuple(linears), tuple(ssf), _head_path(model), tuple(blocks))


def _head_path(model: TimmModel) -> str:
    heads = _head_paths(model)
    if len(heads) != 1:
        raise UnsupportedModelError(f"{type(model).__name__}: {len(heads)} classifiers where one was expected")
    return heads[0]


def _head_paths(model: TimmModel) -> tuple[str, ...]:
    """The classifier Linear(s): timm's get_classifier() gives one, or a tuple (DeiT distilled: head, head_dist)."""
    found = model.get_classifier()
    heads = found if isinstance(found, tuple) else (found,)
    for head in heads:
        if not isinstance(head, nn.Linear):
            raise UnsupportedModelError(
                f"{type(model).__name__}: the classifier is {type(head).__name__}",
                "create the model with num_classes >= 1 so it has a Linear head",
            )
    return tuple(_module_path(model, h) for h in heads)


def describe(model: nn.Module) -> Layout:
    """The adapter layout of a plain timm model."""
    from timm.models.beit import Beit
    from timm.models.eva import Eva
    from timm.models.naflexvit import NaFlexVit
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.swin_transformer_v2 import SwinTransformerV2
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        layout = _vit_layout(model)
    elif isinstance(model, SwinTransformer):
        layout = _swin_layout(model)
    elif isinstance(model, Eva):
        layout = _eva_beit_layout(model, "eva")
    elif isinstance(model, Beit):
        layout = _eva_beit_layout(model, "beit")
    elif isinstance(model, SwinTransformerV2):
        layout = _swinv2_layout(model)
    elif isinstance(model, NaFlexVit):
        raise UnsupportedModelError(
            "NaFlexVit takes a variable-length sequence of patches (with their coordinates and a padding mask) "
            "instead of a fixed-size image, and peftx's deployment targets are fixed-shape image engines",
            "fine-tune the fixed-resolution ViT of the same family (e.g. vit_base_patch16_siglip_224 or "
            "vit_so400m_patch16_siglip_256 for the SigLIP 2 NaFlex models)",
        )
    else:
        raise UnsupportedModelError(
            f"model class {type(model).__name__} is not supported",
            "peftx adapts timm VisionTransformer, Eva, Beit, SwinTransformer and SwinTransformerV2 models "
            "(docs/backbones.md)",
        )
    roles = {s.role for s in layout.linears}
    return Layout(
        layout.family,
        layout.linears,
        layout.ssf_sites,
        layout.head,
        layout.blocks,
        frozenset(roles),
        layout.extra_heads,
    )
