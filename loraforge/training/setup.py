"""Training setup: the accelerator, the base model's components, what trains (whole components in
mode full, LoRA networks on them in mode lora) and accelerate's wrapping, gathered in one
`Training` that the loop steps with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs

from loraforge.models.kohya_names import unet_targets
from loraforge.models.loading import ModelInfo, load_noise_scheduler, load_text_encoders, load_unet
from loraforge.training.ema import EMA
from loraforge.training.lora_net import LoraSettings, add_lora
from loraforge.training.precision import MixedPrecision, accelerate_mode
from loraforge.training.settings import ENCODER_NAMES
from loraforge.training.text_cache import Encode


@dataclass
class Training:
    """What the loop trains with, built once before the first step.

    Attributes:
        accelerator: the Accelerator (process index and count, backward, gradient sync, clipping).
        precision: autocast and fp16 loss scaling.
        info: the resolved base model (arch, latent scaling factor).
        mode: `finetune.mode`: `full` or `lora`.
        unet: the UNet as accelerate prepared it (DDP-wrapped when it trains on several processes).
        encoders: the text encoders, prepared likewise.
        noise_scheduler: the base model's DDPM noise scheduler.
        encode: captions -> (hidden, pooled): the live encoders, or their cached outputs.
        trained: component -> what trains: the unwrapped module (mode full) or its LoRA network.
        lrs: component -> LR, in the optimizer's group order.
        optimizer: one param group per trained component.
        lr_schedule: the LR schedule (one step per optimizer step).
        ema: the EMA of the trained weights, or None.
        fsdp: the trained components are sharded with FSDP2 (`loraforge.training.fsdp`).
    """

    accelerator: Accelerator
    precision: MixedPrecision
    info: ModelInfo
    mode: str
    unet: Any
    encoders: list[Any]
    noise_scheduler: Any
    encode: Encode
    trained: dict[str, torch.nn.Module]
    lrs: dict[str, float]
    optimizer: Any
    lr_schedule: Any
    ema: EMA | None
    fsdp: bool = False

    @property
    def trains_encoders(self) -> bool:
        """Whether a text encoder (or its LoRA) trains: then captions encode with gradients."""
        return any(name in self.lrs for name in ENCODER_NAMES)


def make_accelerator(
    mixed_precision: str, gradient_accumulation: int, device: torch.device
) -> tuple[Accelerator, MixedPrecision]:
    """A fresh Accelerator and the run's mixed precision.

    Args:
        mixed_precision: `finetune.mixed_precision` (fp16 is scaled by `MixedPrecision`, not accelerate).
        gradient_accumulation: `finetune.gradient_accumulation`.
        device: the training device (`cpu` makes accelerate run on the CPU).
    """
    AcceleratorState._reset_state(reset_partial_state=True)  # the Prefect runner trains in-process, maybe repeatedly
    accelerator = Accelerator(
        mixed_precision=accelerate_mode(mixed_precision),
        gradient_accumulation_steps=gradient_accumulation,
        cpu=device.type == "cpu",
        step_scheduler_with_optimizer=False,  # one schedule step per optimizer step, whatever the process count
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )  # e.g. SD1.5's unused pooled output
    return accelerator, MixedPrecision(mixed_precision, accelerator.device, accelerator)


def load_models(
    info: ModelInfo, device: torch.device, channels_last: bool, compile: bool
) -> tuple[Any, list[Any], list[Any], Any]:
    """The UNet, the tokenizers, the text encoders and the noise scheduler of the base model.

    Args:
        info: the resolved base model.
        device: where the weights go.
        channels_last: `finetune.channels_last`: UNet weights in channels-last memory format.
        compile: `finetune.compile`: compile the UNet's forward (in place: state_dict keys stay
            free of `_orig_mod.`).
    """
    unet = load_unet(info, device)
    pairs = load_text_encoders(info, device)
    tokenizers, encoders = [t for t, _ in pairs], [e for _, e in pairs]
    noise_scheduler = load_noise_scheduler(info)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if compile:
        unet.compile(dynamic=False)  # one graph per bucket shape: few buckets, and inductor needs static shapes here
    return unet, tokenizers, encoders, noise_scheduler


def trainable(
    arch: str,
    modules: dict[str, torch.nn.Module],
    lrs: dict[str, float],
    mode: str,
    lora: LoraSettings,
    gradient_checkpointing: bool,
    unet_layers: str = "all",
) -> dict[str, torch.nn.Module]:
    """Set what trains and return it by component: the component itself (mode full) or a LoRA
    network attached to it (mode lora). Components without an LR are frozen; in mode full,
    `unet_layers` other than `all` keeps the UNet's weights a LoRA cannot carry frozen.

    Args:
        arch: `sd15` or `sdxl`.
        modules: component name -> loaded module.
        lrs: component name -> LR (from `component_lrs`).
        mode: `finetune.mode`.
        lora: ranks, alphas and dropouts of the LoRA networks (mode lora).
        gradient_checkpointing: `finetune.gradient_checkpointing`, on every component.
        unet_layers: `finetune.unet_layers`: `all`, `lora` or `lora_conv`.
    """
    for name, module in modules.items():
        module.train(name in lrs and mode == "full")
        module.requires_grad_(name in lrs and mode == "full")
        if name == "unet" and name in lrs and mode == "full" and unet_layers != "all":
            train_only_lora_targets(module, conv=unet_layers == "lora_conv")
        if gradient_checkpointing:
            if name == "unet":
                module.enable_gradient_checkpointing()
            else:  # transformers 5 renamed the method; 4.x has only the old name
                (getattr(module, "activation_checkpointing_enable", None) or module.gradient_checkpointing_enable)()
    if mode == "full":
        return {name: modules[name] for name in lrs}
    return {name: add_lora(modules[name], arch, name, lora).train() for name in lrs}


def train_only_lora_targets(unet: torch.nn.Module, conv: bool) -> int:
    """Freeze the UNet but the weights of the modules a kohya LoRA carries; return how many
    weight tensors train.

    Args:
        unet: the UNet, all of it trainable before the call.
        conv: also the ResNet/resampler convolutions (`unet_layers: lora_conv`).
    """
    unet.requires_grad_(False)
    targets = unet_targets(unet.state_dict().keys(), conv=conv)
    for name in targets:
        unet.get_submodule(name).weight.requires_grad_(True)
    return len(targets)


def param_groups(trained: dict[str, torch.nn.Module], lrs: dict[str, float]) -> list[dict[str, Any]]:
    """One optimizer param group per trained component, named after it, with its LR (frozen
    weights of a partly trained component left out).

    Args:
        trained: component -> what trains.
        lrs: component -> LR.
    """
    return [
        {"name": name, "params": [p for p in trained[name].parameters() if p.requires_grad], "lr": lr}
        for name, lr in lrs.items()
    ]


def prepare(
    accelerator: Accelerator,
    mode: str,
    unet: Any,
    encoders: list[Any],
    trained: dict[str, torch.nn.Module],
    optimizer: Any,
    lr_schedule: Any,
    fsdp: bool = False,
) -> tuple[Any, list[Any], Any, Any]:
    """Hand the models, optimizer and schedule to accelerate; return them wrapped.

    With several processes DDP wraps only the modules that train in mode full (a frozen module
    has nothing to all-reduce, and DDP refuses it); LoRA networks have no forward for DDP to hook,
    so their gradients are averaged in `optimizer_step` instead.

    Args:
        accelerator: the Accelerator.
        mode: `finetune.mode`.
        unet: the UNet.
        encoders: the text encoders.
        trained: the trained modules (or LoRA networks) by component.
        optimizer: the optimizer.
        lr_schedule: the LR schedule.
        fsdp: the trained modules are already sharded (FSDP2 syncs their gradients itself): no DDP.
    """
    if accelerator.num_processes == 1:
        unet, optimizer, lr_schedule, *encoders = accelerator.prepare(unet, optimizer, lr_schedule, *encoders)
        return unet, encoders, optimizer, lr_schedule
    optimizer, lr_schedule = accelerator.prepare(optimizer, lr_schedule)
    if mode == "full" and not fsdp:
        wrapped = accelerator.prepare(*trained.values())  # one object back for one argument
        ddp = dict(zip(trained, wrapped if isinstance(wrapped, tuple) else (wrapped,)))
        unet, encoders = ddp["unet"], [ddp.get(name, e) for name, e in zip(ENCODER_NAMES, encoders)]
    return unet, encoders, optimizer, lr_schedule
