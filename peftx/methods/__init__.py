"""Adapter methods: one module per method, found by name through the registry (registry.py).

The registry's functions are imported eagerly (they need no torch, so the CLI starts fast); the classes of the
method modules load on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .registry import (
    BUILTIN,
    Method,
    config_class,
    config_from_dict,
    get_method,
    make_config,
    method_names,
    method_of,
    options_from_cli,
    plain_no_weight_decay,
    register,
)

# name -> submodule, for the classes re-exported here (loaded on first access: they import torch).
_LAZY = {
    "AdapterConfig": "base",
    "TargetedConfig": "base",
    "AdapterModule": "base",
    "AdapterLinear": "base",
    "LowRankLinear": "base",
    "TargetedMethod": "base",
    "SSF": "ssf",
    "RLRRConfig": "rlrr",
    "RLRRLinear": "rlrr",
    "AOFTConfig": "aoft",
    "AOFTLinear": "aoft",
    "LoRAConfig": "lora",
    "LoRALinear": "lora",
    "LinearConfig": "linear",
    "FullConfig": "full",
}

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    # re-exported (named in __all__ through _LAZY, which ruff cannot read): unused here on purpose
    from .aoft import AOFTConfig, AOFTLinear  # noqa: F401
    from .base import (  # noqa: F401
        AdapterConfig,
        AdapterLinear,
        AdapterModule,
        LowRankLinear,
        TargetedConfig,
        TargetedMethod,
    )
    from .full import FullConfig  # noqa: F401
    from .linear import LinearConfig  # noqa: F401
    from .lora import LoRAConfig, LoRALinear  # noqa: F401
    from .rlrr import RLRRConfig, RLRRLinear  # noqa: F401
    from .ssf import SSF  # noqa: F401

    METHOD_NAMES: tuple[str, ...]


def __getattr__(name: str) -> Any:
    if name == "METHOD_NAMES":  # kept for callers of the old constant: now every registered method
        return method_names()
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BUILTIN",
    "Method",
    "config_class",
    "config_from_dict",
    "get_method",
    "make_config",
    "method_names",
    "method_of",
    "options_from_cli",
    "plain_no_weight_decay",
    "register",
    "METHOD_NAMES",
    *_LAZY,
]
