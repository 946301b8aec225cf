"""The finetune params turned into the settings `loraforge.training` takes, and the steps of
stage finetune's `train` that read the params (check, plan, set up, prior preservation, resume
folder): the loop in `stages/finetune.py` calls these and reads top to bottom."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import torch

from loraforge.fingerprint import hash_json, hash_tree
from loraforge.models import ModelInfo, resolve_model
from loraforge.runner import Paths, StageEnv
from loraforge.buckets import BucketGrid
from loraforge.training import data, prior, resume, validation
from loraforge.training.captions import CaptionSettings
from loraforge.training.checkpoints import SaveSettings, training_record
from loraforge.training.ema import EMA
from loraforge.training.fused import PerParameterOptimizer, check_memory_savers
from loraforge.training.fsdp import shard
from loraforge.training.launch import LaunchConfig, same_run
from loraforge.training.lora_net import LoraSettings
from loraforge.training.losses import LossSettings
from loraforge.training.optimizers import make_optimizer
from loraforge.training.schedules import make_lr_schedule, warmup_steps
from loraforge.training.settings import ENCODER_NAMES, check_settings, component_lrs
from loraforge.training.setup import Training, load_models, make_accelerator, param_groups, prepare, trainable
from loraforge.training.step import StepSettings, divergence_causes
from loraforge.training.text_cache import text_encode
from stages.finetune_params import Params

T = TypeVar("T")


def pick(cls: type[T], params: Params, **given: Any) -> T:
    """A frozen settings dataclass of `loraforge.training`: the `given` fields as passed, every
    other field from the param of the same name (`LossSettings`, `LoraSettings` are params only).

    Args:
        cls: the settings dataclass.
        params: the finetune params.
        **given: the fields that are not a param as such (a resolved folder, nested settings).
    """
    own = {f.name: getattr(params, f.name) for f in dataclasses.fields(cls) if f.name not in given}  # type: ignore[arg-type]
    return cls(**own, **given)


def caption_settings(params: Params) -> CaptionSettings:
    """The caption-augmentation part of the params.

    Args:
        params: the finetune params.
    """
    return CaptionSettings(
        shuffle=params.shuffle_caption,
        keep_tokens=params.keep_tokens,
        tag_dropout_rate=params.caption_tag_dropout_rate,
        dropout_rate=params.caption_dropout_rate,
        dropout_every_n_epochs=params.caption_dropout_every_n_epochs,
    )


def check(params: Params, device: torch.device, reg: Path | None) -> None:
    """Refuse combinations of params that cannot work, and a missing or empty `reg_images` folder.

    Args:
        params: the finetune params.
        device: the training device.
        reg: the resolved `reg_images` folder, or None.
    """
    lora_only = ("scale_weight_norms", "network_dropout", "rank_dropout", "module_dropout")
    check_settings(
        device,
        mixed_precision=params.mixed_precision,
        optimizer=params.optimizer,
        lr_scheduler=params.lr_scheduler,
        lr_warmup_steps=params.lr_warmup_steps,
        lr_warmup_ratio=params.lr_warmup_ratio,
        mode=params.mode,
        lora_only={key: getattr(params, key) for key in lora_only},
        noise_offset=params.noise_offset,
        adaptive_noise_scale=params.adaptive_noise_scale,
    )
    if reg is not None:
        prior.reg_image_files(reg)


def plan_steps(
    params: Params, inputs: Paths, env: StageEnv
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """The training examples, the held-out ones (`finetune.validation_split`; none when off) and
    the steps plan (`loraforge.training.data.plan`) of the training ones, printed and published;
    a missing or empty `validation_folder` is refused.

    Args:
        params: the finetune params.
        inputs: `latents` and `captions` folders (and `validation_folder` when declared).
        env: the publisher and state folder.
    """
    examples = data.load_examples(inputs.latents, inputs.captions, params.repeats)
    examples, held = validation.split_examples(examples, params.validation_split)
    folder = prior.reg_images_folder(params.validation_folder, inputs, env.state_dir, "validation_folder")
    if folder is not None:  # a missing or empty folder stops here, before the model loads
        prior.reg_image_files(folder, "validation_folder")
    plan = data.plan(
        examples, params.batch_size, params.epochs, params.gradient_accumulation, params.num_processes, params.seed
    )
    print(
        f"finetune: {plan['images']} images, {plan['examples_per_epoch']} examples/epoch, batch {params.batch_size}, "
        f"{params.epochs} epochs -> {plan['steps']} steps ({plan['optimizer_steps']} optimizer steps), "
        f"{params.optimizer}"
    )
    if params.masked_loss:
        print(f"finetune: masked loss: {plan['masked_images']} of {plan['images']} images have a mask")
        if not plan["masked_images"]:
            print("finetune: WARNING: `finetune.masked_loss` is on but no image has a mask: training unmasked")
    if held:
        print(f"finetune: {len({e['id'] for e in held})} images held out for the validation loss")
    env.publish.table("plan", [plan], "Training plan")
    return examples, held, plan


def setup(
    params: Params, device: torch.device, optimizer_steps: int, env: StageEnv, launch: LaunchConfig | None
) -> Training:
    """Load the model and set up what trains: the UNet always, each text encoder when its LR is
    above 0 (whole in mode full, a LoRA network on it in mode lora; sharded under FSDP), the
    optimizer, LR schedule, EMA.

    Args:
        params: the finetune params.
        device: the training device.
        optimizer_steps: optimizer steps of the whole run (the schedule's length).
        env: item store and state folder (model resolution, text-encoder cache).
        launch: the launch settings (FSDP or DDP), or None for one process.
    """
    torch.manual_seed(params.seed)
    fsdp = launch is not None and launch.fsdp
    info = resolve_model(params.model, env.state_dir)
    accelerator, precision = make_accelerator(params.mixed_precision, params.gradient_accumulation, device)
    unet, tokenizers, encoders, noise_scheduler = load_models(
        info, accelerator.device, params.channels_last, params.compile
    )
    encoder_lrs = (params.train_text_encoder, params.text_encoder_lr, params.text_encoder_2_lr)
    lrs = component_lrs(len(encoders), params.lr, params.optimizer, *encoder_lrs)
    modules = {"unet": unet, **dict(zip(ENCODER_NAMES, encoders))}
    trained = trainable(info.arch, modules, lrs, params.mode, pick(LoraSettings, params), params.gradient_checkpointing)
    if fsdp:  # before the optimizer: it must hold the sharded parameters
        shard(trained, launch.reshard_after_forward)  # type: ignore[union-attr]
    optimizer = training_optimizer(params, trained, lrs, device)  # bf16 weights: the components cast first
    warmup = warmup_steps(params.lr_warmup_steps, params.lr_warmup_ratio, optimizer_steps)
    cycles, power = params.lr_scheduler_num_cycles, params.lr_scheduler_power
    lr_schedule = make_lr_schedule(params.lr_scheduler, optimizer, warmup, optimizer_steps, cycles, power)
    unet, encoders, optimizer, lr_schedule = prepare(
        accelerator, params.mode, unet, encoders, trained, optimizer, lr_schedule, fsdp
    )
    ema = EMA(trained, params.ema_decay) if params.ema_decay else None
    # a caption always encodes to the same tensors when no encoder trains and captions are not randomised
    cached = not any(name in trained for name in ENCODER_NAMES) and not caption_settings(params).randomised
    encode = text_encode(info, tokenizers, encoders, cached, env.store, env.state_dir, accelerator.device)
    return Training(
        accelerator,
        precision,
        info,
        params.mode,
        unet,
        encoders,
        noise_scheduler,
        encode,
        trained,
        lrs,
        optimizer,
        lr_schedule,
        ema,
        fsdp,
    )


def training_optimizer(
    params: Params, trained: dict[str, torch.nn.Module], lrs: dict[str, float], device: torch.device
) -> Any:
    """The optimizer over one param group per trained component: the configured one, or with
    `fused_backward` or bf16 weights a `PerParameterOptimizer` of it (`loraforge.training.fused`),
    after casting the trained components to bf16 with `weights_dtype: bfloat16`.

    Args:
        params: the finetune params.
        trained: component -> what trains.
        lrs: component -> LR.
        device: the training device.
    """
    bf16 = params.weights_dtype == "bfloat16"
    if bf16:
        for module in trained.values():
            torch.nn.Module.to(module, torch.bfloat16)  # diffusers' own `to` warns about a dtype cast

    def make(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return make_optimizer(params.optimizer, groups, params.optimizer_args, params.weight_decay, device.type)

    groups = param_groups(trained, lrs)
    if not (params.fused_backward or bf16):
        return make(groups)
    clip, rounding = params.max_grad_norm if params.fused_backward else 0.0, params.stochastic_rounding
    return PerParameterOptimizer(groups, make, params.fused_backward, clip, rounding, params.seed)


def check_savers(params: Params, world: int) -> None:
    """Refuse what fused backward or bf16 weights cannot run with (`check_memory_savers`).

    Args:
        params: the finetune params.
        world: the training processes of the launch.
    """
    keys = ("fused_backward", "weights_dtype", "mode", "optimizer", "gradient_accumulation", "mixed_precision")
    check_memory_savers(**{key: getattr(params, key) for key in keys}, world=world)


def step_settings(params: Params, class_examples: list[dict[str, Any]]) -> StepSettings:
    """What every step reads: seed, layout, captions, loss, prior preservation, the guard's causes.

    Args:
        params: the finetune params.
        class_examples: prior preservation's class examples (empty: off).
    """
    causes = divergence_causes(params.lr, params.optimizer, params.mixed_precision, params.optimizer_args)
    loss = pick(LossSettings, params)
    return pick(StepSettings, params, captions=caption_settings(params), loss=loss, prior=class_examples, causes=causes)


def save_settings(params: Params, t: Training, inputs: Paths) -> SaveSettings:
    """How checkpoints are saved, and the meta.json entries they share (the dataset hash among them).
    With several processes (a collective), first check that all of them, on every machine, train
    with the same params on the same data.

    Args:
        params: the finetune params.
        t: the model and what trains (arch, base, EMA).
        inputs: `latents` and `captions` folders (the dataset hash).
    """
    dataset_hash = hash_json({"latents": hash_tree(inputs.latents), "captions": hash_tree(inputs.captions)})
    same_run(t.accelerator, {"params": dataclasses.asdict(params), "data": dataset_hash})  # on every machine
    about = {"arch": t.info.arch, "base": t.info.source, "ema": t.ema is not None, "mode": params.mode}
    about.update(dataset_hash=dataset_hash, **training_record(dataclasses.asdict(params)))
    lora = pick(LoraSettings, params)
    dtype = getattr(torch, params.save_dtype)
    return pick(SaveSettings, params, dtype=dtype, arch=t.info.arch, lora=lora, about=about, model=t.info)


def resume_folder(params: Params, inputs: Paths, reg: Path | None, info: ModelInfo, state_dir: Path) -> Path | None:
    """This run's resume folder (`loraforge.training.resume.resume_folder`), None with `resume: off`.

    Args:
        params: the finetune params (all but `resume` go into the fingerprint).
        inputs: `latents` and `captions` folders (and `validation_folder` when declared).
        reg: the resolved `reg_images` folder, or None.
        info: the resolved model.
        state_dir: loraforge's private folder.
    """
    if params.resume != "auto":
        return None
    val = prior.reg_images_folder(params.validation_folder, inputs, state_dir, "validation_folder")
    return resume.resume_folder(dataclasses.asdict(params), inputs.latents, inputs.captions, reg, info, state_dir, val)


def class_images(
    params: Params,
    reg: Path | None,
    images: int,
    t: Training,
    inputs: Paths,
    env: StageEnv,
    device: torch.device,
) -> tuple[list[dict[str, Any]], int]:
    """Prior preservation's class examples (`loraforge.training.prior.class_examples`; none when
    off) and how many reg images were encoded now.

    Args:
        params: the finetune params.
        reg: the resolved `reg_images` folder, or None.
        images: distinct training images (the 002 guide's class image count).
        t: the model (the base model's identity).
        inputs: the `latents` folder (its bucket grid).
        env: item store and state folder.
        device: where to generate or encode.
    """
    settings = pick(prior.PriorSettings, params, reg_images=reg)
    return prior.class_examples(settings, images, t.info, inputs.latents, env.store, env.state_dir, device)


def validation_set(
    params: Params, held: list[dict[str, Any]], t: Training, inputs: Paths, env: StageEnv, device: torch.device
) -> list[dict[str, Any]]:
    """The validation items (`loraforge.training.validation`): the held-out examples' latents, or
    the `validation_folder` images VAE-encoded through the item store (as `reg_images` are); none when off.

    Args:
        params: the finetune params.
        held: the held-out examples (`plan_steps`).
        t: the model (its identity and latent scale).
        inputs: the `latents` folder (its bucket grid), `validation_folder` when declared.
        env: item store and state folder.
        device: where to encode.
    """
    folder = prior.reg_images_folder(params.validation_folder, inputs, env.state_dir, "validation_folder")
    if folder is None:
        return validation.held_out_items(held, t.info.scaling_factor)
    grid = BucketGrid.load(inputs.latents)
    return prior.reg_latents(t.info, folder, grid, env.store, env.state_dir, device, "validation_folder")[0]
