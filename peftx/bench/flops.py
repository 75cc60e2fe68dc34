"""FLOPs counted, not assumed: ``torch.utils.flop_counter.FlopCounterMode`` over one forward / training step."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


def count_flops(
    model: nn.Module, input_size: Sequence[int], *, batch: int = 1, device: torch.device | str = "cpu"
) -> float:
    """FLOPs per image of one forward (GEMM/conv/attention matmuls; 1 MAC = 2 FLOPs), counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch, *input_size, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / batch


def count_step_flops(step: Callable[[], Any], batch: int) -> float:
    """FLOPs per image of one training step (forward + backward; the optimizer's elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / batch
