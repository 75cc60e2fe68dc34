"""Linear probing, the lower baseline every PEFT table starts from: a new head on the frozen backbone.

No layer is wrapped; the only trainable tensors are the new (zero-initialised) classifier's weight and bias, which
are tensors of the plain timm model. So the adapter file holds the head, and merging is the identity.
DeiT distilled has two classifiers (head on the cls token, head_dist on the distillation token, averaged by timm
outside distillation training): both are new and trained, and the exported model returns their average.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import AdapterConfig
from .registry import Method


@dataclass
class LinearConfig(AdapterConfig):
    """Linear probing has no hyper-parameters of its own."""

    method: ClassVar[str] = "linear"


class Linear(Method):
    name = "linear"
    config_class = LinearConfig
    description = "linear probe: a new head on the frozen backbone (baseline)"
    wraps_layers = False  # the head is the whole method
