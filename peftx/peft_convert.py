"""``peftx convert RUN --to peft``: a peftx low-rank adapter (LoRA, AOFT) as a Hugging Face peft LoRA directory.

peftx adapts q and v as row SLICES of timm's fused qkv; peft wraps whole ``nn.Linear`` modules. The exact
conversion is one LoRA per wrapped layer built from :meth:`LowRankLinear.factors`: ``lora_B`` = U [out, S·r] (the
method's scaling folded in, zero rows on the un-adapted slices), ``lora_A`` = V [S·r, in], and ``lora_alpha`` equal
to the layer's rank so peft's scaling is exactly 1 (layers of another rank get it through ``rank_pattern`` /
``alpha_pattern``). peft then computes the very products peftx's forward does. The trained head goes in
``modules_to_save``. RLRR (``W ⊙ s sᵀ``, plus SSF on the LayerNorms) has no low-rank form and no peft equivalent.

Beside peft's two files goes ``peftx_source.json`` (peft ignores it): the backbone spec, the base-weight
fingerprint, class names and preprocessing, so ``peftx merge-export DIR`` needs no options and refuses other base
weights. Before the directory is renamed into place, peft itself loads it (``PeftModel.from_pretrained`` onto a
freshly built plain backbone) and its logits are compared with the peftx model's on real images.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .adapter import adapter_modules, state_of
from .deploy import load_reference, parity_images, provenance
from .errors import OutputError, ParityError, UsageError
from .events import Progress, steps_to
from .exports.bundle import RANDOM_BATCH
from .exports.parity import compare, make_input_sets, reference_outputs
from .exports.runners import TorchRunner
from .methods.base import LowRankLinear
from .peft_adapter import (
    KEY_PREFIX,
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    SOURCE_FILE,
    SOURCE_FORMAT,
    SOURCE_FORMAT_VERSION,
    import_peft,
    peft_warnings,
)
from .sources import rebuild_model
from .tolerances import PEFT_CONVERSION_FP32

FORMATS = ("peft",)
DEFAULT_DIR = "peft"
PARITY_REFERENCE = "peftx (unmerged)"


@dataclass
class ConvertReport:
    out_dir: Path
    parity: Any  # peftx.exports.parity.ParityResult: peft's load of the written directory vs the peftx model
    layers: int
    ranks: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "format": "peft",
            "layers": self.layers,
            "ranks": self.ranks,
            "parity": self.parity.to_json(),
        }


def lora_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, int], str]:
    """(peft's saved tensors, rank per wrapped layer, head path) for a peftx-adapted model of low-rank layers."""
    state = state_of(model)
    modules = adapter_modules(model)
    not_low_rank = [(n, m) for n, m in modules if not isinstance(m, LowRankLinear)]
    if not_low_rank or not modules:
        where = f": {not_low_rank[0][0]} is {type(not_low_rank[0][1]).__name__}" if not_low_rank else ""
        raise UsageError(
            f"the {state.config.method} adapter cannot be written as a peft LoRA{where}, whose update is "
            "not a low-rank product B·A",
            "deploy it with `peftx merge-export` (the merged model is a plain timm model any runtime loads)",
        )
    direct = sorted({s.path for s in state.layout.linears if s.direct_weight} & {n for n, _ in modules})
    if direct or state.layout.extra_heads:
        why = (
            f"timm's attention reads {direct[0]}.weight itself (q_bias / v_bias attention), so peft's LoRA layer "
            "there would be bypassed"
            if direct
            else f"the model has {len(state.layout.heads)} classifiers ({', '.join(state.layout.heads)}) and a peft "
            "adapter file saves one"
        )
        raise UsageError(
            f"the adapter cannot be written as a peft LoRA: {why}",
            "deploy it with `peftx merge-export` (the merged model is a plain timm model any runtime loads)",
        )
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    with torch.no_grad():
        for name, module in modules:
            assert isinstance(module, LowRankLinear)  # every one checked above
            u, v = module.factors()  # exactly what the peftx forward multiplies (scaling folded into U)
            tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = v.detach().float().contiguous().clone()
            tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = u.detach().float().contiguous().clone()
            ranks[name] = int(v.shape[0])
        head = state.layout.head
        for key, value in model.get_submodule(head).state_dict().items():
            tensors[f"{KEY_PREFIX}{head}.{key}"] = value.detach().float().contiguous().clone()
    return tensors, ranks, head


def lora_config(peft, model: nn.Module, ranks: dict[str, int], head: str, base_name: str | None):
    """peft's LoraConfig whose scaling is 1 on every layer (lora_alpha = the layer's rank)."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {name: rank for name, rank in sorted(ranks.items()) if rank != r}
    config = peft.LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=sorted(ranks),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        modules_to_save=[head],
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=True,
        inference_mode=True,
        base_model_name_or_path=base_name,
    )
    config.auto_mapping = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    return config


def convert_run(
    source: str | Path,
    *,
    to: str = "peft",
    output: str | Path | None = None,
    weights: str | Path | None = None,
    images_dir: str | Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> ConvertReport:
    """Write the peftx run (or adapter file) ``source`` as a peft adapter directory; returns the parity of peft's
    own load of it against the peftx model. Nothing is written when any check fails."""
    if to not in FORMATS:
        raise UsageError(f"--to {to!r} is not a format peftx converts to", f"choose {', '.join(FORMATS)}")
    say = steps_to(progress)
    peft = import_peft()
    say("loading the run")
    loaded = load_reference(source, weights=weights)
    out = Path(output).absolute() if output else loaded.adapter_path.parent.absolute() / DEFAULT_DIR
    _check_destination(out, force)
    tensors, ranks, head = lora_tensors(loaded.model)
    config = lora_config(peft, loaded.model, ranks, head, loaded.config.get("base_model"))
    record = _source_record(loaded, provenance(loaded))
    images = parity_images(loaded, images_dir)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=_parent(out)))
    try:
        say("writing the peft adapter")
        config.save_pretrained(str(work))
        save_file(tensors, str(work / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
        (work / SOURCE_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
        say("loading it with peft and comparing with the peftx model")
        result = _peft_parity(peft, work, loaded, images, weights)
        if not result.passed:
            raise ParityError(
                f"peft's load of the converted adapter disagrees with the peftx model: "
                f"{result.overall.failures[0] if result.overall.failures else 'failed'}",
                "nothing was written; please report this",
            )
        work.chmod(0o755)
        _move_into_place(work, out)
    except OSError as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise OutputError(f"writing {out} failed: {exc}", "check free disk space and permissions") from exc
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return ConvertReport(out, result, len(ranks), ranks)


def _source_record(loaded, prov: dict[str, Any]) -> dict[str, Any]:
    c = loaded.config
    return {
        "format": SOURCE_FORMAT,
        "format_version": SOURCE_FORMAT_VERSION,
        "peftx_version": __version__,
        "base_model": c.get("base_model"),
        "spec": c.get("spec"),
        "base_fingerprint": c.get("base_fingerprint"),
        "num_classes": c.get("num_classes"),
        "class_names": loaded.class_names,
        "data_config": loaded.data_config,
        "data": c.get("data"),
        "converted_from": {
            "adapter_file": prov["adapter_file"],
            "adapter_sha256": prov["adapter_sha256"],
            "method": c.get("method"),
            "config": c.get("config"),
        },
    }


def _peft_parity(peft, directory: Path, loaded, images: torch.Tensor, weights):
    """peft's own loader on a freshly built plain backbone, vs the peftx model, on real images and noise."""
    plain = rebuild_model(loaded.config, weights=weights).eval()
    with peft_warnings():
        converted = peft.PeftModel.from_pretrained(plain, str(directory)).eval()
    array = images.numpy()
    inputs = make_input_sets(array, [len(array)], random_batch=RANDOM_BATCH)
    expected = reference_outputs(TorchRunner(loaded.model, name=PARITY_REFERENCE), inputs)
    return compare(
        expected,
        TorchRunner(converted, name="peft PeftModel.from_pretrained"),
        inputs,
        PEFT_CONVERSION_FP32,
        reference_name=PARITY_REFERENCE,
    )


def _parent(out: Path) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create a directory in {out.parent}: {exc}", "check permissions") from exc
    return out.parent


def _check_destination(out: Path, force: bool) -> None:
    if not out.exists():
        return
    if not force:
        raise OutputError(f"{out} already exists", "pass --force to replace it, or choose another --output")
    if not (out.is_dir() and (out / PEFT_CONFIG_FILE).is_file()) and not (out.is_dir() and not any(out.iterdir())):
        raise OutputError(
            f"{out} exists and is not a peft adapter directory; refusing to replace it",
            "remove it yourself or choose another --output",
        )


def _move_into_place(work: Path, out: Path) -> None:
    """Rename ``work`` to ``out``; an existing ``out`` (force) is moved aside first and deleted only afterwards."""
    if not out.exists():
        os.rename(work, out)
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, old)
    os.rename(work, out)
    shutil.rmtree(old, ignore_errors=True)
