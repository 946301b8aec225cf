"""finetune: full finetune of the UNet (and optionally the text encoders) on cached latents.

The 001 guide's workflow trains the whole model, then extracts a LoRA from the difference. The
loop in `train` reads top to bottom: plan the steps, load the model, then per step pick the
captions, encode them, add noise, predict, take the (weighted) loss against the target, step,
update the EMA. Noise, timesteps and caption augmentation come from (seed, global step), so a run
is reproducible step by step and a resumed run follows the uninterrupted one. A checkpoint of the
trained components (plus their EMA) is saved every `save_every_n_epochs` and after the last epoch.

With `num_processes` > 1 (or an `accelerate_config` file saying so, on one machine or several),
`run` spawns this machine's processes (`loraforge.training.launch`: gloo on CPU, NCCL on GPUs),
each training on its share of every epoch's batches with gradients all-reduced; only the first
process of machine 0 saves, and the report lists every process's final-weights hash.

Mode full can save memory with `fused_backward` (each parameter's optimizer steps inside
backward as its gradient completes) and `weights_dtype: bfloat16` (bf16 weights, float32 steps
rounded back stochastically): `loraforge.training.fused`; the loop reads the same either way.

The pieces live in `loraforge.training` and take the settings they need, not these params; the
second half of this module turns the params into those settings (check, plan, set up, prior
preservation, validation set, resume folder).
"""

from __future__ import annotations

import dataclasses
import shutil
from functools import partial
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from loraforge.data.buckets import BucketGrid
from loraforge.models.loading import ModelInfo, resolve_device, resolve_model
from loraforge.pipeline.runner import Paths, StageEnv
from loraforge.store.fingerprint import hash_json, hash_tree
from loraforge.training import data, prior, resume, validation
from loraforge.training.captions import CaptionSettings
from loraforge.training.checkpoints import SaveSettings, save_epoch, training_record
from loraforge.training.ema import EMA
from loraforge.training.fsdp import check_fsdp, full_states, shard
from loraforge.training.fused import PerParameterOptimizer, check_memory_savers
from loraforge.training.launch import LaunchConfig, launch, launch_config, same_run
from loraforge.training.lora_net import LoraSettings
from loraforge.training.losses import LossSettings, diffusion_loss
from loraforge.training.optimizers import applied_lrs, make_optimizer
from loraforge.training.progress import record_epoch, record_step, summary, write_tables
from loraforge.training.schedules import make_lr_schedule, warmup_steps
from loraforge.training.settings import ENCODER_NAMES, check_settings, component_lrs
from loraforge.training.setup import Training, load_models, make_accelerator, param_groups, prepare, trainable
from loraforge.training.step import StepSettings, check_finite, divergence_causes, gradient_sync
from loraforge.training.step import optimizer_step, step_generator
from loraforge.training.text_cache import conditioning, text_encode
from loraforge.training.validation import validation_row
from stages.finetune_params import Params

T = TypeVar("T")


def run(params: Params, inputs: Paths, outputs: Paths, env: StageEnv) -> dict[str, Any]:
    """Train in this process, or in several (`num_processes` or `accelerate_config`; see
    `loraforge.training.launch`).

    Args:
        params: the finetune params.
        inputs: `latents` and `captions` folders.
        outputs: `checkpoints` and `loss` folders (emptied by the runner).
        env: item store, state folder, publisher, progress bars.
    """
    root = env.state_dir.parent
    config = launch_config(
        params.accelerate_config, params.num_processes, params.mixed_precision, root, env.machine_rank
    )
    check_savers(params, config.world)  # fused backward and bf16 weights: one process, and more
    if config.world == 1:
        return train(params, inputs, outputs, env)
    if config.fsdp:  # what FSDP does not run with stops here, before any process starts
        check_fsdp(dataclasses.asdict(params), str(params.accelerate_config))
    params = dataclasses.replace(params, num_processes=config.world)  # the plan splits the batches by it
    return launch(partial(train, launch=config), config, params, inputs, outputs, env)


def train(
    params: Params, inputs: Paths, outputs: Paths, env: StageEnv, launch: LaunchConfig | None = None
) -> dict[str, Any]:
    """Train (as one process of `num_processes`): checkpoints to `outputs.checkpoints`, tables to `outputs.loss`.

    Args:
        params: the finetune params.
        inputs: `latents` and `captions` folders.
        outputs: `checkpoints` and `loss` folders (emptied by the runner).
        env: item store, state folder, publisher, progress bars.
        launch: the launch settings (FSDP or DDP) when one of several processes, else None.
    """
    device, reg = resolve_device(params.model.device), prior.reg_images_folder(params.reg_images, inputs, env.state_dir)
    check(params, device, reg)  # what cannot work stops here, before anything loads
    examples, held, plan = plan_steps(params, inputs, env)  # held: out of training, for the validation loss
    t = setup(params, device, plan["optimizer_steps"], env, launch)  # the model, what trains, optimizer, schedule, EMA
    # prior preservation: class latents (cached) from the base model before any weight moves, or from reg_images
    class_examples, reg_encoded = class_images(params, reg, plan["images"], t, inputs, env, device)
    s = step_settings(params, class_examples)
    val = partial(validate, t, s, validation_set(params, held, t, inputs, env, device), params.validation_timesteps)
    # resume: continue from the newest state of this exact run (params, model, data), else from step 0
    keep = resume_folder(params, inputs, reg, t.info, env.state_dir)  # None with `resume: off`
    progress = resume.restore(
        keep, t.trained, t.optimizer, t.lr_schedule, t.ema, t.precision.scaler, outputs.checkpoints
    )
    saving = save_settings(params, t, inputs)
    norms = {"keys_scaled": 0, "mean_norm": 0.0} if params.scale_weight_norms else {}  # logged per step
    rank, world = t.accelerator.process_index, t.accelerator.num_processes
    bar = env.bar(total=plan["steps"], initial=progress["global_step"], desc="finetune", unit="step")
    for epoch in range(progress["epoch"] + 1, params.epochs + 1):
        # this process's share of the epoch's batches, in an order set by (seed, epoch) alone
        batches = data.shard(data.epoch_batches(examples, params.batch_size, params.seed, epoch), rank, world)
        load = partial(data.load_batch, scaling_factor=t.info.scaling_factor, masked=params.masked_loss)
        epoch_losses = []
        for i, (batch, (latents, masks)) in enumerate(data.prefetch(batches, load)):  # masks None unless masked
            step = progress["global_step"]
            draw = step * world + rank  # this process's random stream (= step with one process)
            # step the optimizer every `gradient_accumulation` batches and at the end of the epoch
            sync = (i + 1) % params.gradient_accumulation == 0 or i + 1 == len(batches)
            with gradient_sync(t.accelerator, [t.unet, *t.encoders], sync):
                loss = forward(t, s, batch, latents, masks, draw, epoch)  # (), the batch's weighted loss
                check_finite(loss, step, epoch, s.causes)  # before backward: no NaN ever reaches the weights
                t.accelerator.backward(t.precision.scale(loss))
            applied = applied_lrs(t.optimizer)  # lr (or d·lr) this step uses
            if sync:
                applied, norms = optimizer_step(t, params.max_grad_norm, params.scale_weight_norms)
            epoch_losses.append(loss.item())
            record_step(progress, epoch, loss.item(), applied, norms)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{applied['unet']:.3g}")
            env.publish.progress(progress["global_step"] / plan["steps"], f"finetune epoch {epoch}/{params.epochs}")
        record_epoch(progress, epoch, epoch_losses)
        env.publish.table("epoch-loss", progress["epochs"], "Mean loss per epoch")
        if epoch % params.save_every_n_epochs == 0 or epoch == params.epochs:  # every process: FSDP gathers
            save(t, epoch, progress, saving, keep, outputs.checkpoints, val)
    bar.close()
    if t.accelerator.is_main_process:
        write_tables(outputs.loss, progress)
    t.accelerator.wait_for_everyone()
    return summary(t, plan, progress, len(s.prior), reg_encoded, params.mixed_precision, params.optimizer, saving.dtype)


def forward(
    t: Training,
    s: StepSettings,
    batch: list[dict[str, Any]],
    latents: torch.Tensor,
    masks: torch.Tensor | None,
    draw: int,
    epoch: int,
) -> torch.Tensor:
    """The step's loss (a scalar): augment the captions, encode them, noise the latents, predict,
    weigh the loss against the target; plus `prior_loss_weight` × the loss on a batch of class images.

    Args:
        t: the model and what trains.
        s: the step settings.
        batch: the examples of one bucket.
        latents: (B, 4, H/8, W/8) their latents, scaled, on the CPU.
        masks: (B, 1, H/8, W/8) their masks with `masked_loss`, else None.
        draw: this process's draw of the global step (the random source).
        epoch: 1-based epoch (caption dropout every n epochs).
    """
    latents = latents.to(t.accelerator.device, non_blocking=True)  # (B, 4, H/8, W/8)
    if s.channels_last:
        latents = latents.contiguous(memory_format=torch.channels_last)
    masks = masks.to(t.accelerator.device) if masks is not None else None  # (B, 1, H/8, W/8)
    captions = data.batch_captions(batch, s.captions, s.seed, draw, epoch)
    with torch.set_grad_enabled(t.trains_encoders):  # frozen encoders: no activations kept
        cond = conditioning(t.info.arch, t.encode, batch, captions, t.accelerator.device)  # hidden: (B, 77, D)
    with t.precision.autocast():  # noise, timesteps (B,) and the target come from the step's generator
        loss = diffusion_loss(t.unet, t.noise_scheduler, latents, cond, step_generator(s.seed, draw), s.loss, masks)
    if s.prior:  # the class keeps what the base model knew while the token learns the concept
        loss = loss + s.prior_loss_weight * prior.prior_loss(s.prior, t, draw, s.batch_size, s.seed, s.loss)
    return loss


def validate(
    t: Training, s: StepSettings, items: list[dict[str, Any]], k: int, epoch: int, progress: dict[str, Any]
) -> None:
    """Add the epoch's `validation.tsv` row (validation loss, with the EMA's too, and the epoch's
    train loss) to the progress; nothing when validation is off. Every process computes it.

    Args:
        t: the model.
        s: the step settings (the loss settings).
        items: the validation items (empty: off).
        k: `finetune.validation_timesteps`.
        epoch: the epoch just finished.
        progress: the loop's progress (its `validation` rows).
    """
    if items:
        row = validation_row(t, items, s.loss, k, epoch)
        progress.setdefault("validation", []).append({**row, "train_loss": progress["epochs"][-1]["loss"]})


def save(
    t: Training,
    epoch: int,
    progress: dict[str, Any],
    s: SaveSettings,
    keep: Path | None,
    outputs: Path,
    validate: Callable[[int, dict[str, Any]], None],
) -> None:
    """Validate (every process; the row goes into the resume state), then checkpoint `epoch-NNNN`
    into the outputs (the first process; under FSDP every process gathers the full weights
    first); with resume on, build it in the resume folder, hard-link it
    into the outputs, and save the full training state beside it.

    Args:
        t: the model and what trains.
        epoch: the epoch just finished.
        progress: the loop's progress (its `saved` list grows by this checkpoint).
        s: how to save, and the meta.json entries every checkpoint shares.
        keep: the run's resume folder, or None.
        outputs: the stage's checkpoints folder.
        validate: adds the epoch's validation row to the progress (`validate`, bound to its items).
    """
    validate(epoch, progress)
    states = full_states(t.trained, everywhere=False) if t.fsdp else None  # a collective
    if not t.accelerator.is_main_process:
        return
    name = f"epoch-{epoch:04d}"
    meta = {"epoch": epoch, "global_step": progress["global_step"], "loss": progress["epochs"][-1]["loss"], **s.about}
    save_epoch((keep / "checkpoints" if keep else outputs) / name, t.trained, t.ema, meta, s, states)
    progress["saved"].append(name)
    if keep is not None:  # built in the resume folder, hard-linked into the outputs
        resume.publish_checkpoint(keep / "checkpoints" / name, outputs)
    prune_checkpoints(progress, s.save_last_n_epochs, outputs, keep)
    if keep is not None:
        resume.save_state(keep, epoch, t.trained, t.optimizer, t.lr_schedule, t.ema, t.precision.scaler, progress)


def prune_checkpoints(progress: dict[str, Any], last_n: int | None, outputs: Path, keep: Path | None) -> None:
    """Remove the saved checkpoints before the newest `last_n` from the outputs and the resume
    folder, and from the progress (a resumed run then neither restores nor lists them).

    Args:
        progress: the loop's progress (`saved`: checkpoint names, oldest first).
        last_n: `finetune.save_last_n_epochs`, or None to keep every checkpoint.
        outputs: the stage's checkpoints folder.
        keep: the run's resume folder, or None.
    """
    if last_n is None or len(progress["saved"]) <= last_n:
        return
    for name in progress["saved"][:-last_n]:
        for folder in (outputs / name, keep / "checkpoints" / name if keep else None):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
        progress.setdefault("pruned", []).append(name)
    progress["saved"] = progress["saved"][-last_n:]


# --- the params as the settings loraforge.training takes ------------------------------------------


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
    examples = data.load_examples(inputs.latents, inputs.captions, params.repeats, params.keep_tokens_separator)
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
    trained = trainable(
        info.arch,
        modules,
        lrs,
        params.mode,
        pick(LoraSettings, params),
        params.gradient_checkpointing,
        params.unet_layers,
    )
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
