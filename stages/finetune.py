"""finetune: full finetune of the UNet (and optionally the text encoders) on cached latents.

The 001 guide's workflow trains the whole model, then extracts a LoRA from the difference. The
loop reads top to bottom: plan the steps, load the model, then per step encode captions, add
noise, predict, take the MSE against the target, step. Noise and timesteps come from a generator
seeded with (seed, global step), so a run is reproducible step by step. A checkpoint of the
trained components is saved every `save_every_n_epochs` and after the last epoch.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from loraforge.params import ModelParams, section

if TYPE_CHECKING:
    import torch

    from loraforge.runner import Paths, StageEnv


@section
class Params:
    """The `finetune` section (guide figures are the 001 guide's SDXL recipe).

    Attributes:
        epochs: passes over the (repeated) dataset; the guide trains 100.
        batch_size: images per step (same bucket); the guide: 1, with accumulation 3.
        gradient_accumulation: steps whose gradients are summed before one optimizer step.
        repeats: multiplies each image's folder repeats (`N_name` folders); the guide: 2.
        lr: UNet learning rate; the guide: 1e-6 (AdamW, constant). The tiny demo model needs ~3e-4.
        train_text_encoder: also train the text encoder(s).
        text_encoder_lr: null = lr / 4 (the 000 guide: a quarter to a sixth of the UNet's).
        lr_scheduler: `constant` or `cosine`, after `lr_warmup_steps` of linear warmup.
        lr_warmup_steps: optimizer steps of linear warmup.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient clipping norm (0 disables).
        mixed_precision: `fp16` / `bf16` autocast on GPU (`bf16` also works on CPU); `no` = float32.
        gradient_checkpointing: trade compute for memory in the UNet and text encoders.
        save_every_n_epochs: checkpoint interval; the last epoch is always saved.
        save_dtype: dtype of saved checkpoints (float16 halves disk; extraction works in float32).
        seed: seeds data order, noise and timesteps.
        noise_offset: adds offset noise (per-channel constant) of this strength; 0 disables.
    """

    model: ModelParams
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(1, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    repeats: int = Field(1, ge=1)
    lr: float = Field(1e-6, gt=0, le=1)
    train_text_encoder: bool = False
    text_encoder_lr: float | None = Field(None, ge=0, le=1)
    lr_scheduler: Literal["constant", "cosine"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(1e-2, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    save_every_n_epochs: int = Field(1, ge=1)
    save_dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    seed: int = 42
    noise_offset: float = Field(0.0, ge=0)


# ---------------------------------------------------------------- data


def load_examples(latents_dir: Path, captions_dir: Path, repeats: int) -> list[dict[str, Any]]:
    """One example per latent (flipped copies included), joined with its caption, repeated."""
    from loraforge.images import read_jsonl

    captions = {row["id"]: row["caption"] for row in read_jsonl(captions_dir / "manifest.jsonl")}
    examples = []
    for row in read_jsonl(latents_dir / "manifest.jsonl"):
        if row["id"] not in captions:
            raise ValueError(f"latent {row['file']} has no caption in {captions_dir / 'manifest.jsonl'}")
        example = {**row, "path": latents_dir / row["file"], "caption": captions[row["id"]]}
        examples += [example] * (row.get("repeats", 1) * repeats)
    if not examples:
        raise ValueError(f"no training examples in {latents_dir}")
    return examples


def epoch_batches(examples: list[dict[str, Any]], batch_size: int, seed: int, epoch: int) -> list[list[dict[str, Any]]]:
    """Shuffled batches for one epoch; a batch holds one bucket only (latents must stack)."""
    order = list(range(len(examples)))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    by_bucket: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for i in order:
        by_bucket[tuple(examples[i]["bucket"])].append(examples[i])
    batches = [group[s : s + batch_size] for group in by_bucket.values() for s in range(0, len(group), batch_size)]
    random.Random(seed * 100_003 + epoch + 1).shuffle(batches)
    return batches


def plan(examples: list[dict[str, Any]], params: Params) -> dict[str, Any]:
    """The steps arithmetic (000 guide): steps ≈ images × repeats / batch × epochs, and the exact
    count given that a batch never mixes buckets."""
    batches = len(epoch_batches(examples, params.batch_size, params.seed, 0))
    images = len({e["id"] for e in examples})
    return {
        "images": images,
        "examples_per_epoch": len(examples),
        "formula_steps": math.ceil(len(examples) / params.batch_size) * params.epochs,
        "steps_per_epoch": batches,
        "steps": batches * params.epochs,
        "optimizer_steps": math.ceil(batches / params.gradient_accumulation) * params.epochs,
    }


def load_latents(batch: list[dict[str, Any]], scaling_factor: float) -> "torch.Tensor":
    """(B, 4, h, w) latents scaled for the UNet."""
    import torch
    from safetensors.torch import load_file

    return torch.stack([load_file(str(e["path"]))["latent"] for e in batch]) * scaling_factor


# ---------------------------------------------------------------- model


def check_precision(mixed_precision: str, device: "torch.device") -> None:
    """fp16 autocast needs a GPU; fail before loading anything."""
    if mixed_precision == "fp16" and device.type != "cuda":
        raise ValueError("`finetune.mixed_precision: fp16` needs a CUDA GPU; use `bf16` or `no` on CPU")


def make_optimizer(unet: Any, encoders: list[Any], params: Params) -> Any:
    """AdamW over the UNet (lr) and, when trained, the text encoders (text_encoder_lr)."""
    import torch

    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": params.lr}]
    te_lr = params.lr / 4 if params.text_encoder_lr is None else params.text_encoder_lr
    if params.train_text_encoder and te_lr > 0:
        groups.append({"params": [p for enc in encoders for p in enc.parameters()], "lr": te_lr})
    return torch.optim.AdamW(groups, weight_decay=params.weight_decay)


def step_generator(seed: int, step: int) -> "torch.Generator":
    """Noise and timesteps of step `step` depend only on (seed, step): resumable and reproducible."""
    import torch

    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def diffusion_loss(unet: Any, scheduler: Any, latents: "torch.Tensor", cond: dict[str, Any], gen: "torch.Generator", noise_offset: float) -> "torch.Tensor":
    """MSE between the UNet's prediction and the scheduler's target for one batch."""
    import torch
    import torch.nn.functional as F

    noise = torch.randn(latents.shape, generator=gen)  # (B, 4, h, w)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen)
    noise, t = noise.to(latents.device), t.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
    pred = unet(noisy, t, encoder_hidden_states=cond["hidden"], added_cond_kwargs=cond.get("added")).sample
    return F.mse_loss(pred.float(), target.float())


def conditioning(arch: str, tokenizers: list[Any], encoders: list[Any], batch: list[dict[str, Any]], device: Any) -> dict[str, Any]:
    """Text embeddings (and SDXL's pooled embeddings + time ids) for a batch."""
    from loraforge.conditioning import encode_sd15, encode_sdxl, sdxl_time_ids

    captions = [e["caption"] for e in batch]
    if arch == "sd15":
        return {"hidden": encode_sd15(tokenizers[0], encoders[0], captions)}
    hidden, pooled = encode_sdxl(tokenizers, encoders, captions)
    w, h = batch[0]["bucket"]
    time_ids = sdxl_time_ids([e["original_size"] for e in batch], [e["crop_top_left"] for e in batch], (h, w))
    return {"hidden": hidden, "added": {"text_embeds": pooled, "time_ids": time_ids.to(device, hidden.dtype)}}


def save_checkpoint(folder: Path, components: dict[str, Any], dtype: "torch.dtype", meta: dict[str, Any]) -> None:
    """`<folder>/<component>.safetensors` (diffusers key names) + meta.json; refuses NaN weights."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for name, model in components.items():
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
        bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
        if bad:
            raise FloatingPointError(f"{name} has non-finite weights ({bad[0]}...); not saving {folder}")
        save_file(state, str(folder / f"{name}.safetensors"))
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


# ---------------------------------------------------------------- loop


def run(params: Params, inputs: "Paths", outputs: "Paths", env: "StageEnv") -> dict[str, Any]:
    """Train; write checkpoints to `outputs.checkpoints` and loss tables to `outputs.loss`."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from diffusers.optimization import get_scheduler

    from loraforge.models import load_noise_scheduler, load_text_encoders, load_unet, resolve_device, resolve_model

    device = resolve_device(params.model.device)
    check_precision(params.mixed_precision, device)
    examples = load_examples(inputs.latents, inputs.captions, params.repeats)
    steps = plan(examples, params)
    print(f"finetune: {steps['images']} images, {steps['examples_per_epoch']} examples/epoch, batch {params.batch_size}, "
          f"{params.epochs} epochs -> {steps['steps']} steps ({steps['optimizer_steps']} optimizer steps)")
    env.publish.table("plan", [steps], "Training plan")

    torch.manual_seed(params.seed)
    info = resolve_model(params.model, env.state_dir)
    AcceleratorState._reset_state(reset_partial_state=True)  # the Prefect runner trains in-process, maybe repeatedly
    accelerator = Accelerator(mixed_precision=params.mixed_precision, gradient_accumulation_steps=params.gradient_accumulation, cpu=device.type == "cpu")
    unet = load_unet(info, accelerator.device)
    pairs = load_text_encoders(info, accelerator.device)
    tokenizers, encoders = [t for t, _ in pairs], [e for _, e in pairs]
    scheduler = load_noise_scheduler(info)
    unet.train()
    for enc in encoders:
        enc.train(params.train_text_encoder)
        enc.requires_grad_(params.train_text_encoder)
    if params.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for enc in encoders:  # transformers 5 renamed the method; 4.x has only the old name
            (getattr(enc, "activation_checkpointing_enable", None) or enc.gradient_checkpointing_enable)()
    optimizer = make_optimizer(unet, encoders, params)
    lr_schedule = get_scheduler(params.lr_scheduler, optimizer, num_warmup_steps=params.lr_warmup_steps, num_training_steps=steps["optimizer_steps"])
    unet, optimizer, lr_schedule, *encoders = accelerator.prepare(unet, optimizer, lr_schedule, *encoders)
    trained = [unet, *encoders] if params.train_text_encoder else [unet]
    trained_params = [p for m in trained for p in m.parameters() if p.requires_grad]

    step_rows, epoch_rows, saved = [], [], []
    global_step = 0
    bar = env.bar(total=steps["steps"], desc="finetune", unit="step")
    for epoch in range(1, params.epochs + 1):
        epoch_losses = []
        for batch in epoch_batches(examples, params.batch_size, params.seed, epoch):
            with accelerator.accumulate(*trained):
                latents = load_latents(batch, info.scaling_factor).to(accelerator.device)
                with torch.set_grad_enabled(params.train_text_encoder):
                    cond = conditioning(info.arch, tokenizers, encoders, batch, accelerator.device)
                with accelerator.autocast():
                    loss = diffusion_loss(unet, scheduler, latents, cond, step_generator(params.seed, global_step), params.noise_offset)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"finetune: loss is {loss.item()} at step {global_step} (epoch {epoch}); nothing saved for this epoch. "
                        "Likely causes: `finetune.lr` too high, or fp16 without a float32 VAE/UNet."
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and params.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trained_params, params.max_grad_norm)
                optimizer.step()
                lr_schedule.step()
                optimizer.zero_grad(set_to_none=True)
            global_step += 1
            epoch_losses.append(loss.item())
            step_rows.append({"step": global_step, "epoch": epoch, "loss": loss.item(), "lr": lr_schedule.get_last_lr()[0]})
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            env.publish.progress(global_step / steps["steps"], "finetune")
        epoch_rows.append({"epoch": epoch, "loss": sum(epoch_losses) / len(epoch_losses)})
        if epoch % params.save_every_n_epochs == 0 or epoch == params.epochs:
            components = {"unet": accelerator.unwrap_model(unet)}
            if params.train_text_encoder:
                names = ["text_encoder"] if info.arch == "sd15" else ["text_encoder", "text_encoder_2"]
                components.update({n: accelerator.unwrap_model(e) for n, e in zip(names, encoders)})
            folder = outputs.checkpoints / f"epoch-{epoch:04d}"
            save_checkpoint(folder, components, getattr(torch, params.save_dtype),
                            {"epoch": epoch, "global_step": global_step, "loss": epoch_rows[-1]["loss"], "arch": info.arch, "base": info.source})
            saved.append(folder.name)
    bar.close()
    write_tsv(outputs.loss / "steps.tsv", step_rows)
    write_tsv(outputs.loss / "epochs.tsv", epoch_rows)
    env.publish.table("epoch-loss", epoch_rows, "Mean loss per epoch")
    return {"items": steps["images"], "computed": steps["images"], "reused": 0, "plan": steps, "epochs_saved": saved,
            "loss_first_epoch": epoch_rows[0]["loss"], "loss_last_epoch": epoch_rows[-1]["loss"],
            "device": str(accelerator.device), "mixed_precision": params.mixed_precision}


def write_tsv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Tab-separated table with a header row (DVC plots read it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = list(rows[0]) if rows else []
    lines = ["\t".join(header)] + ["\t".join(f"{r[h]:.6g}" if isinstance(r[h], float) else str(r[h]) for h in header) for r in rows]
    path.write_text("\n".join(lines) + "\n")
