"""Hugging Face peft adapters for timm models: read, check, rebuild the UNMERGED model through peft, merge.

A peft adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (tensors keyed
``base_model.model.<module path>.<name>``), as ``PeftModel.save_pretrained`` writes them. peft is imported lazily:
only this path needs it.

The reference for every parity check is the adapter running inside peft itself (``PeftModel`` on the timm model,
loaded with peft's ``set_peft_model_state_dict``); the merged model is peft's ``merge_and_unload`` on a copy, then
checked to be the plain timm class with exactly the plain state-dict keys and shapes.

peft records no fingerprint of the base weights, so what can be checked is checked before any tensor is loaded:

- the peft type and every option: what folds exactly into plain ``nn.Linear`` / ``nn.Conv2d`` weights is accepted
  (LoRA with rsLoRA, DoRA, rank/alpha patterns, trained biases, ``modules_to_save``; IA3; LoHa; LoKr), anything else is
  refused naming the option and the reason;
- the base model peft recorded (``base_model_name_or_path``, ``auto_mapping``'s class) against the model named here;
- every targeted module is a Linear / Conv2d of this model, and every tensor in the file has exactly the shape this
  model's layer needs: nothing missing, nothing left over (a LoRA for a 384-wide ViT does not fit a 192-wide one);
- the class count comes from the adapter's saved head (``modules_to_save``), else from the weights' own head;
- ``peftx_source.json``, which ``peftx convert --to peft`` writes beside the adapter, adds peftx's base-weight
  fingerprint, checked as for peftx's own adapters (peft ignores the file).
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._util import first_line
from .adapter_io import ADAPTER_FILE
from .checks import all_finite, is_pickle_file
from .errors import (
    AdapterFileError,
    AdapterMismatchError,
    BackendUnavailableError,
    ExportError,
    NonFiniteError,
    UnsupportedModelError,
    UsageError,
)

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PICKLE_FILE = "adapter_model.bin"
SOURCE_FILE = "peftx_source.json"
SOURCE_FORMAT, SOURCE_FORMAT_VERSION = "peftx-peft-source", 1
KEY_PREFIX = "base_model.model."  # where peft's saved keys put the wrapped model's own module paths
METHOD = "peft"  # the "method" a bundle made from a peft adapter records in its provenance

SUPPORTED_TYPES = ("LORA", "IA3", "LOHA", "LOKR")
_MERGEABLE_LAYERS = (nn.Linear, nn.Conv2d)
_INSTALL_HINT = "install the extra: pip install 'peftx[peft]' (or pip install peft)"

# Options every peft config has that do not change what a merge computes.
_COMMON_OPTIONS = frozenset(
    {
        "peft_type",
        "auto_mapping",
        "base_model_name_or_path",
        "revision",
        "task_type",
        "inference_mode",
        "peft_version",
        "target_modules",
        "exclude_modules",
        "modules_to_save",
        "layers_to_transform",
        "layers_pattern",
    }
)
# LoHa's options, which LoKr shares (both are peft's LyCORIS adapters).
_LYCORIS_OPTIONS = frozenset(
    {
        "r",
        "alpha",
        "rank_dropout",
        "module_dropout",
        "use_effective_conv2d",
        "init_weights",
        "rank_pattern",
        "alpha_pattern",
    }
)
# Per type: options that may take any value, because merge_and_unload folds them exactly (or they act only while
# training: dropout, init settings, which the saved tensors overwrite). Every OTHER option must keep its off value.
_FREE_OPTIONS = {
    "LORA": frozenset(
        {
            "r",
            "lora_alpha",
            "lora_dropout",
            "fan_in_fan_out",
            "bias",
            "use_rslora",
            "init_lora_weights",
            "rank_pattern",
            "alpha_pattern",
            "use_dora",
            "lora_bias",
            "megatron_core",
            "qalora_group_size",
            "eva_config",
            "loftq_config",
            "corda_config",
            "lora_ga_config",
            "runtime_config",
        }
    ),
    "IA3": frozenset({"feedforward_modules", "fan_in_fan_out", "init_ia3_weights"}),
    "LOHA": _LYCORIS_OPTIONS,
    "LOKR": _LYCORIS_OPTIONS | {"decompose_both", "decompose_factor", "rank_dropout_scale"},
}
_REFUSED_OPTIONS = {
    "layer_replication": "it duplicates layers, so the merged model is not the timm architecture",
    "target_parameters": "it adapts raw nn.Parameters (mixture-of-experts weights), not layers",
    "trainable_token_indices": "it trains token embeddings, which a timm image model does not have",
    "use_qalora": "QA-LoRA adapts a quantised base model",
    "megatron_config": "it targets Megatron-LM parallel layers",
    "alora_invocation_tokens": "activated LoRA switches on after invocation tokens, so it depends on the input",
    "arrow_config": "Arrow routes each input between several LoRA experts",
    "kasa_config": "KaSA truncates the base weights' singular values, so the adapter does not fit the original weights",
    "use_bdlora": "a LoRA variant peftx has not checked",
    "velora_config": "a LoRA variant peftx has not checked",
    "monteclora_config": "a LoRA variant peftx has not checked",
    "ensure_weight_tying": "it ties embedding weights, which a timm image model does not have",
}
# LoRA inits that write a residual into the BASE weights while creating the adapter: the saved adapter only fits that
# residual model, not the weights a user has (peft converts them to a plain LoRA on save when asked to).
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
_PLAIN_INITS = ("gaussian", "eva", "orthogonal")
_TYPE_REASONS = {
    **dict.fromkeys(
        ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING", "CPT", "CARTRIDGE"),
        "it adds learned tokens to the input sequence, which a plain timm model has no place for",
    ),
    "ADAPTION_PROMPT": "it adds gated prompt-attention layers that do not exist in the timm model",
    **dict.fromkeys(("XLORA", "POLY"), "it mixes several adapters with weights computed from each input"),
    "TRAINABLE_TOKENS": "it trains token embeddings, which a timm image model does not have",
}
# peft warnings that say nothing wrong about an adapter loaded for inference, dropped so that the CLI's output stays
# its own: fan_in_fan_out is reset for nn.Linear the same way during training and loading; lora_bias tensors are 1-D
# by design, which peft's ZeRO-3 sharding heuristic mistakes for unsaved shards.
_HARMLESS_WARNINGS = (
    "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`",
    "have invalid shape: ",
)


def import_peft():
    """The peft module, or a one-line BackendUnavailableError when it is not installed."""
    try:
        import peft
    except ModuleNotFoundError as exc:
        if exc.name not in (None, "peft"):  # peft is there but one of its own dependencies is not
            raise BackendUnavailableError(f"Hugging Face peft cannot be imported: {exc}", _INSTALL_HINT) from None
        raise BackendUnavailableError("Hugging Face peft is not installed", _INSTALL_HINT) from None
    except ImportError as exc:  # a broken install (version mismatch with transformers, ...)
        raise BackendUnavailableError(
            first_line(f"Hugging Face peft cannot be imported: {exc}"), _INSTALL_HINT
        ) from None
    return peft


# ---------------------------------------------------------------------------------------------------- the directory


def adapter_dir(source: str | Path) -> Path:
    """The directory of a peft adapter given as that directory or as its adapter_model.safetensors file."""
    path = Path(source)
    return path.parent if path.is_file() else path


def is_peft_dir(source: str | Path) -> bool:
    """True when ``source`` is (a file of) a peft adapter directory rather than a peftx run. Reads JSON only."""
    path = Path(source)
    if path.is_file():
        return path.name in (PEFT_WEIGHTS_FILE, PEFT_PICKLE_FILE)
    if not path.is_dir() or (path / ADAPTER_FILE).exists():
        return False
    if (path / PEFT_WEIGHTS_FILE).exists() or (path / PEFT_PICKLE_FILE).exists():
        return True
    try:  # a peftx run writes an adapter_config.json too; peft's names its peft_type
        return "peft_type" in json.loads((path / PEFT_CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


@dataclass
class PeftDir:
    """A peft adapter directory, read and checked for format (not yet against a model)."""

    path: Path
    config: dict[str, Any]  # adapter_config.json as written
    tensors: dict[str, torch.Tensor]  # adapter_model.safetensors, peft's saved keys
    source: dict[str, Any] | None  # peftx_source.json, for adapters written by `peftx convert --to peft`

    @property
    def weights_file(self) -> Path:
        return self.path / PEFT_WEIGHTS_FILE

    @property
    def peft_type(self) -> str:
        return str(self.config["peft_type"]).upper()


def read_peft_dir(source: str | Path) -> PeftDir:
    """Read a peft adapter directory: its JSON config, its safetensors tensors (never a pickle), peftx's sidecar."""
    path = adapter_dir(source)
    config = _read_json(
        path / PEFT_CONFIG_FILE,
        f"{path} has no {PEFT_CONFIG_FILE}",
        "a peft adapter directory holds adapter_config.json and adapter_model.safetensors, "
        "as PeftModel.save_pretrained writes them",
    )
    if "peft_type" not in config:
        raise AdapterFileError(
            f"{path / PEFT_CONFIG_FILE} names no peft_type",
            "it is not a peft adapter config: re-save the adapter with peft's save_pretrained",
        )
    weights = path / PEFT_WEIGHTS_FILE
    if not weights.is_file():
        if (path / PEFT_PICKLE_FILE).exists():
            raise AdapterFileError(
                f"{path / PEFT_PICKLE_FILE} is a pickle/torch file; peftx reads peft adapters only "
                f"from {PEFT_WEIGHTS_FILE}",
                "re-save it with save_pretrained(DIR, safe_serialization=True); nothing from disk is ever unpickled",
            )
        raise AdapterFileError(f"{path} has no {PEFT_WEIGHTS_FILE}", "save the adapter with peft's save_pretrained")
    source_record = None
    if (path / SOURCE_FILE).exists():
        source_record = _read_json(path / SOURCE_FILE, f"{path / SOURCE_FILE} is unreadable", "")
        if source_record.get("format") != SOURCE_FORMAT:
            raise AdapterFileError(
                f"{path / SOURCE_FILE} is not a {SOURCE_FORMAT} record",
                "remove it, or re-create the adapter with `peftx convert --to peft`",
            )
    return PeftDir(path, config, _read_tensors(weights), source_record)


def _read_json(path: Path, missing: str, hint: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterFileError(missing, hint) from None
    except (OSError, ValueError) as exc:
        raise AdapterFileError(
            first_line(f"{path} is not readable JSON ({type(exc).__name__}: {exc})"),
            "the file is damaged: save the adapter again",
        ) from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} is not a JSON object", "the file is damaged: save the adapter again")
    return data


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    if is_pickle_file(path):  # torch.save output under a safetensors name: refused, never unpickled
        raise AdapterFileError(
            f"{path} is a pickle/torch file, not safetensors",
            "re-save it with save_pretrained(DIR, safe_serialization=True)",
        )
    try:
        with safe_open(str(path), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own types for corrupt / truncated headers and data
        raise AdapterFileError(
            first_line(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})"),
            "the file is corrupt or truncated: save the adapter again",
        ) from None
    for key, value in tensors.items():
        if not key.startswith(KEY_PREFIX):
            raise AdapterFileError(
                f"{path}: tensor {key} is not in peft's layout ({KEY_PREFIX}<module>...)",
                "save the adapter with peft's save_pretrained",
            )
        if not value.is_floating_point():
            raise AdapterFileError(
                f"{path}: tensor {key} has dtype {value.dtype}, expected a floating dtype",
                "the file is damaged: save the adapter again",
            )
        if not all_finite(value):
            raise NonFiniteError(f"{path}: tensor {key} holds NaN or Inf", "use an earlier, finite checkpoint")
    return tensors


# ---------------------------------------------------------------------------------------------------- what merges


def check_supported(config: Mapping[str, Any], where: Path | str) -> None:
    """Refuse a peft type or option whose result is not an exact fold into the plain timm model's weights."""
    peft_type = str(config.get("peft_type")).upper()
    if peft_type not in SUPPORTED_TYPES:
        reason = _TYPE_REASONS.get(peft_type, "peftx has not checked that merge_and_unload folds it exactly")
        raise AdapterFileError(
            f"{where}: peft type {peft_type} cannot be merged into a plain timm model: {reason}",
            f"peftx exports peft adapters of type {', '.join(SUPPORTED_TYPES)}",
        )
    free = _COMMON_OPTIONS | _FREE_OPTIONS[peft_type]
    for key, value in config.items():
        if key in free or value in (None, False, {}, [], ""):
            continue
        reason = _REFUSED_OPTIONS.get(
            key, f"an option peftx does not know (written by peft {config.get('peft_version', '?')})"
        )
        raise AdapterFileError(
            f"{where}: {key}={value!r} cannot be merged into a plain timm model: {reason}",
            f"peftx exports {peft_type} adapters without {key}",
        )
    if peft_type == "LORA":
        _check_lora_init(config.get("init_lora_weights", True), where)


def _check_lora_init(init: Any, where: Path | str) -> None:
    if isinstance(init, bool) or (isinstance(init, str) and init.lower() in _PLAIN_INITS):
        return
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise AdapterFileError(
            f"{where}: init_lora_weights={init!r} changed the base weights when the adapter was "
            "created, so the adapter does not fit the original weights",
            "save it with save_pretrained(..., path_initial_model_for_weight_conversion=...), "
            "which peft converts to a plain LoRA, and export that",
        )
    raise AdapterFileError(
        f"{where}: init_lora_weights={init!r} is a LoRA variant peftx has not checked",
        "peftx exports LoRA initialised with True, False, gaussian, eva or orthogonal",
    )


def _peft_config(peft, config: Mapping[str, Any], where: Path):
    """peft's config object for ``config`` (already checked), set up to load saved tensors for inference."""
    free = _COMMON_OPTIONS | _FREE_OPTIONS[str(config["peft_type"]).upper()]
    kwargs = {k: v for k, v in config.items() if k in free}  # unknown options left are all off: dropped
    kwargs["inference_mode"] = True
    kwargs["peft_type"] = str(config["peft_type"]).upper()  # peft's enum values; a hand-written "lora" means it too
    if "init_lora_weights" in kwargs:
        # The saved tensors overwrite whatever the init makes; True avoids inits that need data or an even rank.
        kwargs["init_lora_weights"] = True
    try:
        return peft.PeftConfig.from_peft_type(**kwargs)
    except (TypeError, ValueError) as exc:
        raise AdapterFileError(
            first_line(f"{where / PEFT_CONFIG_FILE}: peft rejects it ({exc})"),
            "the config is damaged or from an incompatible peft version",
        ) from None


# ---------------------------------------------------------------------------------------------------- names


def _timm_name(recorded: Any) -> str | None:
    """The timm model a peft config's base_model_name_or_path names (hub ids 'timm/NAME', 'hf-hub:timm/NAME'), or
    None when it names none (unset, a local path, another organisation's repository)."""
    import timm

    if not isinstance(recorded, str) or not recorded:
        return None
    name = recorded.removeprefix("hf-hub:").removeprefix("timm/")
    if "/" in name or "\\" in name:
        return None
    return name if timm.is_model(name.partition(".")[0]) else None


def _same_model(a: str, b: str) -> bool:
    """Same architecture, and the same pretrained tag where both name one."""
    arch_a, _, tag_a = a.partition(".")
    arch_b, _, tag_b = b.partition(".")
    return arch_a == arch_b and (not tag_a or not tag_b or tag_a == tag_b)


def resolve_name(pd: PeftDir, model_name: str | None) -> str:
    recorded = _timm_name(pd.config.get("base_model_name_or_path"))
    converted = ((pd.source or {}).get("spec") or {}).get("name")
    name = model_name or converted or recorded
    if not name:
        raise UsageError(
            f"{pd.path}: the peft adapter does not record which timm model it is for",
            "pass --model NAME (and --weights FILE with the base weights it was trained on)",
        )
    for what, other in (("its base_model_name_or_path", recorded), (SOURCE_FILE, converted)):
        if other and not _same_model(name, other):
            raise AdapterMismatchError(
                f"{pd.path} is a peft adapter for {other} ({what}), not for {name}",
                f"pass --model {other} with the base weights it was trained on",
            )
    return name


def classifier_path(model: nn.Module, name: str) -> str:
    get_classifier = getattr(model, "get_classifier", None)  # timm's; a plain nn.Module has none
    head = get_classifier() if get_classifier is not None else None
    if not isinstance(head, nn.Linear):
        raise UnsupportedModelError(
            f"{name}: the classifier is {type(head).__name__}, not an nn.Linear", "export a timm classification model"
        )
    return next(n for n, m in model.named_modules() if m is head)


def check_recorded_class(pd: PeftDir, model: nn.Module, name: str) -> None:
    recorded = (pd.config.get("auto_mapping") or {}).get("base_model_class")
    if recorded and recorded != type(model).__name__:
        raise AdapterMismatchError(
            f"{pd.path} is a peft adapter for a {recorded}, {name} is a {type(model).__name__}",
            "pass --model with the timm model it was trained on",
        )


@contextlib.contextmanager
def peft_warnings() -> Iterator[None]:
    """Hold back peft's warnings while it loads; those that are not known to be harmless are re-issued once the load
    succeeded (a refused adapter ends in its one error line, nothing else)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if not any(marker in str(w.message) for marker in _HARMLESS_WARNINGS):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _check_targets(config, model: nn.Module, pd: PeftDir, name: str) -> None:
    """Every module the config targets must be a layer merge_and_unload folds into (named when it is not)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    if config.target_modules == "all-linear":  # peft expands it to nn.Linear layers only
        return
    targeted = [(n, m) for n, m in model.named_modules() if n and check_target_module_exists(config, n)]
    if not targeted:
        raise AdapterMismatchError(
            f"{pd.path}: none of its target modules ({config.target_modules}) is a layer of {name}",
            "the adapter was made for another model: pass the --model it was trained on",
        )
    for module_name, module in targeted:
        if not isinstance(module, _MERGEABLE_LAYERS):
            raise UnsupportedModelError(
                f"{pd.path}: {module_name} is a {type(module).__name__}; peft "
                f"{pd.peft_type} folds into plain weights only on nn.Linear and nn.Conv2d",
                "target the Linear layers inside it (e.g. attn.qkv, mlp.fc1)",
            )
        if getattr(config, "lora_bias", False) and module.bias is None:
            raise UnsupportedModelError(
                f"{pd.path}: lora_bias adds a bias to {module_name}, which has none in the timm model",
                "train without lora_bias on bias-free layers",
            )


def inject_and_load(peft, pd: PeftDir, model: nn.Module, name: str) -> nn.Module:
    """``PeftModel`` on ``model`` with the file's tensors, after checking they are exactly the tensors it needs."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    config = _peft_config(peft, pd.config, pd.path)
    _check_targets(config, model, pd, name)
    with peft_warnings():
        try:
            wrapped = peft.PeftModel(model, config)
        except ValueError as exc:  # peft's refusal of a module it cannot wrap
            raise UnsupportedModelError(
                first_line(f"{pd.path}: peft cannot apply it to {name} ({exc})"),
                "the adapter was made for another model",
            ) from None
        # save_embedding_layers=False: "auto" looks base_model_name_or_path up on the Hugging Face hub (a network
        # call); a timm image model has no token embeddings to save anyway.
        expected = get_peft_model_state_dict(wrapped, save_embedding_layers=False)
        _check_tensor_fit(expected, pd, name)
        result = set_peft_model_state_dict(wrapped, pd.tensors)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:  # cannot happen after the fit check; a peft change would show here
        raise AdapterFileError(f"{pd.path}: peft did not use {unexpected[:3]}", "report this")
    wrapped.eval()
    for p in wrapped.parameters():
        p.requires_grad_(False)
    return wrapped


def _short(key: str) -> str:
    return key.removeprefix(KEY_PREFIX)


def _check_tensor_fit(expected: Mapping[str, torch.Tensor], pd: PeftDir, name: str) -> None:
    got = pd.tensors
    for key in sorted(set(expected) & set(got)):
        if tuple(got[key].shape) != tuple(expected[key].shape):
            raise AdapterMismatchError(
                f"{pd.path}: {_short(key)} has shape {list(got[key].shape)}, {name} needs {list(expected[key].shape)}",
                "the adapter was made for another base model (other width, rank pattern or class count)",
            )
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        raise AdapterMismatchError(
            f"{pd.path}: {len(missing)} tensors {name} needs are missing and {len(extra)} are for layers it does not "
            f"have (e.g. missing {[_short(k) for k in missing[:2]]}, extra {[_short(k) for k in extra[:2]]})",
            "the adapter was made for another base model (other depth or layer names)",
        )


# ---------------------------------------------------------------------------------------------------- merge


@torch.no_grad()
def merge_peft(reference: nn.Module, *, plain_class: type, plain_shapes: Mapping[str, tuple[int, ...]]) -> nn.Module:
    """peft's merge_and_unload on a copy (``reference`` stays the unmerged parity reference), checked to be the plain
    timm model: the same class, exactly the plain state-dict keys and shapes, every tensor finite."""
    with peft_warnings():
        try:
            peft_model: Any = copy.deepcopy(reference)  # a peft.PeftModel (peft is untyped here)
            merged: nn.Module = peft_model.merge_and_unload(safe_merge=True)
        except ValueError as exc:
            if "NaN" in str(exc):
                raise NonFiniteError(
                    "merging the peft adapter gives non-finite weights",
                    "the adapter holds extreme values: use another checkpoint",
                ) from None
            raise ExportError(
                first_line(f"peft cannot merge the adapter: {exc}"), "the adapter has a layer peft does not merge"
            ) from None
    if type(merged) is not plain_class:
        raise ExportError(f"merging gave a {type(merged).__name__}, not the plain {plain_class.__name__}")
    shapes = {k: tuple(v.shape) for k, v in merged.state_dict().items()}
    if shapes != dict(plain_shapes):
        diff = sorted(set(shapes.items()) ^ set(plain_shapes.items()))[:4]
        raise ExportError(
            f"the merged model does not have the plain timm state dict: {diff}",
            "a peft module survived the merge: this adapter cannot be exported",
        )
    bad = [k for k, v in merged.state_dict().items() if not all_finite(v)]
    if bad:
        raise NonFiniteError(f"merging the peft adapter gives non-finite {bad[0]}", "use another checkpoint")
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged.eval()
