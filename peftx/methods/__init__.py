"""Adapter methods: one module per method, registered here by name."""

from __future__ import annotations

from ..errors import UsageError
from .aoft import AOFTConfig, AOFTLinear
from .base import AdapterConfig, AdapterLinear, LowRankLinear
from .lora import LoRAConfig, LoRALinear
from .rlrr import RLRRConfig, RLRRLinear
from .ssf import SSF

CONFIGS: dict[str, type[AdapterConfig]] = {c.method: c for c in (RLRRConfig, AOFTConfig, LoRAConfig)}
METHOD_NAMES = tuple(CONFIGS)


def config_class(method: str) -> type[AdapterConfig]:
    try:
        return CONFIGS[method]
    except KeyError:
        raise UsageError(f"unknown method {method!r}", f"choose from {', '.join(METHOD_NAMES)}") from None


def make_config(method: str, **kwargs) -> AdapterConfig:
    return config_class(method)(**kwargs)


def config_from_dict(d: dict) -> AdapterConfig:
    d = dict(d)
    return config_class(d.pop("method", None)).from_dict(d)


__all__ = ["AdapterConfig", "AdapterLinear", "LowRankLinear", "SSF", "RLRRConfig", "RLRRLinear", "AOFTConfig",
           "AOFTLinear", "LoRAConfig", "LoRALinear", "CONFIGS", "METHOD_NAMES", "config_class", "make_config",
           "config_from_dict"]
