"""Model-level adapter API: adapt a plain timm model, count, merge / unmerge, and unload to a plain timm model.

The adapted model is the original module tree with some layers wrapped (:class:`~peftx.methods.base.AdapterModule`);
its ``peftx_state`` attribute records what was done, so merge and save need nothing else. Nothing here names a
method: what a method does comes from its entry in the registry (peftx/methods/registry.py).
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import ExportError, UsageError
from .layout import Layout, describe
from .methods import method_of
from .methods.base import AdapterConfig, AdapterModule, Plan, _check_finite


@dataclass
class AdapterState:
    """What peftx did to a model; attached as ``model.peftx_state``."""

    config: AdapterConfig
    layout: Layout
    base_fingerprint: str
    plain_shapes: dict[str, tuple[int, ...]]  # state-dict keys/shapes of the plain model: the unload contract
    num_classes: int
    spec: dict[str, Any] = field(default_factory=dict)  # how to rebuild the backbone (name, kwargs, weights source)
    notes: list[str] = field(default_factory=list)  # what the method left out at sites it could not merge exactly


def fingerprint(model: nn.Module, exclude_prefix: str | tuple[str, ...] | None = None) -> str:
    """sha256 over a plain model's tensors (sorted names, dtype, shape, bytes), the classifier(s) excluded."""
    h = hashlib.sha256()
    excluded = (exclude_prefix,) if isinstance(exclude_prefix, str) else tuple(exclude_prefix or ())
    skip = tuple(p + "." for p in excluded)
    for k, v in sorted(model.state_dict().items()):
        if skip and k.startswith(skip):
            continue
        t = v.detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def adapt(
    model: nn.Module,
    config: AdapterConfig,
    *,
    spec: dict[str, Any] | None = None,
    zero_head: bool = True,
    base_fingerprint: str | None = None,
) -> nn.Module:
    """Wrap ``model`` (a plain timm model) in place with the adapter described by ``config``.

    Freezes every pretrained tensor (unless the method trains the backbone); the adapter parameters and the
    classifier head are trainable. The head is zero-initialised (official RLRR) unless ``zero_head`` is False.
    ``base_fingerprint`` skips re-hashing the weights when the caller already computed :func:`fingerprint`.
    Every wrapper is built here, before training, so a site the method cannot merge is refused or left out now.
    """
    if getattr(model, "peftx_state", None) is not None:
        raise UsageError("this model already carries a peftx adapter", "start from a plain timm model")
    method = method_of(config)
    layout = describe(model)
    targets = method.resolve_targets(config, layout)
    head = model.get_submodule(layout.head)
    assert isinstance(head, nn.Linear), head  # describe() refuses a model whose classifier is not one
    state = AdapterState(
        config=config,
        layout=layout,
        base_fingerprint=base_fingerprint or fingerprint(model, layout.heads),
        plain_shapes={k: tuple(v.shape) for k, v in model.state_dict().items()},
        num_classes=head.out_features,
        spec=dict(spec or {}),
    )
    wraps: list[tuple[str, nn.Module]] = []
    for site in layout.linears:
        base = model.get_submodule(site.path)
        assert isinstance(base, nn.Linear), site.path  # describe() checked every linear site
        new = method.wrap_linear(site, base, config, targets, state.notes.append)
        if new is not None:
            wraps.append((site.path, new))
    for norm_site in layout.ssf_sites:
        new = method.wrap_norm(norm_site, model.get_submodule(norm_site.path), config, model, state.notes.append)
        if new is not None:
            wraps.append((norm_site.path, new))
    linear_paths = {s.path for s in layout.linears}
    if method.wraps_layers and not any(path in linear_paths for path, _ in wraps):
        raise UsageError(f"no layer matched targets {sorted(targets)}")
    for path, new in wraps:  # only now is the model changed: a refused site leaves it as it was
        _set_module(model, path, new)
    if zero_head:  # every classifier: DeiT distilled's head_dist too (its output is averaged with head's)
        with torch.no_grad():
            for path in layout.heads:
                classifier = model.get_submodule(path)
                assert isinstance(classifier, nn.Linear), path
                classifier.weight.zero_()
                if classifier.bias is not None:
                    classifier.bias.zero_()
    model.peftx_state = state  # type: ignore[assignment]  # torch types Module attributes as Tensor | Module
    set_trainable(model)
    return model


def state_of(model: nn.Module) -> AdapterState:
    state = getattr(model, "peftx_state", None)
    if state is None:
        raise UsageError("this model carries no peftx adapter", "call peftx.adapt(model, config) first")
    return state


def adapter_modules(model: nn.Module) -> list[tuple[str, AdapterModule]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterModule)]


def set_trainable(model: nn.Module) -> None:
    """requires_grad only on what the method trains (adapter parameters and the head, or everything)."""
    names = set(trainable_names(model))
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)


def _own_names(model: nn.Module) -> list[str]:
    return [f"{prefix}.{n}" for prefix, m in adapter_modules(model) for n, _ in m.own_parameters()]


def trainable_names(model: nn.Module) -> list[str]:
    """What the method trains, by path in the adapted model: its adapter parameters and the classifier head, or
    (a method that trains the backbone) every parameter."""
    state = state_of(model)
    if method_of(state.config).trains_backbone:
        return [n for n, _ in model.named_parameters()]
    heads = state.layout.heads
    return _own_names(model) + [f"{h}.{n}" for h in heads for n, _ in model.get_submodule(h).named_parameters()]


def split_weight_decay(model: nn.Module) -> tuple[list[str], list[str]]:
    """(decay, no_decay): the trainable tensor names of an adapted model, split by the method's weight-decay rule.

    The method decides for its own adapter tensors (``Method.no_decay``; 1-d ones never decay); tensors of the plain
    model (the head, and the backbone when the method trains it) follow ``plain_no_weight_decay``: weight matrices
    decay; biases, norms, 1-d tensors and the model's own ``no_weight_decay()`` list do not.
    """
    method = method_of(state_of(model).config)
    params = dict(model.named_parameters())
    own = set(_own_names(model))
    own_skips = getattr(model, "no_weight_decay", None)  # timm models list their own (pos_embed, cls_token...)
    skips = frozenset(own_skips()) if own_skips is not None else frozenset()
    decay: list[str] = []
    no_decay: list[str] = []
    for name in trainable_names(model):
        skip = method.no_weight_decay(name, params[name], own=name in own, model_skips=skips)
        (no_decay if skip else decay).append(name)
    return decay, no_decay


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds: what the method trains, keyed by their path in the adapted model."""
    params = dict(model.named_parameters())
    return {n: params[n].detach() for n in trainable_names(model)}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; trainable = what the method trains."""
    params = dict(model.named_parameters())
    trainable = sum(params[n].numel() for n in trainable_names(model))
    return trainable, sum(p.numel() for p in params.values())


def adapted_layers(model: nn.Module) -> list[dict[str, Any]]:
    return [
        {"name": name, "kind": type(m).__name__, "params": sum(p.numel() for _, p in m.own_parameters())}
        for name, m in adapter_modules(model)
    ]


# -- merge ------------------------------------------------------------------------------------------------------------


class _Planner:
    """Collects (destination, new value) pairs; later entries see the values earlier ones will write."""

    def __init__(self) -> None:
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def value(self, t: torch.Tensor) -> torch.Tensor:
        entry = self._pending.get(id(t))
        return t if entry is None else entry[1]

    def add(self, plan: Plan) -> None:
        for dst, val in plan:
            if val.shape != dst.shape:
                raise ExportError(f"merge planned a {tuple(val.shape)} value for a {tuple(dst.shape)} tensor")
            self._pending[id(dst)] = (dst, val)

    def write(self) -> None:
        with torch.no_grad():
            for dst, val in self._pending.values():
                dst.copy_(val)


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into the frozen weights, in place; wrappers stay (so :func:`unmerge` can undo it).

    Safe: every merged tensor is computed and checked finite before any weight is touched.
    """
    todo = [m for _, m in adapter_modules(model) if not m.merged]
    planner = _Planner()
    for m in todo:
        planner.add(m.merge_plan(model, planner.value))
    planner.write()
    for m in todo:
        m.merged = True
    return model


@torch.no_grad()
def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`: restore the base weights (to float rounding) and the adapter's separate forward.

    Safe like :func:`merge`: a layer that cannot be unmerged (a zero RLRR denominator) changes nothing.
    """
    todo = [m for _, m in adapter_modules(model) if m.merged]
    planner = _Planner()
    for m in reversed(todo):
        planner.add(m.unmerge_plan(model, planner.value))
    planner.write()
    for m in todo:
        m.merged = False
    return model


def _unloaded_keys(model: nn.Module) -> dict[str, str]:
    """Adapted state-dict key -> its key once every wrapper is replaced by its inner layer (own tensors dropped)."""
    wrappers = {name: m.inner_name for name, m in adapter_modules(model)}
    out: dict[str, str] = {}
    for key in model.state_dict(keep_vars=True):
        parts = key.split(".")
        for i in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in wrappers:
                if parts[i] == wrappers[prefix]:
                    out[key] = ".".join(parts[:i] + parts[i + 1 :])
                break
        else:
            out[key] = key
    return out


@torch.no_grad()
def merge_and_unload(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """A plain timm model of the original class with every adapter folded in; no peftx module or attribute left.

    Its state dict has exactly the keys and shapes of the model before :func:`adapt`. By default works on a copy, so
    the adapted model stays usable (e.g. as the parity reference). Everything (merged tensors, folds, the resulting
    keys and shapes, finiteness) is computed and checked before anything is written: with ``inplace=True`` a refused
    unload leaves the model adapted and unchanged.
    """
    state = state_of(model)
    out = model if inplace else copy.deepcopy(model)
    modules = adapter_modules(out)
    planner = _Planner()
    for _, m in modules:
        if not m.merged:
            planner.add(m.merge_plan(out, planner.value))
    for _, m in reversed(modules):
        planner.add(m.unload_plan(out, planner.value))
    tensors = out.state_dict(keep_vars=True)
    final = {new: planner.value(tensors[old]) for old, new in _unloaded_keys(out).items()}
    shapes = {k: tuple(v.shape) for k, v in final.items()}
    if shapes != state.plain_shapes:
        diff = sorted(set(shapes.items()) ^ set(state.plain_shapes.items()))[:5]
        raise ExportError(f"merged model does not match the plain model's state dict: {diff}")
    for k, v in final.items():
        if v.is_floating_point():
            _check_finite(k, v)
    # -- nothing was written above; from here on nothing can fail ---------------------------------------------------
    planner.write()
    for name, m in reversed(modules):
        _set_module(out, name, m.inner)
    del out.peftx_state
    for p in out.parameters():
        p.requires_grad_(True)
    return out


__all__ = [
    "AdapterState",
    "adapt",
    "adapted_layers",
    "adapter_modules",
    "adapter_state_dict",
    "count_parameters",
    "fingerprint",
    "merge",
    "merge_and_unload",
    "set_trainable",
    "split_weight_decay",
    "state_of",
    "trainable_names",
    "unmerge",
]
