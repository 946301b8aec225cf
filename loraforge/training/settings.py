"""Settings checked before anything loads: combinations of finetune params that cannot work, and
the LR each trained component gets. Errors name the `finetune.` key."""

from __future__ import annotations

import torch

from loraforge.training.optimizers import ADAPTIVE, optimizer_class
from loraforge.errors import InputError

ENCODER_NAMES = ("text_encoder", "text_encoder_2")


def check_settings(
    device: torch.device,
    *,
    mixed_precision: str,
    optimizer: str,
    lr_scheduler: str,
    lr_warmup_steps: int,
    lr_warmup_ratio: float,
    mode: str,
    lora_only: dict[str, float],
    noise_offset: float,
    adaptive_noise_scale: float,
) -> None:
    """Refuse combinations that cannot work, before loading anything.

    Args:
        device: the training device.
        mixed_precision: `finetune.mixed_precision`.
        optimizer: `finetune.optimizer` (must import; 8-bit only where bitsandbytes runs).
        lr_scheduler: `finetune.lr_scheduler`.
        lr_warmup_steps: `finetune.lr_warmup_steps`.
        lr_warmup_ratio: `finetune.lr_warmup_ratio`.
        mode: `finetune.mode` (`full` or `lora`).
        lora_only: the params that apply to mode lora only, by key (`scale_weight_norms`, the dropouts).
        noise_offset: `finetune.noise_offset`.
        adaptive_noise_scale: `finetune.adaptive_noise_scale`.
    """
    check_precision(mixed_precision, device)
    optimizer_class(optimizer, device.type)  # importable, and 8-bit only on CUDA
    if lr_scheduler == "constant" and (lr_warmup_steps or lr_warmup_ratio):
        raise InputError(
            "`finetune.lr_scheduler: constant` has no warmup; "
            "use `constant_with_warmup` with `finetune.lr_warmup_steps`"
        )
    if lr_warmup_steps and lr_warmup_ratio:
        raise InputError("set `finetune.lr_warmup_steps` or `finetune.lr_warmup_ratio`, not both")
    if mode == "full" and any(lora_only.values()):
        key = next(k for k, v in lora_only.items() if v)
        raise InputError(f"`finetune.{key}` applies to `finetune.mode: lora` only (mode is `full`)")
    if adaptive_noise_scale and not noise_offset:
        raise InputError("`finetune.adaptive_noise_scale` needs `finetune.noise_offset` > 0")


def check_precision(mixed_precision: str, device: torch.device) -> None:
    """Say so when fp16 runs where it only costs time: CPUs have no fast fp16 matmul.

    Args:
        mixed_precision: `finetune.mixed_precision`.
        device: the training device.
    """
    if mixed_precision == "fp16" and device.type == "cpu":
        print("finetune: note: fp16 on CPU works (autocast + loss scaling) but is slower than `bf16` or `no` there")


def component_lrs(
    n_encoders: int,
    lr: float,
    optimizer: str,
    train_text_encoder: bool,
    text_encoder_lr: float | None,
    text_encoder_2_lr: float | None,
) -> dict[str, float]:
    """LR of each trained component: the UNet, then each text encoder whose LR is above 0.

    Args:
        n_encoders: 1 (SD1.5) or 2 (SDXL).
        lr: `finetune.lr`, the UNet's.
        optimizer: `finetune.optimizer` (adaptive ones need every LR equal to `lr` or 0).
        train_text_encoder: `finetune.train_text_encoder`.
        text_encoder_lr: `finetune.text_encoder_lr`; None = lr / 4 (= lr for adaptive optimizers).
        text_encoder_2_lr: `finetune.text_encoder_2_lr`; None = the first encoder's.
    """
    adaptive = optimizer in ADAPTIVE  # one step size d for all groups: LRs must match (or be 0)
    lrs = {"unet": lr}
    if train_text_encoder:
        te1 = (lr if adaptive else lr / 4) if text_encoder_lr is None else text_encoder_lr
        te2 = te1 if text_encoder_2_lr is None else text_encoder_2_lr
        lrs.update(zip(ENCODER_NAMES[:n_encoders], (te1, te2)))
    for name, group_lr in lrs.items():
        if adaptive and group_lr not in (0, lr):
            key = "text_encoder_lr" if name == "text_encoder" else "text_encoder_2_lr"
            raise InputError(
                f"`finetune.{key}` = {group_lr:g}: {optimizer} needs every LR equal to `finetune.lr` ({lr:g}) or 0"
            )
    return {name: group_lr for name, group_lr in lrs.items() if group_lr > 0}  # LR 0 freezes a text encoder
