"""The training forward of each method takes a faster route than the textbook formula (issue 6: the largest cost
of each step). Each route must give the same outputs and gradients as the one delta definition merge uses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny, perturb_adapter
from torch import nn

from peftx.adapter import adapt
from peftx.methods import SSF, AdapterLinear, LowRankLinear, RLRRLinear, make_config
from peftx.methods.orthogonal import ao_basis, random_unit_vector


def _frozen_linear(inp: int, out: int, dtype=torch.float32, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(inp, out, bias=bias).to(dtype)
    lin.requires_grad_(False)
    return lin


def _grads(y: torch.Tensor, tensors: list[torch.Tensor], gy: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(y, tensors, gy))


@pytest.mark.parametrize("groups,bias", [(1, True), (3, True), (3, False)])
def test_rlrr_hand_derived_backward_matches_autograd_through_merge_weight(groups, bias):
    torch.manual_seed(groups)
    layer = RLRRLinear(_frozen_linear(16, 24, torch.float64, bias), "t", col_groups=groups).double()
    with torch.no_grad():
        layer.f.normal_()
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    wrt = [x, layer.s_row, layer.s_col, layer.f]
    y = layer(x)
    assert y.grad_fn is not None and "Rescaled" in type(y.grad_fn).__name__  # the fast path was taken
    ref = AdapterLinear.forward(layer, x)  # autograd through merge_weight: the method's one definition
    assert torch.equal(y, ref)
    gy = torch.randn_like(y)
    got_all, want_all = _grads(y, wrt, gy), _grads(ref, wrt, gy)
    for got, want in zip(got_all, want_all, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert all(g.abs().sum() > 0 for g in got_all)


def test_rlrr_fast_path_under_bf16_autocast():
    torch.manual_seed(0)
    layer = RLRRLinear(_frozen_linear(64, 96), "t", col_groups=3)
    x = torch.randn(4, 7, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        ref = AdapterLinear.forward(layer, x)
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref)
    gy = torch.randn_like(y)
    wrt = [x, layer.s_row, layer.s_col]
    for got, want in zip(_grads(y, wrt, gy), _grads(ref, wrt, gy), strict=True):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)  # bf16 matmuls on both sides


def test_rlrr_takes_the_plain_path_when_not_training_or_when_w_is_trainable():
    layer = RLRRLinear(_frozen_linear(8, 12), "t", col_groups=3)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert layer(x).grad_fn is None
    layer.base_layer.weight.requires_grad_(True)  # a user unfreezing W: autograd must reach it
    y = layer(x)
    assert "Rescaled" not in type(y.grad_fn).__name__
    y.sum().backward()
    assert layer.base_layer.weight.grad is not None


def test_ssf_folded_layernorm_equals_scale_shift_after_the_norm():
    torch.manual_seed(0)
    norm = nn.LayerNorm(32)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
        norm.bias.normal_()
    norm.requires_grad_(False)
    ssf = SSF(norm, 32, "n", init_std=0.5)
    x = torch.randn(4, 6, 32, requires_grad=True)
    y = ssf(x)
    ref = norm(x) * ssf.ssf_scale + ssf.ssf_shift  # the SSF paper's formula
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(y)
    wrt = [x, ssf.ssf_scale, ssf.ssf_shift]
    for got, want in zip(_grads(y, wrt, gy), _grads(ref, wrt, gy), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "aoft"])
@pytest.mark.parametrize("amp", [False, True])
def test_low_rank_accumulating_forward_matches_base_plus_update(method, amp):
    model = adapt(make_tiny("vit"), make_config(method))
    perturb_adapter(model, std=0.1)
    layer = next(m for m in model.modules() if isinstance(m, LowRankLinear))
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    params = [x, *layer.adapter_parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        y = layer(x)
        u, v = layer.factors()
        ref = layer.base_layer(x) + F.linear(F.linear(x, v), u)  # the textbook low-rank forward
    assert y.dtype == ref.dtype and y.shape == ref.shape
    tol = dict(rtol=2e-2, atol=2e-2) if amp else dict(rtol=1e-5, atol=1e-5)
    assert (ref - layer.base_layer(x)).abs().max() > 1e-3  # the update is not trivially zero
    torch.testing.assert_close(y, ref, **tol)
    gy = torch.randn_like(y)
    for got, want in zip(_grads(y, params, gy), _grads(ref, params, gy), strict=True):
        torch.testing.assert_close(got, want, **tol)


def test_batched_ao_basis_equals_one_vector_at_a_time():
    g = torch.Generator().manual_seed(0)
    q = torch.stack([random_unit_vector(48, g) * s for s in (1.0, 1.3)])
    batched = ao_basis(q, 6)
    assert batched.shape == (2, 48, 6)
    for i in range(2):
        torch.testing.assert_close(batched[i], ao_basis(q[i], 6), rtol=0, atol=0)


def test_rlrr_model_trains_through_the_fast_path_and_merges_exactly():
    """End to end on a tiny ViT: a step through the fast path changes the adapter, and merge still matches."""
    from peftx.adapter import merge_and_unload

    torch.manual_seed(0)
    model = adapt(make_tiny("vit"), make_config("rlrr"))
    perturb_adapter(model)  # the zero-initialised head would stop every gradient at step 1
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "s_col" in n}
    F.cross_entropy(model.train()(x), y).backward()
    opt.step()
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    model.eval()
    with torch.no_grad():
        unmerged = model(x)
        merged = merge_and_unload(model)(x)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)


def test_rlrr_fast_backward_refuses_a_second_derivative():
    """The hand-written backward is once differentiable: create_graph + a second backward raises a clear error
    instead of returning a silently wrong (missing) second-order term. Through merge_weight (eval / the
    definition) autograd still gives second derivatives."""
    torch.manual_seed(0)
    layer = RLRRLinear(_frozen_linear(8, 12), "t", col_groups=1)
    x = torch.randn(3, 8)
    y = layer(x)
    assert "Rescaled" in type(y.grad_fn).__name__
    (g,) = torch.autograd.grad(y.pow(2).sum(), layer.s_row, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice .*once_differentiable"):
        g.sum().backward()
    ref = AdapterLinear.forward(layer, x)  # the definition: twice differentiable
    (g,) = torch.autograd.grad(ref.pow(2).sum(), layer.s_row, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), layer.s_col)
    assert torch.isfinite(h).all() and h.abs().sum() > 0
