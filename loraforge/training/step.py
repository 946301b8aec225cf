"""A training step's settings and the pieces around its forward pass: the random source, the
divergence guard, gradient sync under accumulation, and the optimizer step (unscale, clip, step,
schedule, LoRA max-norm, EMA)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from loraforge.training.captions import CaptionSettings
from loraforge.training.lora_net import LoRANetwork, scale_weight_norms
from loraforge.training.losses import LossSettings
from loraforge.training.optimizers import applied_lrs
from loraforge.training.setup import Training
from loraforge.errors import Diverged


@dataclass(frozen=True)
class StepSettings:
    """What every step reads besides the batch and the model.

    Attributes:
        seed: `finetune.seed` (with the step: noise, timesteps and caption draws).
        channels_last: `finetune.channels_last`: latents in channels-last memory format.
        batch_size: `finetune.batch_size` (also the class images per step).
        prior_loss_weight: `finetune.prior_loss_weight`.
        captions: caption augmentation.
        loss: loss and noise settings.
        prior: the class examples of prior preservation (empty: off).
        causes: what the divergence guard names when the loss is NaN/inf (`divergence_causes`).
    """

    seed: int
    channels_last: bool
    batch_size: int
    prior_loss_weight: float
    captions: CaptionSettings
    loss: LossSettings
    prior: list[dict[str, Any]]
    causes: list[str]


def step_generator(seed: int, step: int) -> torch.Generator:
    """Noise and timesteps of step `step` depend only on (seed, step): resumable and reproducible.

    Args:
        seed: `finetune.seed`.
        step: the global step (this process's draw of it).
    """
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def divergence_causes(lr: float, optimizer: str, mixed_precision: str, optimizer_args: dict[str, Any]) -> list[str]:
    """What most likely made a loss NaN/inf with these settings, most likely first.

    Args:
        lr: `finetune.lr`.
        optimizer: `finetune.optimizer`.
        mixed_precision: `finetune.mixed_precision`.
        optimizer_args: `finetune.optimizer_args`.
    """
    causes = [
        f"`finetune.lr` = {lr:g} too high for `{optimizer}` (the 001 guide: 1e-6 for AdamW on SDXL, 1e-7 for Lion)"
    ]
    if mixed_precision == "fp16":
        causes.insert(
            0,
            "fp16 overflow: use `finetune.mixed_precision: bf16` (or `no`), "
            "and encode latents with the VAE in float32 ('no half VAE')",
        )
    if optimizer_args:
        causes.append(f"`finetune.optimizer_args` = {optimizer_args}")
    return causes


def check_finite(loss: torch.Tensor, step: int, epoch: int, causes: list[str]) -> None:
    """The divergence guard: a NaN/inf loss stops training at once, with the likely causes.

    Args:
        loss: the step's loss.
        step: the global step (0-based).
        epoch: the epoch (1-based).
        causes: from `divergence_causes`.
    """
    if torch.isfinite(loss):
        return
    raise Diverged(
        f"finetune: loss is {loss.item()} at step {step} (epoch {epoch}); training stopped, "
        "nothing saved for this epoch. Likely causes: " + "; ".join(causes)
    )


def gradient_sync(accelerator: Any, models: list[Any], sync: bool) -> contextlib.ExitStack:
    """A context: gradients all-reduced across processes only on `sync` steps (DDP's no_sync otherwise).

    Args:
        accelerator: the Accelerator.
        models: the prepared models.
        sync: whether this batch ends an accumulation group.
    """
    stack = contextlib.ExitStack()
    if not sync:
        for model in models:
            stack.enter_context(accelerator.no_sync(model))
    return stack


def optimizer_step(t: Training, max_grad_norm: float, max_norm: float) -> tuple[dict[str, float], dict[str, float]]:
    """Unscale (fp16), clip, step (skipped on fp16 overflow), advance the schedule, clear
    gradients, cap LoRA norms, update the EMA.

    Returns the LR each group applied (d·lr for adaptive optimizers, which set d inside step())
    and, with `max_norm`, the layers scaled and the mean update norm.

    Args:
        t: the training objects (accelerator, precision, optimizer, schedule, what trains, EMA).
        max_grad_norm: `finetune.max_grad_norm`; 0 = no clipping.
        max_norm: `finetune.scale_weight_norms` (mode lora); 0 = off.
    """
    if t.accelerator.num_processes > 1 and t.mode == "lora":  # LoRA networks have no forward for DDP to hook
        for p in (p for m in t.trained.values() for p in m.parameters() if p.grad is not None):
            p.grad = t.accelerator.reduce(p.grad, reduction="mean")
    t.precision.unscale(t.optimizer)  # clip the true gradients, not the scaled ones
    if max_grad_norm > 0:
        t.accelerator.clip_grad_norm_([p for m in t.trained.values() for p in m.parameters()], max_grad_norm)
    stepped = t.precision.step(t.optimizer)
    applied = applied_lrs(t.optimizer)
    t.lr_schedule.step()  # also on a skipped fp16 step: the schedule follows the step count
    t.optimizer.zero_grad(set_to_none=True)
    norms = {}
    if max_norm and stepped:  # max-norm on each LoRA update (mode lora)
        networks: list[LoRANetwork] = list(t.trained.values())  # type: ignore[arg-type]
        norms = dict(zip(("keys_scaled", "mean_norm"), scale_weight_norms(networks, max_norm)))
    if t.ema is not None and stepped:
        t.ema.update()
    return applied, norms
