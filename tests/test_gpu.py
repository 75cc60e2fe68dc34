"""The CUDA paths (issue 13): AMP training steps, RLRR's hand-written backward, the fast paths and merge parity.

Marked ``gpu``: they skip without CUDA, and ``scripts/gpu-check.sh`` runs them on a GPU machine. To develop them
without one, ``PEFTX_GPU_TESTS_DEVICE=cpu`` runs the same tests on the CPU, where bf16 and fp16 autocast exist too.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny, perturb_adapter, real_batch
from torch import nn

from peftx.adapter import adapt, adapter_modules, merge_and_unload
from peftx.exports.parity import compare, make_input_sets
from peftx.methods import METHOD_NAMES, SSF, AdapterLinear, LowRankLinear, RLRRLinear, get_method, make_config
from peftx.tolerances import MERGE_BF16_AUTOCAST, MERGE_FP16_AUTOCAST, MERGE_FP32

DEVICE = os.environ.get("PEFTX_GPU_TESTS_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs CUDA"),
]
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}
# The methods that wrap layers (their own fast paths); training and merging are checked for every method.
ADAPTERS = [m for m in METHOD_NAMES if get_method(m).wraps_layers]


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 off (cuDNN's default is on) so FP32 comparisons compare FP32."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _frozen_linear(inp: int, out: int, dtype=torch.float32, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(inp, out, bias=bias).to(dtype)
    lin.requires_grad_(False)
    return lin


def _grads(y: torch.Tensor, tensors: list[torch.Tensor], gy: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(y, tensors, gy))


# -- RLRR's hand-written backward against autograd through merge_weight, on the device -------------------------------


@pytest.mark.parametrize("groups,bias", [(1, True), (3, True), (3, False)])
def test_rlrr_hand_backward_matches_autograd_float64(groups: int, bias: bool) -> None:
    torch.manual_seed(groups)
    layer = RLRRLinear(_frozen_linear(48, 72, torch.float64, bias), "t", col_groups=groups).double().to(DEVICE)
    with torch.no_grad():
        layer.f.normal_()
        layer.s_row.normal_()
    x = torch.randn(3, 7, 48, dtype=torch.float64, device=DEVICE, requires_grad=True)
    wrt = [x, layer.s_row, layer.s_col, layer.f]
    y = layer(x)
    assert "Rescaled" in type(y.grad_fn).__name__  # the fast path was taken on this device
    ref = AdapterLinear.forward(layer, x)  # autograd through the method's one definition
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    got_all, want_all = _grads(y, wrt, gy), _grads(ref, wrt, gy)
    for got, want in zip(got_all, want_all, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert all(g.abs().sum() > 0 for g in got_all)


@pytest.mark.parametrize("amp", AMP)
def test_rlrr_hand_backward_under_autocast(amp: str) -> None:
    torch.manual_seed(0)
    layer = RLRRLinear(_frozen_linear(64, 96), "t", col_groups=3).to(DEVICE)
    with torch.no_grad():
        layer.s_row.normal_(0, 0.1)
    x = torch.randn(4, 9, 64, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE, dtype=AMP[amp]):
        y = layer(x)
        ref = AdapterLinear.forward(layer, x)
    assert "Rescaled" in type(y.grad_fn).__name__
    assert y.dtype == ref.dtype == AMP[amp]
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=1e-3)
    gy = torch.randn_like(y)
    wrt = [x, layer.s_row, layer.s_col, layer.f]
    for got, want in zip(_grads(y, wrt, gy), _grads(ref, wrt, gy), strict=True):
        assert got.dtype == want.dtype == torch.float32  # master tensors get FP32 gradients
        assert torch.isfinite(got).all()
        # both sides run the same half-precision GEMMs; the reductions differ only in FP32 summation order
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


# -- the other fast paths ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [m for m in ADAPTERS if m != "rlrr"])
@pytest.mark.parametrize("amp", AMP)
def test_low_rank_accumulating_forward_under_autocast(method: str, amp: str) -> None:
    model = adapt(make_tiny("vit"), make_config(method))
    perturb_adapter(model, std=0.1)  # on the CPU: its generator is a CPU one
    model.to(DEVICE)
    layer = next(m for m in model.modules() if isinstance(m, LowRankLinear))
    x = torch.randn(2, 5, layer.in_features, device=DEVICE, requires_grad=True)
    params = [x, *layer.adapter_parameters()]
    with torch.autocast(DEVICE, dtype=AMP[amp]):
        y = layer(x)
        u, v = layer.factors()
        ref = layer.base_layer(x) + F.linear(F.linear(x, v), u)  # the textbook low-rank forward
    assert y.dtype == ref.dtype == AMP[amp]
    assert (ref - layer.base_layer(x)).abs().max() > 1e-2  # the update is not trivially zero
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)
    gy = torch.randn_like(y)
    for got, want in zip(_grads(y, params, gy), _grads(ref, params, gy), strict=True):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_ssf_folded_layernorm_on_the_device_under_autocast() -> None:
    torch.manual_seed(0)
    norm = nn.LayerNorm(32)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
        norm.bias.normal_()
    norm.requires_grad_(False)
    ssf = SSF(norm, 32, "n", init_std=0.5).to(DEVICE)
    x = torch.randn(4, 6, 32, device=DEVICE, requires_grad=True)
    for amp in (None, *AMP.values()):
        with torch.autocast(DEVICE, dtype=amp or torch.bfloat16, enabled=amp is not None):
            y = ssf(x)
            ref = norm(x) * ssf.ssf_scale + ssf.ssf_shift  # the SSF paper's formula
        tol = dict(rtol=1e-5, atol=1e-5) if amp is None else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(y.float(), ref.float(), **tol)
        gy = torch.randn_like(y)
        wrt = [x, ssf.ssf_scale, ssf.ssf_shift]
        for got, want in zip(_grads(y, wrt, gy), _grads(ref, wrt, gy), strict=True):
            torch.testing.assert_close(got, want, **(dict(rtol=1e-4, atol=1e-4) if amp is None else tol))


# -- AMP training steps ----------------------------------------------------------------------------------------------


def _flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.requires_grad and p.grad is not None])


@pytest.mark.parametrize("family", ["vit", "swin"])
@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("amp", AMP)
def test_amp_training_steps_learn_like_fp32(family: str, method: str, amp: str) -> None:
    """bf16 autocast, and fp16 autocast + GradScaler (peftx's trainer): the first gradient points where the FP32
    one does, and 25 steps on a fixed batch of real images bring the loss down with every tensor finite."""
    torch.manual_seed(0)
    model = adapt(make_tiny(family), make_config(method))
    perturb_adapter(model, std=0.05)  # the zero-initialised head would stop every gradient at step 1
    model.to(DEVICE)
    x, y = real_batch(family, n=8).to(DEVICE), torch.arange(8, device=DEVICE) % 5
    model.train()

    torch.manual_seed(1)  # the same stochastic-depth masks (Swin's default drop_path_rate) in both passes
    F.cross_entropy(model(x), y).backward()  # FP32 reference gradient
    g32 = _flat_grads(model)
    model.zero_grad(set_to_none=True)
    scale = 1024.0 if amp == "fp16" else 1.0  # a loss scale that cannot overflow here: this compares directions
    torch.manual_seed(1)
    with torch.autocast(DEVICE, dtype=AMP[amp]):
        logits = model(x)
    assert logits.dtype == AMP[amp]  # autocast really ran the model in half precision
    (F.cross_entropy(logits.float(), y) * scale).backward()
    g_amp = _flat_grads(model) / scale
    assert torch.isfinite(g_amp).all()
    assert F.cosine_similarity(g32, g_amp, dim=0) > 0.99  # measured on CPU autocast: >= 0.9999

    model.zero_grad(set_to_none=True)
    scaler = torch.amp.GradScaler(DEVICE, enabled=amp == "fp16")  # the trainer's: initial scale 2^16
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses, skipped = [], 0
    for _ in range(25):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=AMP[amp]):
            loss = F.cross_entropy(model(x).float(), y)
        scale = scaler.get_scale()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        skipped += scaler.is_enabled() and scaler.get_scale() < scale  # an overflow: the step was skipped
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses  # measured on CPU: x0.01-0.71
    assert skipped <= 8  # the scaler settles within a few halvings of 2^16; it does not keep overflowing
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed and all(torch.isfinite(p).all() for p in model.parameters())
    head = model.peftx_state.layout.head + "."
    if get_method(method).wraps_layers:  # the adapter's own tensors learned, not only the head
        assert any(n.endswith(("s_row", "s_col", "lora_A", "lora_B", "q_up", "q_down", "lam")) for n in changed)
    elif get_method(method).trains_backbone:  # full fine-tuning: the backbone's weights learned too
        assert any(not n.startswith(head) and n.endswith(".weight") for n in changed)


# -- merged vs unmerged on the device --------------------------------------------------------------------------------


class _Runner:
    """A module on the device as a parity runner, optionally under autocast."""

    def __init__(self, module: nn.Module, amp: torch.dtype | None = None, name: str = "module"):
        self.module, self.amp, self.name = module.eval(), amp, name

    def __enter__(self) -> _Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def infer(self, batch):
        with (
            torch.inference_mode(),
            torch.autocast(DEVICE, dtype=self.amp or torch.bfloat16, enabled=self.amp is not None),
        ):
            return self.module(torch.from_numpy(batch).to(DEVICE)).float().cpu().numpy()


@pytest.mark.parametrize("family", ["vit", "vit_ls_reg", "swin"])
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_merge_on_the_device_matches_unmerged(family: str, method: str) -> None:
    """The merge runs where the model is (its float64 planning and Swin's fold included) and the merged model
    matches the unmerged one in FP32 and under both autocasts."""
    model = adapt(make_tiny(family), make_config(method), zero_head=False)
    perturb_adapter(model, std=0.1)
    plain = make_tiny(family).to(DEVICE)
    model.to(DEVICE).eval()
    inputs = make_input_sets(real_batch(family, n=4).numpy(), (4,), random_batch=2)
    ref = {k: _Runner(model).infer(v) for k, v in inputs.items()}
    moved = max(abs(ref[k] - _Runner(plain).infer(v)).max() for k, v in inputs.items())
    scale = max(abs(r).max() for r in ref.values())
    assert moved > 0.1 * scale  # the adapter really changes the output, far beyond every bound below

    merged = merge_and_unload(model)
    assert not adapter_modules(merged) and next(merged.parameters()).device.type == torch.device(DEVICE).type
    assert type(merged) is type(plain) and set(merged.state_dict()) == set(plain.state_dict())
    for amp, tol in ((None, MERGE_FP32), (torch.bfloat16, MERGE_BF16_AUTOCAST), (torch.float16, MERGE_FP16_AUTOCAST)):
        result = compare(ref, _Runner(merged, amp, name=f"merged {amp}"), inputs, tol, reference_name="unmerged fp32")
        assert result.passed, (tol.name, result.overall.failures)
