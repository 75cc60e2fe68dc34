"""The method registry: each adapter method is a :class:`Method` subclass in its own module, found here by name.

A method's module (``peftx/methods/<name>.py``) is the one place that says, for that method:

* its hyper-parameters: a config dataclass (defaults, validation in ``__post_init__``);
* how it wraps a site of the model's layout (:meth:`Method.wrap_linear`, :meth:`Method.wrap_norm`), and so what it
  cannot merge exactly: a part that would not fold into the plain timm model is not created, and the hook says so
  through ``note`` (or it raises a typed error before training);
* which of its own tensors skip weight decay (:attr:`Method.no_decay`);
* what its options are called on the command line (:attr:`Method.cli_options`).

The core (adapter.py, adapter_io.py, summary.py), the trainer's optimiser groups and the CLI loop over this registry
and never name a method. Built-in methods are the lines of :data:`BUILTIN` (a new built-in method adds its module and
one line there); they are imported on first use, because listing the names (the CLI's ``--help``) must not pay for
importing torch. Another package adds a method with ``register(MyMethod)``.

This module imports no torch: the hooks' argument types are only annotations.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from ..errors import UsageError

if TYPE_CHECKING:  # pragma: no cover - annotations only
    import torch
    from torch import nn

    from ..layout import Layout, LinearSite, SSFSite
    from .base import AdapterConfig

# name -> "module:Class": the registration line of each built-in method.
BUILTIN: dict[str, str] = {
    "rlrr": "peftx.methods.rlrr:RLRR",
    "aoft": "peftx.methods.aoft:AOFT",
    "lora": "peftx.methods.lora:LoRA",
    "linear": "peftx.methods.linear:Linear",
    "full": "peftx.methods.full:Full",
}

Note = Callable[[str], None]
# The method's config class: a subclass ``Method[MyConfig]`` receives its own config in the hooks.
ConfigT = TypeVar("ConfigT", bound="AdapterConfig")


class Method(Generic[ConfigT]):
    """How one PEFT method adapts a timm model. Subclass it in the method's module and set the class attributes;
    override the hooks the method needs (the defaults wrap nothing)."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[AdapterConfig]]
    description: ClassVar[str] = ""
    # Command-line option (without "--") -> config field. The CLI's shared options (--rank, --alpha, --init,
    # --targets) and `--method-option KEY=VALUE` go through this map; an option the method lacks is a UsageError.
    cli_options: ClassVar[Mapping[str, str]] = {}
    # Leaf names of the method's OWN tensors that skip weight decay (per-channel scales and shifts, generator
    # vectors: decaying them pulls them toward 0, away from their meaning). Its other own tensors decay unless 1-d.
    no_decay: ClassVar[frozenset[str]] = frozenset()
    # True: every tensor of the backbone trains too (full fine-tuning); False: adapter tensors and the head only.
    trains_backbone: ClassVar[bool] = False
    # True: adapt() refuses a model on which the method wraps no layer (it would silently train the head only).
    wraps_layers: ClassVar[bool] = True
    # Multiplies the training recipe's learning rate when the run does not set one (--lr): the recipes (the RLRR
    # paper's VTAB-1k table, the demo) are tuned for adapters.
    recipe_lr_scale: ClassVar[float] = 1.0

    # -- hooks ------------------------------------------------------------------------------------------------------
    def resolve_targets(self, config: ConfigT, layout: Layout) -> set[str]:
        """The layer roles the method adapts on this model (checked against the layout)."""
        return set()

    def wrap_linear(
        self, site: LinearSite, base: nn.Linear, config: ConfigT, targets: set[str], note: Note
    ) -> nn.Module | None:
        """The wrapper for the Linear at ``site`` (None: leave it alone). ``note(text)`` records what is left out."""
        return None

    def wrap_norm(
        self, site: SSFSite, base: nn.Module, config: ConfigT, model: nn.Module, note: Note
    ) -> nn.Module | None:
        """The wrapper for a LayerNorm output / the patch tokens at ``site`` (None: leave it alone)."""
        return None

    def no_weight_decay(self, name: str, param: torch.Tensor, *, own: bool, model_skips: Collection[str]) -> bool:
        """Whether the trainable tensor ``name`` skips weight decay.

        ``own``: it is one of this method's adapter tensors; otherwise it is a tensor of the plain model (the head,
        or any backbone tensor when :attr:`trains_backbone`), for which :func:`plain_no_weight_decay` decides.
        """
        if own:
            return name.rsplit(".", 1)[-1] in self.no_decay or param.ndim <= 1
        return plain_no_weight_decay(name, param.ndim, model_skips)


def plain_no_weight_decay(name: str, ndim: int, model_skips: Collection[str] = ()) -> bool:
    """The rule for a plain timm model's tensors: timm's optimiser factory (1-d tensors and the model's own
    ``no_weight_decay()`` list: position embeddings, cls / register tokens) plus the recipe's rule (names
    containing ``bias`` or ``norm``: Swin's relative-position bias tables are 2-d). Every weight matrix decays."""
    return ndim <= 1 or "bias" in name or "norm" in name or name in model_skips


# -- the registry -------------------------------------------------------------------------------------------------

_REGISTERED: dict[str, type[Method]] = {}
_INSTANCES: dict[str, Method] = {}


def register(method: type[Method]) -> type[Method]:
    """Add ``method`` to the registry (usable as a class decorator). Its name must be new."""
    if not (isinstance(method, type) and issubclass(method, Method)):
        raise TypeError(f"register() takes a Method subclass, got {method!r}")
    name = method.name
    if not name or not name.isidentifier() or name != name.lower():
        raise ValueError(f"method name {name!r} must be a lower-case identifier")
    if getattr(method.config_class, "method", None) != name:
        raise ValueError(f"{method.__name__}: config_class.method is {method.config_class.method!r}, not {name!r}")
    known = _REGISTERED.get(name)
    if known is not None and known is not method:
        raise ValueError(f"a method named {name!r} is already registered ({known.__module__}.{known.__qualname__})")
    _REGISTERED[name] = method
    return method


def method_names() -> tuple[str, ...]:
    """Every method's name: the built-ins first, in :data:`BUILTIN` order, then registered ones. Imports nothing."""
    return tuple(BUILTIN) + tuple(n for n in _REGISTERED if n not in BUILTIN)


def get_method(name: str) -> Method:
    """The registered method called ``name`` (a UsageError listing the names if there is none)."""
    if not isinstance(name, str) or (name not in _REGISTERED and name not in BUILTIN):
        raise UsageError(f"unknown method {name!r}", f"choose from {', '.join(method_names())}")
    if name in _INSTANCES:
        return _INSTANCES[name]
    if name not in _REGISTERED:
        module, _, cls = BUILTIN[name].partition(":")
        register(getattr(importlib.import_module(module), cls))
    _INSTANCES[name] = _REGISTERED[name]()
    return _INSTANCES[name]


def config_class(method: str) -> type[AdapterConfig]:
    return get_method(method).config_class


def make_config(method: str, **kwargs: Any) -> AdapterConfig:
    return config_class(method)(**kwargs)


def config_from_dict(d: Mapping[str, Any]) -> AdapterConfig:
    d = dict(d)
    return config_class(d.pop("method", None)).from_dict(d)


def method_of(config: AdapterConfig) -> Method:
    return get_method(config.method)


# -- command-line options -------------------------------------------------------------------------------------------


def _key(text: str) -> str:
    return text.strip().lstrip("-").replace("-", "_")


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _parse(method: str, field: dataclasses.Field, text: str) -> Any:
    """A command-line string as the config field's type (annotations are strings under postponed evaluation)."""
    kind = str(field.type).replace(" ", "")
    try:
        if kind.startswith("tuple") or kind.startswith("list"):
            return [t.strip() for t in text.split(",") if t.strip()]
        if kind.startswith("bool"):
            low = text.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError(text)
            return low in ("true", "1", "yes", "on")
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
    except ValueError:
        base = kind.split("|")[0]
        what = {"bool": "true or false", "int": "an integer", "float": "a number"}.get(base, base)
        example = {"bool": "false", "int": "8", "float": "0.01"}.get(base, "VALUE")
        raise UsageError(
            f"{method} option {field.name}: {text!r} is not {what}", f"e.g. --method-option {field.name}={example}"
        ) from None
    return text


def option_help(method: str) -> str:
    """The method's options as the CLI spells them, e.g. '--rank, --alpha, --targets'."""
    m = get_method(method)
    named = [f"--{o}" for o in m.cli_options]
    return ", ".join(named) if named else "none"


def options_from_cli(method: str, given: Mapping[str, Any], extra: Sequence[str] = ()) -> dict[str, Any]:
    """The method config's fields from command-line options.

    ``given``: the shared named options ({"rank": 4, "init": None, ...}; None = not passed), mapped through the
    method's :attr:`Method.cli_options`. ``extra``: ``KEY=VALUE`` strings (``--method-option``), KEY being one of the
    method's option names or a field of its config. An option the method does not have is a one-line UsageError
    naming the options it does have.
    """
    m = get_method(method)
    fields = _fields(m.config_class)
    options = {_key(o): f for o, f in m.cli_options.items()}
    hint = f"{method} takes {option_help(method)}" + (
        f"; any of its fields ({', '.join(fields)}) also as --method-option KEY=VALUE" if fields else ""
    )
    out: dict[str, Any] = {}
    for option, value in given.items():
        if value is None:
            continue
        field = options.get(_key(option))
        if field is None:
            raise UsageError(f"--{option.replace('_', '-')} is not an option of method {method}", hint)
        out[field] = _parse(method, fields[field], value) if isinstance(value, str) else value
    for item in extra:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--method-option {item!r} is not KEY=VALUE", hint)
        field = options.get(_key(key), _key(key))
        if field not in fields:
            raise UsageError(f"--method-option {key.strip()}: method {method} has no such option", hint)
        out[field] = _parse(method, fields[field], text)
    return out
