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

The pieces live in `loraforge.training` and take the settings they need, not these params;
`stages/finetune_settings.py` turns the params into those settings.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from loraforge.models import resolve_device
from loraforge.runner import Paths, StageEnv
from loraforge.training import data, prior, resume
from loraforge.training.checkpoints import SaveSettings, save_epoch
from loraforge.training.fsdp import check_fsdp, full_states
from loraforge.training.launch import LaunchConfig, launch, launch_config
from loraforge.training.losses import diffusion_loss
from loraforge.training.optimizers import applied_lrs
from loraforge.training.progress import record_epoch, record_step, summary, write_tables
from loraforge.training.setup import Training
from loraforge.training.step import StepSettings, check_finite, gradient_sync
from loraforge.training.step import optimizer_step, step_generator
from loraforge.training.text_cache import conditioning
from loraforge.training.validation import validation_row
from stages.finetune_params import Params
from stages.finetune_settings import check, check_savers, class_images, plan_steps, resume_folder, save_settings
from stages.finetune_settings import setup, step_settings, validation_set


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
        resume.save_state(keep, epoch, t.trained, t.optimizer, t.lr_schedule, t.ema, t.precision.scaler, progress)
