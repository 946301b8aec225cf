"""LR schedules (diffusers' six standard ones, the 002 guide's list) and warmup as steps or ratio."""

from __future__ import annotations

from typing import Any, Literal

import torch
from diffusers.optimization import get_scheduler
from loraforge.errors import InputError

Schedule = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]


def warmup_steps(steps: int, ratio: float, total: int) -> int:
    """Warmup in optimizer steps: `steps` if set, else `ratio` × total (the 003 guide: 2-5% for Prodigy).

    Args:
        steps: `finetune.lr_warmup_steps`.
        ratio: `finetune.lr_warmup_ratio` (0 to 1).
        total: optimizer steps of the whole run.
    """
    if steps and ratio:
        raise InputError("set `finetune.lr_warmup_steps` or `finetune.lr_warmup_ratio`, not both")
    return steps if steps else round(ratio * total)


def make_lr_schedule(
    name: Schedule, optimizer: "torch.optim.Optimizer", warmup: int, total: int, num_cycles: int, power: float
) -> Any:
    """A LambdaLR over every param group (each keeps its own base LR).

    Args:
        name: `finetune.lr_scheduler`.
        optimizer: the optimizer.
        warmup: optimizer steps of linear warmup from 0.
        total: optimizer steps of the whole run.
        num_cycles: hard restarts of `cosine_with_restarts`.
        power: exponent of `polynomial` (1 = linear).
    """
    if name == "constant" and warmup:
        raise InputError(
            "`finetune.lr_scheduler: constant` has no warmup; "
            "use `constant_with_warmup` with `finetune.lr_warmup_steps`"
        )
    return get_scheduler(
        name, optimizer, num_warmup_steps=warmup, num_training_steps=total, num_cycles=num_cycles, power=power
    )
