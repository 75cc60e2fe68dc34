"""AdamW parameter groups: weight decay on matrices, none on biases, norms and the adapters' scales / vectors.

The rule (:func:`no_weight_decay`) is METHODS.md's "no weight decay on names containing bias or norm", plus every
1-d tensor and the adapter tensors named in :data:`NO_DECAY_LEAVES`. The grouping itself is timm's
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

# Adapter tensors that are per-channel scales / shifts or generator vectors: decaying them toward 0 would pull RLRR's
# rescaling and SSF's scale away from their meaning (SSF's scale toward 0, not 1) and AOFT's q off the unit sphere.
# Official RLRR (timm optimizer factory) skips every 1-d tensor; our s_col is stored [groups, in] and AOFT stacks
# q vectors, so they are named here. What decays: the head weight and LoRA's A/B matrices.
NO_DECAY_LEAVES = frozenset({"s_row", "s_col", "f", "ssf_scale", "ssf_shift", "q_up", "q_down", "lam"})


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim <= 1 or "bias" in name or "norm" in name or leaf in NO_DECAY_LEAVES


def param_groups(model: nn.Module, weight_decay: float) -> tuple[list[dict[str, Any]], list[str]]:
    """AdamW groups over the tensors that require grad (for an adapted model: adapter + head), and their names in
    group order (the checkpoint keys the optimiser state by name)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    skip = [n for n, p in trainable if no_weight_decay(n, p)]
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
    name_of = {id(p): n for n, p in trainable}
    names = [name_of[id(p)] for g in groups for p in g["params"]]
    return groups, names


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> tuple[torch.optim.Optimizer, list[str]]:
    """torch's AdamW over :func:`param_groups`; returns it and the parameter names in its group order."""
    groups, names = param_groups(model, weight_decay)
    return torch.optim.AdamW(groups, lr=lr), names
