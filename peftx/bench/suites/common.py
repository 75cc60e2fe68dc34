"""What several suites share: adapted copies with non-trivial adapters, and parity against the reference."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from ...adapter import adapt, state_of
from ...exports.parity import compare, reference_outputs
from ...exports.runners import TorchRunner
from ...methods import make_config


def adapted_copy(
    plain: nn.Module, method: str, *, seed: int = 0, perturb_std: float = 0.05, fingerprint: str | None = None
) -> nn.Module:
    """A deep copy of ``plain`` with ``method``'s adapter, every trainable tensor moved off its init.

    The head is kept (not zeroed) and zero-initialised tensors (LoRA B, AOFT λ, the RLRR shift) are perturbed, so the
    merged model really differs from the plain one and a parity check cannot pass by accident.
    """
    model = adapt(
        copy.deepcopy(plain),
        make_config(method),
        zero_head=False,
        base_fingerprint=fingerprint or "benchmark (not computed)",
    )
    gen = torch.Generator().manual_seed(seed)
    head = tuple(h + "." for h in state_of(model).layout.heads)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and not name.startswith(head):
                p.add_(torch.randn(p.shape, generator=gen) * perturb_std)
    return model.eval()


def parity_summary(
    expected: dict[str, np.ndarray], runner: Any, inputs: dict[str, np.ndarray], tolerance: Any, reference_name: str
) -> dict[str, Any]:
    """The library's comparator (``peftx.exports.parity.compare``), condensed to what bench.json records."""
    result = compare(expected, runner, inputs, tolerance, reference_name=reference_name)
    o = result.overall
    return {
        "passed": result.passed,
        "tolerance": tolerance.name,
        "max_abs": o.max_abs,
        "bound": o.bound,
        "min_cosine": o.min_cosine,
        "top1": o.top1_agreement,
        "reference": reference_name,
        "failures": o.failures[:3],
    }


def torch_outputs(model: nn.Module, inputs: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    """Reference outputs of an eval-mode module on CPU, through the library's runner and comparator input sets."""
    return reference_outputs(TorchRunner(model, name=name), inputs)
