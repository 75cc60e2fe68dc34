"""Model-level adapter API: adapt a plain timm model, count, merge / unmerge, and unload to a plain timm model.

The adapted model is the original module tree with some layers wrapped (``AdapterLinear``, ``SSF``); its
``peftx_state`` attribute records what was done, so merge and save need nothing else.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import ExportError, UsageError
from .methods import AdapterConfig, AdapterLinear, AOFTLinear, LoRALinear, RLRRLinear, SSF
from .methods.base import QKV_SLICES, _check_finite
from .targets import Layout, LinearSite, describe
from .tolerances import LSTSQ_FOLD_REL


@dataclass
class AdapterState:
    """What peftx did to a model; attached as ``model.peftx_state``."""

    config: AdapterConfig
    layout: Layout
    base_fingerprint: str
    plain_shapes: dict[str, tuple[int, ...]]  # state-dict keys/shapes of the plain model: the unload contract
    num_classes: int
    spec: dict[str, Any] = field(default_factory=dict)  # how to rebuild the backbone (name, kwargs, weights source)


def fingerprint(model: nn.Module, exclude_prefix: str | None = None) -> str:
    """sha256 over a plain model's tensors (sorted names, dtype, shape, bytes), the classifier excluded."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        if exclude_prefix and k.startswith(exclude_prefix + "."):
            continue
        t = v.detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _resolve_targets(config: AdapterConfig, layout: Layout) -> set[str]:
    if config.targets is None:
        return set(config.default_targets)
    wanted = set(config.targets)
    roles = {("qkv" if t in QKV_SLICES else t) for t in wanted}
    missing = sorted(roles - layout.roles)
    if missing:
        raise UsageError(f"target(s) {missing} match no layer of this {layout.family} model",
                         f"this model has: {', '.join(sorted(layout.roles | set(QKV_SLICES)))}")
    return wanted


def _wrap_linear(site: LinearSite, base: nn.Linear, config: AdapterConfig, targets: set[str]) -> nn.Module | None:
    if config.method == "rlrr":
        if site.role not in targets:
            return None
        return RLRRLinear(base, site.path, col_groups=site.col_groups, init=config.init)
    if site.role == "qkv" and "qkv" not in targets:
        slices = tuple(i for i, n in enumerate(QKV_SLICES) if n in targets)
        groups = 3
    elif site.role in targets:
        slices, groups = (0,), 1
    else:
        return None
    if not slices:
        return None
    if config.method == "lora":
        return LoRALinear(base, site.path, groups, slices, r=config.r, alpha=config.alpha)
    if config.method == "aoft":
        return AOFTLinear(base, site.path, groups, slices, rank=config.rank, scale=config.scale)
    raise UsageError(f"unknown method {config.method!r}")


def adapt(model: nn.Module, config: AdapterConfig, *, spec: dict[str, Any] | None = None,
          zero_head: bool = True, base_fingerprint: str | None = None) -> nn.Module:
    """Wrap ``model`` (a plain timm model) in place with the adapter described by ``config``.

    Freezes every pretrained tensor; the adapter parameters and the classifier head are trainable. The head is
    zero-initialised (official RLRR) unless ``zero_head`` is False. ``base_fingerprint`` skips re-hashing the
    weights when the caller already computed :func:`fingerprint`.
    """
    if getattr(model, "peftx_state", None) is not None:
        raise UsageError("this model already carries a peftx adapter", "start from a plain timm model")
    layout = describe(model)
    targets = _resolve_targets(config, layout)
    head = model.get_submodule(layout.head)
    state = AdapterState(
        config=config, layout=layout, base_fingerprint=base_fingerprint or fingerprint(model, layout.head),
        plain_shapes={k: tuple(v.shape) for k, v in model.state_dict().items()},
        num_classes=head.out_features, spec=dict(spec or {}))
    wrapped = 0
    for site in layout.linears:
        new = _wrap_linear(site, model.get_submodule(site.path), config, targets)
        if new is not None:
            _set_module(model, site.path, new)
            wrapped += 1
    if config.method == "rlrr" and config.ssf:
        for site in layout.ssf_sites:
            _set_module(model, site.path, SSF(model.get_submodule(site.path), site.dim, site.path,
                                              init_std=config.ssf_init_std))
    if not wrapped:
        raise UsageError(f"no layer matched targets {sorted(targets)}")
    if zero_head:
        with torch.no_grad():
            head.weight.zero_()
            if head.bias is not None:
                head.bias.zero_()
    model.peftx_state = state
    set_trainable(model)
    return model


def state_of(model: nn.Module) -> AdapterState:
    state = getattr(model, "peftx_state", None)
    if state is None:
        raise UsageError("this model carries no peftx adapter", "call peftx.adapt(model, config) first")
    return state


def adapter_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (AdapterLinear, SSF))]


def set_trainable(model: nn.Module) -> None:
    """requires_grad only on adapter parameters and the classifier head."""
    names = set(trainable_names(model))
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)


def _own_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """An adapter wrapper's own parameters (not those of the frozen layer it wraps)."""
    return [(n, p) for n, p in module.named_parameters() if not n.startswith(("base_layer.", "base."))]


def trainable_names(model: nn.Module) -> list[str]:
    """Adapter parameters and the classifier head, by their path in the adapted model."""
    names = [f"{prefix}.{n}" for prefix, m in adapter_modules(model) for n, _ in _own_parameters(m)]
    head = state_of(model).layout.head
    return names + [f"{head}.{n}" for n, _ in model.get_submodule(head).named_parameters()]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds: adapter parameters + head, keyed by their path in the adapted model."""
    params = dict(model.named_parameters())
    return {n: params[n].detach() for n in trainable_names(model)}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; trainable = adapter + head."""
    params = dict(model.named_parameters())
    trainable = sum(params[n].numel() for n in trainable_names(model))
    return trainable, sum(p.numel() for p in params.values())


def adapted_layers(model: nn.Module) -> list[dict[str, Any]]:
    rows = []
    for name, m in adapter_modules(model):
        rows.append({"name": name, "kind": type(m).__name__,
                     "params": sum(p.numel() for _, p in _own_parameters(m))})
    return rows


# -- merge ------------------------------------------------------------------------------------------------------------

def _plan_merge(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(destination, new value) for every tensor the merge changes, all computed (and checked finite) first."""
    layout = state_of(model).layout
    conv_of = {s.path: s.fold_conv for s in layout.ssf_sites}
    plan: list[tuple[torch.Tensor, torch.Tensor]] = []
    for name, m in adapter_modules(model):
        if m.merged:
            continue
        if isinstance(m, AdapterLinear):
            wm, bm = m.merged_tensors()
            plan.append((m.base_layer.weight, wm))
            if bm is not None:
                plan.append((m.base_layer.bias, bm))
        elif isinstance(m.base, nn.LayerNorm):
            w, b = m.folded_affine(m.base.weight, m.base.bias)
            plan += [(m.base.weight, w), (m.base.bias, b)]
        else:  # Identity in patch_embed.norm: fold into the patch conv (per output channel)
            conv = model.get_submodule(conv_of[name])
            if conv.bias is None:
                raise ExportError(f"{conv_of[name]} has no bias to fold the SSF shift into")
            w, b = m.folded_affine(conv.weight, conv.bias)
            plan += [(conv.weight, w), (conv.bias, b)]
    return plan


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into the frozen weights, in place; wrappers stay (so :func:`unmerge` can undo it).

    Safe: every merged tensor is computed and checked finite before any weight is touched.
    """
    plan = _plan_merge(model)
    for dst, val in plan:
        dst.copy_(val)
    for _, m in adapter_modules(model):
        m.merged = True
    return model


@torch.no_grad()
def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`: restore the base weights (to float rounding) and the adapter's separate forward."""
    layout = state_of(model).layout
    conv_of = {s.path: s.fold_conv for s in layout.ssf_sites}
    for name, m in adapter_modules(model):
        if not m.merged:
            continue
        if isinstance(m, AdapterLinear):
            m.unmerge()
            continue
        target = m.base if isinstance(m.base, nn.LayerNorm) else model.get_submodule(conv_of[name])
        w, b = m.unfolded_affine(target.weight, target.bias)
        target.weight.copy_(w)
        target.bias.copy_(b)
        m.merged = False
    return model


def _fold_shift_into_norm(norm: nn.LayerNorm, weight: torch.Tensor, shift: torch.Tensor, where: str) -> torch.Tensor:
    """New LayerNorm bias β' with W β' = W β + shift: moves a bias of a bias-free Linear in front of it.

    Exact when W [out, in] has full row rank (out <= in; Swin's reduction is 2C x 4C). Solved in float64 with the
    min-norm least-squares solution; refused if the residual is above FP32 rounding. Solved on the CPU whatever the
    model's device: CUDA's lstsq has only the 'gels' driver, which needs a tall full-rank matrix (this one is wide).
    """
    w = weight.detach().to("cpu", torch.float64)
    s = shift.detach().to("cpu", torch.float64)
    delta = torch.linalg.lstsq(w, s.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    resid = (w @ delta - s).norm().item()
    if resid > LSTSQ_FOLD_REL * max(s.norm().item(), 1e-30):
        raise ExportError(f"{where}: the shift cannot be folded into the preceding LayerNorm (residual {resid:.2e})")
    return (norm.bias.double() + delta.to(norm.bias.device)).to(norm.bias.dtype)


@torch.no_grad()
def merge_and_unload(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """A plain timm model of the original class with every adapter folded in; no peftx module or attribute left.

    Its state dict has exactly the keys and shapes of the model before :func:`adapt`. By default works on a copy, so
    the adapted model stays usable (e.g. as the parity reference).
    """
    state = state_of(model)
    out = model if inplace else copy.deepcopy(model)
    merge(out)
    folds = {s.path: s.fold_norm for s in state.layout.linears if s.fold_norm}
    for name, m in reversed(adapter_modules(out)):
        if isinstance(m, AdapterLinear):
            db = m.bias_delta()
            if m.base_layer.bias is None and db is not None:
                norm = out.get_submodule(folds[name])
                norm.bias.copy_(_fold_shift_into_norm(norm, m.base_layer.weight, db, name))
            _set_module(out, name, m.base_layer)
        else:
            _set_module(out, name, m.base)
    del out.peftx_state
    for p in out.parameters():
        p.requires_grad_(True)
    shapes = {k: tuple(v.shape) for k, v in out.state_dict().items()}
    if shapes != state.plain_shapes:
        diff = sorted(set(shapes.items()) ^ set(state.plain_shapes.items()))[:5]
        raise ExportError(f"merged model does not match the plain model's state dict: {diff}")
    for k, v in out.state_dict().items():
        _check_finite(k, v)
    return out
