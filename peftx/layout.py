"""Adapter layout discovery: where adapters can go, found from the model's structure (no hard-coded layer counts).

Supported: timm ``VisionTransformer`` (ViT, DeiT, DINOv2 with LayerScale and register tokens) and ``SwinTransformer``
(v1). Anything else, or a block whose layers are not the expected ``nn.Linear`` / ``nn.LayerNorm``, is an
:class:`UnsupportedModelError` naming the module.
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
    family: str  # "vit" | "swin"
    linears: tuple[LinearSite, ...]
    ssf_sites: tuple[SSFSite, ...]
    head: str  # path of the classifier nn.Linear
    blocks: tuple[str, ...]  # transformer blocks (residual dropout lives on their drop_path1/2)
    roles: frozenset[str] = field(default_factory=frozenset)


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
    if hasattr(model, "head_dist"):
        raise UnsupportedModelError(
            f"{type(model).__name__} has a distillation head",
            "use the non-distilled DeiT (e.g. deit_small_patch16_224)",
        )
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
        linears.append(LinearSite(f"{b}.attn.qkv", "qkv", col_groups=3))
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
        for n in ("norm1", "norm2"):
            ssf.append(SSFSite(f"{b}.{n}", _need(model, f"{b}.{n}", nn.LayerNorm).normalized_shape[0]))
    # The final norm: `norm` for token pooling, `fc_norm` after global pooling (timm makes the other an Identity);
    # neither with final_norm=False.
    for final in ("norm", "fc_norm"):
        if isinstance(getattr(model, final, None), nn.LayerNorm):
            ssf.append(SSFSite(final, getattr(model, final).normalized_shape[0]))
            break
    return Layout("vit", tuple(linears), tuple(ssf), _head_path(model), tuple(blocks))


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
            linears.append(LinearSite(f"{b}.attn.qkv", "qkv", col_groups=1))
            _need(model, f"{b}.attn.qkv", nn.Linear)
            for sub, role in (("attn.proj", "proj"), ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2")):
                _need(model, f"{b}.{sub}", nn.Linear)
                linears.append(LinearSite(f"{b}.{sub}", role))
            for n in ("norm1", "norm2"):
                ssf.append(SSFSite(f"{b}.{n}", _need(model, f"{b}.{n}", nn.LayerNorm).normalized_shape[0]))
    ssf.append(SSFSite("norm", _need(model, "norm", nn.LayerNorm).normalized_shape[0]))
    return Layout("swin", tuple(linears), tuple(ssf), _head_path(model), tuple(blocks))


def _head_path(model: TimmModel) -> str:
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise UnsupportedModelError(
            f"{type(model).__name__}: the classifier is {type(head).__name__}",
            "create the model with num_classes >= 1 so it has a Linear head",
        )
    return _module_path(model, head)


def describe(model: nn.Module) -> Layout:
    """The adapter layout of a plain timm model."""
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        layout = _vit_layout(model)
    elif isinstance(model, SwinTransformer):
        layout = _swin_layout(model)
    else:
        raise UnsupportedModelError(f"model class {type(model).__name__} is not supported")
    return Layout(
        layout.family,
        layout.linears,
        layout.ssf_sites,
        layout.head,
        layout.blocks,
        frozenset(s.role for s in layout.linears),
    )
