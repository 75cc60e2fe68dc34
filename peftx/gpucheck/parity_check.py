"""Step 3: merged vs unmerged on the device, in FP32 and under bf16 / fp16 autocast, for every method and family.

Per (model, method): the adapter is set non-trivially (every trainable tensor moved off its init, the head kept),
the UNMERGED model on the device in FP32 is the reference, and the merge itself runs on the device
(``merge_and_unload``). Compared with it: the merged model in FP32 (``MERGE_FP32``, TF32 off for matmuls and cuDNN
convolutions, which would otherwise round the patch embedding); on CUDA, the same unmerged model on the CPU
(``CUDA_VS_CPU_FP32``); and the merged model under bf16 and fp16 autocast (``MERGE_BF16_AUTOCAST``,
``MERGE_FP16_AUTOCAST``), next to the unmerged model under the same autocast (advisory: the error AMP alone causes,
so the JSON shows merging adds none). The adapter's own effect on the logits is recorded and must exceed every bound
it is checked against, so no comparison can pass because the adapter does nothing.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from peftx.adapter import adapt, merge_and_unload
from peftx.backbones import DEMO_MODEL, create_backbone, data_config
from peftx.data import real_images
from peftx.exports.parity import compare, make_input_sets
from peftx.methods import make_config
from peftx.runtime import autocast
from peftx.tolerances import CUDA_VS_CPU_FP32, MERGE_BF16_AUTOCAST, MERGE_FP16_AUTOCAST, MERGE_FP32, Tolerance

from .assets import TINY_ARCH, TINY_IMG, TINY_KW
from .report import Context, check, error_text

NUM_CLASSES = 10
PERTURB_STD = 0.05
AMP_TOLERANCES: dict[str, tuple[torch.dtype, Tolerance]] = {
    "bf16": (torch.bfloat16, MERGE_BF16_AUTOCAST),
    "fp16": (torch.float16, MERGE_FP16_AUTOCAST),
}


def parity_models(ctx: Context) -> dict[str, dict[str, Any]]:
    """name -> create_backbone kwargs. Full: the demo ViT-S/14 (real weights when carried), ViT-B/16 and Swin-T at
    224 px (random init: merging is exact algebra whatever the values). Quick: one tiny model per family."""
    if ctx.cfg.quick:
        return {
            "vit_tiny": {"name": TINY_ARCH, "pretrained": False, "img_size": TINY_IMG, **TINY_KW},
            "dinov2_reg_tiny": {
                "name": "vit_small_patch14_reg4_dinov2",
                "pretrained": False,
                "img_size": 28,
                "depth": 2,
                "embed_dim": 64,
                "num_heads": 2,
                "init_values": 0.1,
            },
            "swin_tiny": {
                "name": "swin_tiny_patch4_window7_224",
                "pretrained": False,
                "img_size": 64,
                "window_size": 4,
                "embed_dim": 24,
                "depths": (1, 1, 1),
                "num_heads": (1, 2, 2),
            },
        }
    vit_s14: dict[str, Any] = {"name": DEMO_MODEL, "img_size": 224}
    if ctx.weights.path is not None:
        vit_s14["weights"] = str(ctx.weights.path)
    else:
        vit_s14["pretrained"] = False
    return {
        "vit_s14": vit_s14,
        "vit_b16": {"name": "vit_base_patch16_224", "pretrained": False},
        "swin_t": {"name": "swin_tiny_patch4_window7_224", "pretrained": False},
    }


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off for CUDA matmuls and cuDNN convolutions (cuDNN's default is on) while FP32 results are compared."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


class ModuleRunner:
    """A module as a parity runner (``infer(batch) -> logits``), on a device, optionally under autocast."""

    def __init__(self, module: nn.Module, device: str, amp: torch.dtype | None = None, *, name: str):
        self.module, self.device, self.amp, self.name = module.eval(), torch.device(device), amp, name

    def __enter__(self) -> ModuleRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def infer(self, batch: np.ndarray) -> np.ndarray:

        with torch.inference_mode(), autocast(self.device, self.amp):
            out = self.module(torch.from_numpy(np.ascontiguousarray(batch, np.float32)).to(self.device))
        return out.float().cpu().numpy()


def perturbed_adapter(plain: nn.Module, method: str, seed: int) -> nn.Module:
    """An adapted deep copy of ``plain`` whose every trainable tensor is moved off its init (head kept)."""
    model = adapt(copy.deepcopy(plain), make_config(method), zero_head=False, base_fingerprint="gpu check")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * PERTURB_STD)
    return model.eval()


def _summary(result: Any) -> dict[str, Any]:
    o = result.overall
    return {
        "passed": result.passed,
        "required": result.required,
        "tolerance": result.tolerance.name,
        "max_abs": o.max_abs,
        "bound": o.bound,
        "ref_max_abs": o.ref_max_abs,
        "min_cosine": o.min_cosine,
        "top1": o.top1_agreement,
        "would_pass_atol": o.would_pass_atol,
        "failures": o.failures[:3],
    }


def _outputs(runner: ModuleRunner, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: runner.infer(v) for k, v in inputs.items()}


def parity_case(
    plain: nn.Module,
    method: str,
    inputs: dict[str, np.ndarray],
    plain_out: dict[str, np.ndarray],
    device: str,
    seed: int,
) -> dict[str, Any]:
    """Every comparison of one (model, method) on ``device``; ``plain_out``: the plain model's FP32 logits there."""
    unmerged = perturbed_adapter(plain, method, seed)
    cpu_ref = _outputs(ModuleRunner(unmerged, "cpu", name="unmerged cpu fp32"), inputs) if device == "cuda" else None
    unmerged.to(device)
    comparisons: dict[str, Any] = {}
    with exact_fp32():
        ref = _outputs(ModuleRunner(unmerged, device, name="unmerged fp32"), inputs)
        merged = merge_and_unload(unmerged)  # on the device: the merge's own float64 math runs there too
        comparisons["merged fp32"] = _summary(
            compare(
                ref,
                ModuleRunner(merged, device, name="merged fp32"),
                inputs,
                MERGE_FP32,
                reference_name="unmerged fp32",
            )
        )
        if cpu_ref is not None:
            comparisons["unmerged cuda vs cpu fp32"] = _summary(
                compare(
                    cpu_ref,
                    ModuleRunner(unmerged, device, name="unmerged cuda fp32"),
                    inputs,
                    CUDA_VS_CPU_FP32,
                    reference_name="unmerged cpu fp32",
                )
            )
    for amp, (dtype, tol) in AMP_TOLERANCES.items():
        comparisons[f"merged {amp} autocast"] = _summary(
            compare(
                ref,
                ModuleRunner(merged, device, dtype, name=f"merged {amp}"),
                inputs,
                tol,
                reference_name="unmerged fp32",
            )
        )
        comparisons[f"unmerged {amp} autocast"] = _summary(
            compare(
                ref,
                ModuleRunner(unmerged, device, dtype, name=f"unmerged {amp}"),
                inputs,
                tol,
                reference_name="unmerged fp32",
                required=False,
            )
        )
    scale = max(float(np.abs(v).max()) for v in ref.values())
    effect = max(float(np.abs(ref[k] - plain_out[k]).max()) for k in ref) / max(scale, 1e-30)
    return {"method": method, "adapter_effect_rel": effect, "logit_scale": scale, "comparisons": comparisons}


def case_checks(where: str, case: dict[str, Any]) -> list[dict[str, Any]]:
    checks = []
    for name, c in case["comparisons"].items():
        if not c["required"]:
            continue
        detail = f"max |Δ| {c['max_abs']:.2e} <= {c['bound']:.2e} ({c['tolerance']}), cosine {c['min_cosine']:.6f}"
        checks.append(
            check(
                f"parity/{where}/{name}",
                bool(c["passed"]),
                detail if c["passed"] else "; ".join(c["failures"]) or detail,
            )
        )
    needed = max(c["bound"] / max(c["ref_max_abs"], 1e-30) for c in case["comparisons"].values() if c["required"])
    effect = case["adapter_effect_rel"]
    checks.append(
        check(
            f"parity/{where}/adapter changes the output",
            effect > 2 * needed,
            f"adapter moves the logits by {effect:.3f} of their scale; the loosest bound is {needed:.3f} of it",
        )
    )
    return checks


def run_parity_check(ctx: Context) -> dict[str, Any]:

    result: dict[str, Any] = {"device": ctx.device, "models": {}, "checks": []}
    for key, spec in parity_models(ctx).items():
        spec = dict(spec)
        name = spec.pop("name")
        if ctx.out_of_time():
            result["models"][key] = {"timm_name": name, "status": "not run (time limit)"}
            result["checks"].append(ctx.not_run(f"parity/{key}/ran"))
            continue
        ctx.say(f"parity: {key} ({name}) x {', '.join(ctx.cfg.resolved_methods())} on {ctx.device}")
        entry: dict[str, Any] = {
            "timm_name": name,
            "weights": "real" if spec.get("weights") else "random init",
            "cases": {},
        }
        result["models"][key] = entry
        try:
            torch.manual_seed(0)
            plain = create_backbone(name, num_classes=NUM_CLASSES, **spec).eval()
            dcfg = data_config(plain)
            entry["input_size"] = list(dcfg["input_size"])
            inputs = make_input_sets(real_images(4, dcfg).numpy(), (4,), random_batch=2)
            with exact_fp32():
                plain_out = _outputs(
                    ModuleRunner(copy.deepcopy(plain).to(ctx.device), ctx.device, name="plain"), inputs
                )
        except Exception as exc:  # noqa: BLE001 - recorded; the other models still run
            entry["error"] = error_text(exc)
            result["checks"].append(check(f"parity/{key}/built", False, entry["error"]))
            continue
        for i, method in enumerate(ctx.cfg.resolved_methods()):
            try:
                case = parity_case(plain, method, inputs, plain_out, ctx.device, seed=i + 1)
            except Exception as exc:  # noqa: BLE001 - e.g. a merge that fails on this device
                entry["cases"][method] = {"error": error_text(exc)}
                result["checks"].append(check(f"parity/{key}/{method}/ran", False, error_text(exc)))
                continue
            entry["cases"][method] = case
            result["checks"] += case_checks(f"{key}/{method}", case)
        if ctx.device == "cuda":
            torch.cuda.empty_cache()
    result["status"] = "ok" if all(c["ok"] is not False for c in result["checks"]) else "failed"
    return result
