"""The learning-rate schedule: linear warm-up from ``warmup_lr``, cosine to ``min_lr``, then ``min_lr`` (cool-down).

It is timm's :class:`timm.scheduler.CosineLRScheduler`, stepped per optimiser update (``t_in_epochs=False``,
``warmup_prefix=True``, one cycle: after it the rate stays at ``lr_min``, which is timm's cool-down). The schedule is
a pure function of the global step, which is what makes a resumed run bit-identical: :class:`Schedule` evaluates
timm's scheduler on a one-tensor placeholder optimiser of its own (``step_update(step)`` writes the rate there, we
read it back), so the run's optimiser never carries scheduler state (timm's ``initial_lr`` keys) into checkpoints and
nothing depends on the order in which steps were visited.

Extending a finished or resumed run (``--resume RUN --epochs N``, N larger) rebuilds the schedule for the new total:
the warm-up is unchanged (it is in the past) and the cosine is stretched to end at the new last epoch minus the
cool-down, so at the resume step the rate jumps from the old curve up to the new one and decays from there.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from timm.scheduler import CosineLRScheduler

if TYPE_CHECKING:
    from .config import RunConfig


class Schedule:
    """``schedule(step) -> lr`` for a run of ``epochs`` x ``steps_per_epoch`` optimiser steps."""

    def __init__(
        self,
        *,
        lr: float,
        steps_per_epoch: int,
        epochs: int,
        warmup_epochs: float,
        cooldown_epochs: int,
        warmup_lr: float,
        min_lr: float,
    ):
        self.warmup_steps = round(warmup_epochs * steps_per_epoch)
        decay_end = (epochs - cooldown_epochs) * steps_per_epoch
        self._placeholder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
        # A one-step cosine makes timm warn that it "will have no effect"; true, and not worth a log line here.
        quiet = logging.getLogger("timm.scheduler.cosine_lr")
        was, quiet.disabled = quiet.disabled, True
        try:
            self._timm = CosineLRScheduler(
                self._placeholder,
                t_initial=max(1, decay_end - self.warmup_steps),
                lr_min=min_lr,
                warmup_t=self.warmup_steps,
                warmup_lr_init=warmup_lr,
                warmup_prefix=True,
                cycle_limit=1,
                t_in_epochs=False,
            )
        finally:
            quiet.disabled = was

    def __call__(self, step: int) -> float:
        self._timm.step_update(step)
        return float(self._placeholder.param_groups[0]["lr"])


def schedule(cfg: RunConfig, steps_per_epoch: int) -> Schedule:
    """The schedule of a resolved config."""
    return Schedule(
        lr=cfg.lr,
        steps_per_epoch=steps_per_epoch,
        epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,
        cooldown_epochs=cfg.cooldown_epochs,
        warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr,
    )


def lr_at(step: int, **settings: Any) -> float:
    """The learning rate at one step of the schedule :class:`Schedule` builds from ``settings`` (its keywords; built
    each call: for tests and plots, not the loop)."""
    return Schedule(**settings)(step)
