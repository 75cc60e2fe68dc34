"""AdamW parameter groups: weight decay on matrices, none on biases, norms and the adapters' scales / vectors.

Which tensors skip decay is each method's decision, made in its module and collected by
:func:`peftx.adapter.split_weight_decay` (the recipe's "no weight decay on names containing bias or norm", every 1-d
tensor, and the adapter tensors each method names). The grouping itself is timm's
:func:`timm.optim.param_groups_weight_decay`, given our decisions as its ``no_weight_decay_list`` (exact names): its
own built-in rule (1-d tensors and names ending in ``.bias``) is a subset of ours, but on its own it would decay
names that merely contain ``norm`` and our 2-d adapter tensors (RLRR's ``s_col`` is stored [groups, in], AOFT stacks
its q vectors), so it cannot be used without the list. The benchmarks build their optimisers here too.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from ..adapter import split_weight_decay


def param_groups(model: nn.Module, weight_decay: float) -> tuple[list[dict[str, Any]], list[str]]:
    """AdamW groups over the tensors that require grad (for an adapted model: adapter + head), and their names in
    group order (the checkpoint keys the optimiser state by name).

    Which tensors decay is the method's decision (:func:`peftx.adapter.split_weight_decay`, through the method
    registry); timm only does the grouping, and we check it agrees with that decision.
    """
    decay, no_decay = split_weight_decay(model)
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay)
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    names = [trainable[id(p)] for g in groups for p in g["params"]]
    decayed = {trainable[id(p)] for g in groups if g["weight_decay"] for p in g["params"]}
    if (weight_decay and decayed != set(decay)) or set(names) != set(decay) | set(no_decay):
        raise RuntimeError(
            f"optimiser groups disagree with the method's weight-decay split: {sorted(decayed ^ set(decay))[:5]}"
        )
    return groups, names


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> tuple[torch.optim.Optimizer, list[str]]:
    """torch's AdamW over :func:`param_groups`; returns it and the parameter names in its group order."""
    groups, names = param_groups(model, weight_decay)
    return torch.optim.AdamW(groups, lr=lr), names
