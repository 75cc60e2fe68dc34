"""Full fine-tuning, the upper baseline: every tensor of the backbone trains, together with the new head.

No layer is wrapped, so merging is the identity and the "adapter" file is the whole model: every parameter as
safetensors, with the same checks as any adapter (the fingerprint of the starting weights, names, shapes, finite
values). A resumable checkpoint holds every parameter and its AdamW moments (three copies of the model).

Weight decay: the plain-model rule (:func:`peftx.methods.registry.plain_no_weight_decay`): weight matrices decay;
biases, norms, every 1-d tensor (LayerScale), and the model's own ``no_weight_decay()`` list (position embedding,
cls / register tokens) do not: timm's optimiser factory plus the recipe's "no decay on names containing bias or norm".
On the newer classes the same rule covers their own tensors: Eva / BEiT's q_bias, v_bias and layer scale
gamma_1 / gamma_2 (1-d), DeiT's dist_token, and Swin V2's logit_scale and whole cpb_mlp (timm's own
``no_weight_decay()`` names them) skip decay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import AdapterConfig
from .registry import Method


@dataclass
class FullConfig(AdapterConfig):
    """Full fine-tuning has no hyper-parameters of its own (learning rate and weight decay are the run's)."""

    method: ClassVar[str] = "full"


class Full(Method):
    name = "full"
    config_class = FullConfig
    description = "full fine-tuning: every weight trains; merging is the identity (baseline)"
    trains_backbone = True
    wraps_layers = False
    # AdamW at an adapter's learning rate (the demo's 3e-3, VTAB's 1e-3..1e-2) wrecks the pretrained backbone within
    # the first steps: measured on the demo, val accuracy 10 % (chance) after epoch 1 at 3e-3. A hundredth gives
    # 3e-5 for the demo and 1e-5..1e-4 on VTAB-1k, the usual range for AdamW full fine-tuning of a ViT.
    recipe_lr_scale = 0.01
