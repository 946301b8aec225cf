"""finetune: full finetune of the UNet (and optionally the text encoders) on cached latents.

The 001 guide's workflow trains the whole model, then extracts a LoRA from the difference. The
loop reads top to bottom: plan the steps, load the model, then per step pick the captions, encode
them, add noise, predict, take the (weighted) loss against the target, step, update the EMA.
Noise, timesteps and caption augmentation come from (seed, global step), so a run is
reproducible step by step and a resumed run follows the uninterrupted one. A checkpoint of the
trained components (plus their EMA) is saved every `save_every_n_epochs` and after the last epoch.

With `num_processes` > 1 (or an `accelerate_config` file saying so), `run` spawns that many
processes (`loraforge.training.launch`; accelerate sets up the process group: gloo on CPU, NCCL on
GPUs), each training on its share of every epoch's batches with gradients all-reduced; only the
first one saves, and its progress and tables reach the publisher.

The pieces live in `loraforge.training`: optimizers, LR schedules, losses and noise, EMA,
caption augmentation, resume state, prior preservation (generated or `reg_images` class images).
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge.buckets import BucketGrid
from stages.finetune_params import Params

if TYPE_CHECKING:
    import torch

    from loraforge.runner import Paths, StageEnv

ENCODER_NAMES = ("text_encoder", "text_encoder_2")


# ---------------------------------------------------------------- data


def load_examples(latents_dir: Path, captions_dir: Path, repeats: int) -> list[dict[str, Any]]:
    """One example per latent (flipped copies included), joined with its caption, repeated.

    Args:
        latents_dir: the latents stage's folder (manifest.jsonl + one safetensors per latent).
        captions_dir: the caption stage's folder (manifest.jsonl).
        repeats: `finetune.repeats`, multiplied with each image's folder repeats.
    """
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
    """Shuffled batches for one epoch; a batch holds one bucket only (latents must stack).

    Args:
        examples: from `load_examples`.
        batch_size: images per batch.
        seed: `finetune.seed`.
        epoch: 1-based epoch: the order depends only on (seed, epoch), which makes resume exact.
    """
    order = list(range(len(examples)))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    by_bucket: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for i in order:
        by_bucket[tuple(examples[i]["bucket"])].append(examples[i])
    batches = [group[s : s + batch_size] for group in by_bucket.values() for s in range(0, len(group), batch_size)]
    random.Random(seed * 100_003 + epoch + 1).shuffle(batches)
    return batches


def shard(batches: list[Any], rank: int, world: int) -> list[Any]:
    """Process `rank`'s share of the epoch's batches: every `world`-th one, the list first padded
    by wrapping around so each process steps the same number of times (DDP all-reduces in step).

    Args:
        batches: the epoch's batches.
        rank: this process's index.
        world: the number of processes.
    """
    padded = batches + batches[: (-len(batches)) % world] if batches else batches
    return padded[rank::world]


def plan(examples: list[dict[str, Any]], params: Params) -> dict[str, Any]:
    """The steps arithmetic (000 guide): steps ≈ images × repeats / batch × epochs, and the exact
    count given that a batch never mixes buckets.

    Args:
        examples: from `load_examples`.
        params: the finetune params.
    """
    batches = math.ceil(
        len(epoch_batches(examples, params.batch_size, params.seed, 0)) / params.num_processes
    )  # per process
    images = len({e["id"] for e in examples})
    return {
        "images": images,
        "examples_per_epoch": len(examples),
        "formula_steps": math.ceil(len(examples) / params.batch_size) * params.epochs,
        "steps_per_epoch": batches,
        "steps": batches * params.epochs,
        # the last, partial accumulation group of an epoch still steps (as kohya's loop does)
        "optimizer_steps": math.ceil(batches / params.gradient_accumulation) * params.epochs,
    }


def load_latents(batch: list[dict[str, Any]], scaling_factor: float) -> "torch.Tensor":
    """(B, 4, h, w) latents scaled for the UNet; a non-finite latent stops the run, naming its file.

    Args:
        batch: examples of one bucket.
        scaling_factor: the VAE's latent scale.
    """
    import torch
    from safetensors.torch import load_file

    latents = [load_file(str(e["path"]))["latent"] for e in batch]
    for e, lat in zip(batch, latents):
        if not torch.isfinite(lat).all():
            raise FloatingPointError(
                f"latent {e['path']} has NaN/inf values: it was encoded by a VAE in half precision "
                "(SDXL's VAE overflows in fp16: encode latents with the VAE in float32, 'no half VAE')"
            )
    return torch.stack(latents) * scaling_factor


def prefetch(batches: list[list[dict[str, Any]]], load: Any) -> Any:
    """Yield (batch, load(batch)), reading the next batch in a background thread while this one
    trains (data loading overlapped with compute; safetensors reads release the GIL).

    Args:
        batches: the epoch's batches.
        load: batch -> tensor (`load_latents`).
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        future = pool.submit(load, batches[0]) if batches else None
        for i, batch in enumerate(batches):
            data = future.result()  # re-raises a loading error (e.g. a NaN latent) here
            if i + 1 < len(batches):
                future = pool.submit(load, batches[i + 1])
            yield batch, data


def batch_captions(batch: list[dict[str, Any]], params: Params, step: int, epoch: int) -> list[str]:
    """The captions this step trains with (shuffled / dropped per `caption_*` and `keep_tokens`).

    Args:
        batch: examples of the step.
        params: the finetune params.
        step: global step (with the seed and the index in the batch: the random source).
        epoch: 1-based epoch.
    """
    from loraforge.training.captions import train_caption

    settings = caption_settings(params)
    return [
        train_caption(e["caption"], settings, random.Random(f"{params.seed}/{step}/{i}"), epoch)
        for i, e in enumerate(batch)
    ]


# ---------------------------------------------------------------- settings


def check_settings(params: Params, device: "torch.device") -> None:
    """Refuse combinations that cannot work, before loading anything.

    Args:
        params: the finetune params.
        device: the training device.
    """
    from loraforge.training.optimizers import optimizer_class

    check_precision(params.mixed_precision, device)
    optimizer_class(params.optimizer, device.type)  # importable, and 8-bit only on CUDA
    if params.lr_scheduler == "constant" and (params.lr_warmup_steps or params.lr_warmup_ratio):
        raise ValueError(
            "`finetune.lr_scheduler: constant` has no warmup; use `constant_with_warmup` with `finetune.lr_warmup_steps`"
        )
    if params.lr_warmup_steps and params.lr_warmup_ratio:
        raise ValueError("set `finetune.lr_warmup_steps` or `finetune.lr_warmup_ratio`, not both")
    lora_only = {
        "scale_weight_norms": params.scale_weight_norms,
        "network_dropout": params.network_dropout,
        "rank_dropout": params.rank_dropout,
        "module_dropout": params.module_dropout,
    }
    if params.mode == "full" and any(lora_only.values()):
        key = next(k for k, v in lora_only.items() if v)
        raise ValueError(f"`finetune.{key}` applies to `finetune.mode: lora` only (mode is `full`)")
    if params.adaptive_noise_scale and not params.noise_offset:
        raise ValueError("`finetune.adaptive_noise_scale` needs `finetune.noise_offset` > 0")


def check_precision(mixed_precision: str, device: "torch.device") -> None:
    """Say so when fp16 runs where it only costs time: CPUs have no fast fp16 matmul.

    Args:
        mixed_precision: `finetune.mixed_precision`.
        device: the training device.
    """
    if mixed_precision == "fp16" and device.type == "cpu":
        print("finetune: note: fp16 on CPU works (autocast + loss scaling) but is slower than `bf16` or `no` there")


def loss_settings(params: Params) -> Any:
    """The loss/noise part of the params as a `LossSettings`."""
    from loraforge.training.losses import LossSettings

    return LossSettings(
        loss_type=params.loss_type,
        huber_c=params.huber_c,
        min_snr_gamma=params.min_snr_gamma,
        debiased_estimation=params.debiased_estimation,
        v_parameterization=params.v_parameterization,
        noise_offset=params.noise_offset,
        noise_offset_random_strength=params.noise_offset_random_strength,
        adaptive_noise_scale=params.adaptive_noise_scale,
        multires_noise_iterations=params.multires_noise_iterations,
        multires_noise_discount=params.multires_noise_discount,
        ip_noise_gamma=params.ip_noise_gamma,
    )


def caption_settings(params: Params) -> Any:
    """The caption-augmentation part of the params as a `CaptionSettings`."""
    from loraforge.training.captions import CaptionSettings

    return CaptionSettings(
        shuffle=params.shuffle_caption,
        keep_tokens=params.keep_tokens,
        tag_dropout_rate=params.caption_tag_dropout_rate,
        dropout_rate=params.caption_dropout_rate,
        dropout_every_n_epochs=params.caption_dropout_every_n_epochs,
    )


def component_lrs(params: Params, n_encoders: int) -> dict[str, float]:
    """LR of each trained component: the UNet, then each text encoder whose LR is above 0.

    Args:
        params: the finetune params.
        n_encoders: 1 (SD1.5) or 2 (SDXL).
    """
    from loraforge.training.optimizers import ADAPTIVE

    adaptive = params.optimizer in ADAPTIVE  # one step size d for all groups: LRs must match (or be 0)
    lrs = {"unet": params.lr}
    if params.train_text_encoder:
        te1 = (params.lr if adaptive else params.lr / 4) if params.text_encoder_lr is None else params.text_encoder_lr
        te2 = te1 if params.text_encoder_2_lr is None else params.text_encoder_2_lr
        lrs.update(zip(ENCODER_NAMES[:n_encoders], (te1, te2)))
    for name, lr in lrs.items():
        if adaptive and lr not in (0, params.lr):
            key = "text_encoder_lr" if name == "text_encoder" else "text_encoder_2_lr"
            raise ValueError(
                f"`finetune.{key}` = {lr:g}: {params.optimizer} needs every LR equal to `finetune.lr` ({params.lr:g}) or 0"
            )
    return {name: lr for name, lr in lrs.items() if lr > 0}  # LR 0 freezes a text encoder


# ---------------------------------------------------------------- model


def step_generator(seed: int, step: int) -> "torch.Generator":
    """Noise and timesteps of step `step` depend only on (seed, step): resumable and reproducible.

    Args:
        seed: `finetune.seed`.
        step: the global step.
    """
    import torch

    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def diffusion_loss(
    unet: Any, scheduler: Any, latents: "torch.Tensor", cond: dict[str, Any], gen: "torch.Generator", settings: Any
) -> "torch.Tensor":
    """The step's weighted loss (see `loraforge.training.losses.diffusion_loss`); a module-level
    name so tests can poison it."""
    from loraforge.training.losses import diffusion_loss as loss_fn

    return loss_fn(unet, scheduler, latents, cond, gen, settings)


def conditioning(
    arch: str, encode: Any, batch: list[dict[str, Any]], captions: list[str], device: Any
) -> dict[str, Any]:
    """Text embeddings (and SDXL's pooled embeddings + time ids) for a batch.

    Args:
        arch: `sd15` or `sdxl`.
        encode: captions -> (hidden, pooled): the live encoders, or their cached outputs.
        batch: the examples (bucket, original size and crop for SDXL's time ids).
        captions: the captions to encode (after augmentation).
        device: the training device.
    """
    from loraforge.conditioning import sdxl_time_ids

    hidden, pooled = encode(captions)  # (B, 77, D) [SDXL: D1 + D2], (B, P) or None
    if arch == "sd15":
        return {"hidden": hidden}
    w, h = batch[0]["bucket"]
    time_ids = sdxl_time_ids([e["original_size"] for e in batch], [e["crop_top_left"] for e in batch], (h, w))  # (B, 6)
    return {"hidden": hidden, "added": {"text_embeds": pooled, "time_ids": time_ids.to(device, hidden.dtype)}}


def text_encode(
    params: Params,
    info: Any,
    tokenizers: list[Any],
    encoders: list[Any],
    trained: dict[str, Any],
    env: "StageEnv",
    device: Any,
) -> Any:
    """The caption encoder for the loop: cached through the item store when no encoder is
    trained and captions are not randomised, else the live encoders.

    Args:
        params: the finetune params.
        info: the resolved model.
        tokenizers: one per encoder.
        encoders: the text encoders.
        trained: the trained components by name.
        env: the stage env (item store, state folder).
        device: the training device.
    """
    from loraforge.models import component_hash
    from loraforge.training.text_cache import CachedEncode, make_encode

    encode = make_encode(info.arch, tokenizers, encoders)
    if any(name in trained for name in ENCODER_NAMES) or caption_settings(params).randomised:
        return encode
    parts = (
        ("tokenizer", "text_encoder")
        if info.arch == "sd15"
        else ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
    )
    model_key = {"arch": info.arch, **{p: component_hash(info, p, env.state_dir) for p in parts}}
    return CachedEncode(encode, env.store, model_key, device)


def check_finite(loss: "torch.Tensor", step: int, epoch: int, params: Params) -> None:
    """The divergence guard: a NaN/inf loss stops training at once, with the likely causes.

    Args:
        loss: the step's loss.
        step: the global step (0-based).
        epoch: the epoch (1-based).
        params: the finetune params (named in the causes).
    """
    import torch

    if torch.isfinite(loss):
        return
    causes = [
        f"`finetune.lr` = {params.lr:g} too high for `{params.optimizer}` (the 001 guide: 1e-6 for AdamW on SDXL, 1e-7 for Lion)"
    ]
    if params.mixed_precision == "fp16":
        causes.insert(
            0,
            "fp16 overflow: use `finetune.mixed_precision: bf16` (or `no`), and encode latents with the VAE in float32 ('no half VAE')",
        )
    if params.optimizer_args:
        causes.append(f"`finetune.optimizer_args` = {params.optimizer_args}")
    raise FloatingPointError(
        f"finetune: loss is {loss.item()} at step {step} (epoch {epoch}); training stopped, nothing saved for this epoch. "
        "Likely causes: " + "; ".join(causes)
    )


def save_checkpoint(
    folder: Path, states: dict[str, dict[str, "torch.Tensor"]], dtype: "torch.dtype", meta: dict[str, Any] | None
) -> None:
    """`<folder>/<component>.safetensors` (diffusers key names) + meta.json; refuses NaN weights.

    Args:
        folder: the checkpoint folder (created).
        states: component name -> state dict.
        dtype: the save dtype.
        meta: written as meta.json when given.
    """
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for name, state in states.items():
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
        bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
        if bad:
            raise FloatingPointError(f"{name} has non-finite weights ({bad[0]}...); not saving {folder}")
        save_file(state, str(folder / f"{name}.safetensors"))
    if meta is not None:
        (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def save_epoch(
    folder: Path, trained: dict[str, Any], ema: Any, dtype: "torch.dtype", meta: dict[str, Any], params: Params
) -> None:
    """One checkpoint: the trained components (mode full) or `lora.safetensors` (mode lora), and
    their EMA under `ema/` (what `extract.from_ema` reads).

    Args:
        folder: `.../epoch-NNNN`.
        trained: component name -> unwrapped module (or LoRA network in mode lora).
        ema: the EMA or None.
        dtype: the save dtype.
        meta: epoch, step, loss, arch, base.
        params: the finetune params.
    """
    states = {name: m.state_dict() for name, m in trained.items()}
    ema_states = {name: ema.state_dict(name) for name in trained} if ema is not None else None
    if params.mode == "lora":
        save_lora_checkpoint(folder, trained, states, dtype, meta, params, meta["arch"])
        if ema_states is not None:
            save_lora_checkpoint(folder / "ema", trained, ema_states, dtype, None, params, meta["arch"])
        return
    save_checkpoint(folder, states, dtype, meta)
    if ema_states is not None:
        save_checkpoint(folder / "ema", ema_states, dtype, None)


def save_lora_checkpoint(
    folder: Path,
    networks: dict[str, Any],
    states: dict[str, Any],
    dtype: "torch.dtype",
    meta: dict[str, Any] | None,
    params: Params,
    arch: str,
) -> None:
    """`<folder>/lora.safetensors` in kohya format with `ss_*` metadata (+ meta.json); refuses NaN weights.

    Args:
        folder: the checkpoint folder.
        networks: component name -> LoRA network.
        states: component name -> the network state to save (live or EMA).
        dtype: the save dtype.
        meta: written as meta.json when given.
        params: the finetune params (dim, alpha, training settings for the metadata).
        arch: `sd15` or `sdxl`.
    """
    import torch

    from loraforge.lora import lora_metadata, save_lora

    tensors = {}
    for name, net in networks.items():
        tensors.update({k: v.to("cpu", dtype) for k, v in net.kohya_state(params.network_alpha, states[name]).items()})
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(f"LoRA has non-finite weights ({bad[0]}...); not saving {folder}")
    training = {
        "ss_training_comment": "loraforge finetune mode lora",
        "ss_learning_rate": params.lr,
        "ss_optimizer": params.optimizer,
        "ss_network_dropout": params.network_dropout,
        "ss_seed": params.seed,
        "ss_text_encoders": {n: n in networks for n in ENCODER_NAMES[: 1 if arch == "sd15" else 2]},
    }
    if meta is not None:
        training.update(ss_epoch=meta["epoch"], ss_steps=meta["global_step"])
    if params.conv_dim:
        training["ss_network_args"] = {"conv_dim": params.conv_dim, "conv_alpha": params.conv_alpha}
    save_lora(
        folder / "lora.safetensors", tensors, lora_metadata(arch, params.network_dim, params.network_alpha, **training)
    )
    if meta is not None:
        (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def resume_folder(params: Params, inputs: "Paths", info: Any, state_dir: Path) -> Path:
    """`<state_dir>/resume/<fingerprint>`: params (less `resume`), model weight hashes, training data.

    Args:
        params: the finetune params.
        inputs: the stage's inputs (latents, captions).
        info: the resolved model.
        state_dir: loraforge's private folder.
    """
    from dataclasses import asdict

    from loraforge.fingerprint import hash_json, hash_tree
    from loraforge.models import component_hash

    own = {k: v for k, v in asdict(params).items() if k != "resume"}
    models = {c: component_hash(info, c, state_dir) for c in ("unet", *ENCODER_NAMES) if (info.path / c).is_dir()}
    data = {"latents": hash_tree(inputs.latents), "captions": hash_tree(inputs.captions)}
    if (reg := reg_images_folder(params, inputs, state_dir)) is not None:  # its content, not just its path
        data["reg_images"] = hash_tree(reg)
    return state_dir / "resume" / hash_json({"params": own, "models": models, "data": data, "version": 1})


def gradient_sync(accelerator: Any, models: list[Any], sync: bool) -> Any:
    """A context: gradients all-reduced across processes only on `sync` steps (DDP's no_sync otherwise).

    Args:
        accelerator: the Accelerator.
        models: the prepared models.
        sync: whether this batch ends an accumulation group.
    """
    import contextlib

    stack = contextlib.ExitStack()
    if not sync:
        for model in models:
            stack.enter_context(accelerator.no_sync(model))
    return stack


def trainable(params: Params, arch: str, modules: dict[str, Any], lrs: dict[str, float]) -> dict[str, Any]:
    """Set what trains and return it by component: the component itself (mode full) or a LoRA
    network attached to it (mode lora). Components without an LR are frozen.

    Args:
        params: the finetune params.
        arch: `sd15` or `sdxl`.
        modules: component name -> loaded module.
        lrs: component name -> LR (from `component_lrs`).
    """
    from loraforge.training.lora_net import add_lora

    for name, module in modules.items():
        module.train(name in lrs and params.mode == "full")
        module.requires_grad_(name in lrs and params.mode == "full")
        if params.gradient_checkpointing:
            if name == "unet":
                module.enable_gradient_checkpointing()
            else:  # transformers 5 renamed the method; 4.x has only the old name
                (getattr(module, "activation_checkpointing_enable", None) or module.gradient_checkpointing_enable)()
    if params.mode == "full":
        return {name: modules[name] for name in lrs}
    return {name: add_lora(modules[name], arch, name, params).train() for name in lrs}


def prior_loss(
    prior: list[Any],
    params: Params,
    info: Any,
    unet: Any,
    noise_scheduler: Any,
    encode: Any,
    step: int,
    precision: Any,
    settings: Any,
) -> "torch.Tensor":
    """The diffusion loss on the step's batch of class images (generated or `reg_images`), each
    with its own caption.

    Args:
        prior: the class examples (`loraforge.training.prior`).
        params: the finetune params.
        info: the resolved model.
        unet: the UNet.
        noise_scheduler: the DDPM scheduler.
        encode: the caption encoder.
        step: the global step (which class images; its own noise stream).
        precision: the run's MixedPrecision (device, autocast).
        settings: the loss settings.
    """
    from loraforge.training.prior import class_batch

    latents, batch = class_batch(prior, step, params.batch_size)  # (B, 4, h, w)
    cond = conditioning(info.arch, encode, batch, [e["caption"] for e in batch], precision.device)
    with precision.autocast():
        return diffusion_loss(
            unet, noise_scheduler, latents.to(precision.device), cond, step_generator(params.seed + 1, step), settings
        )


def reg_images_folder(params: Params, inputs: "Paths", state_dir: Path) -> Path | None:
    """The `reg_images` folder: the runner's `inputs.reg_images` when pipeline.yaml declares it,
    else the param resolved against the project root (the state folder's parent).

    Args:
        params: the finetune params.
        inputs: the stage's inputs.
        state_dir: loraforge's private folder (`<project>/.loraforge`).
    """
    if not params.reg_images:
        return None
    return Path(inputs["reg_images"]) if "reg_images" in inputs else state_dir.parent / params.reg_images


def class_examples(
    params: Params, images: int, info: Any, inputs: "Paths", env: "StageEnv", device: Any
) -> tuple[list[dict[str, Any]], int]:
    """Prior preservation's class examples (none when off) and how many reg images were encoded now.

    Args:
        params: the finetune params.
        images: distinct training images (the 002 guide's class image count).
        info: the resolved model.
        inputs: the stage's inputs.
        env: item store, state folder.
        device: where to generate or encode.
    """
    from loraforge.training import prior

    folder = reg_images_folder(params, inputs, env.state_dir)
    if folder is not None:
        return prior.reg_latents(info, folder, BucketGrid.load(inputs.latents), env.store, env.state_dir, device)
    if not params.class_prompt:
        return [], 0
    count = prior.class_image_count(params.num_class_images, images, params.train_text_encoder)
    return prior.class_latents(
        info, params.class_prompt, count, params.seed, params.class_inference_steps, env.store, env.state_dir, device
    ), 0


def prepare(
    accelerator: Any,
    params: Params,
    unet: Any,
    encoders: list[Any],
    trained: dict[str, Any],
    optimizer: Any,
    lr_schedule: Any,
) -> tuple[Any, list[Any], Any, Any]:
    """Hand the models, optimizer and schedule to accelerate; return them wrapped.

    With several processes DDP wraps only the modules that train in mode full (a frozen module
    has nothing to all-reduce, and DDP refuses it); LoRA networks have no forward for DDP to hook,
    so their gradients are averaged in `optimizer_step` instead.

    Args:
        accelerator: the Accelerator.
        params: the finetune params.
        unet: the UNet.
        encoders: the text encoders.
        trained: the trained modules (or LoRA networks) by component.
        optimizer: the optimizer.
        lr_schedule: the LR schedule.
    """
    if accelerator.num_processes == 1:
        unet, optimizer, lr_schedule, *encoders = accelerator.prepare(unet, optimizer, lr_schedule, *encoders)
        return unet, encoders, optimizer, lr_schedule
    optimizer, lr_schedule = accelerator.prepare(optimizer, lr_schedule)
    if params.mode == "full":
        wrapped = accelerator.prepare(*trained.values())  # one object back for one argument
        ddp = dict(zip(trained, wrapped if isinstance(wrapped, tuple) else (wrapped,)))
        unet, encoders = ddp["unet"], [ddp.get(name, e) for name, e in zip(ENCODER_NAMES, encoders)]
    return unet, encoders, optimizer, lr_schedule


def optimizer_step(
    accelerator: Any,
    precision: Any,
    optimizer: Any,
    lr_schedule: Any,
    trained: dict[str, Any],
    ema: Any,
    params: Params,
) -> tuple[dict[str, float], dict[str, float]]:
    """Unscale (fp16), clip, step (skipped on fp16 overflow), advance the schedule, clear
    gradients, cap LoRA norms, update the EMA.

    Returns the LR each group applied (d·lr for adaptive optimizers, which set d inside step())
    and, with `scale_weight_norms`, the layers scaled and the mean update norm.

    Args:
        accelerator: the Accelerator.
        precision: the run's MixedPrecision (fp16 loss scaling).
        optimizer: the optimizer.
        lr_schedule: the LR schedule.
        trained: the trained modules (or LoRA networks) by component.
        ema: the EMA or None.
        params: the finetune params.
    """
    from loraforge.training.lora_net import scale_weight_norms
    from loraforge.training.optimizers import applied_lrs

    if accelerator.num_processes > 1 and params.mode == "lora":  # LoRA networks have no forward for DDP to hook
        for p in (p for m in trained.values() for p in m.parameters() if p.grad is not None):
            p.grad = accelerator.reduce(p.grad, reduction="mean")
    precision.unscale(optimizer)  # clip the true gradients, not the scaled ones
    if params.max_grad_norm > 0:
        accelerator.clip_grad_norm_([p for m in trained.values() for p in m.parameters()], params.max_grad_norm)
    stepped = precision.step(optimizer)
    applied = applied_lrs(optimizer)
    lr_schedule.step()  # also on a skipped fp16 step: the schedule follows the step count
    optimizer.zero_grad(set_to_none=True)
    norms = {}
    if params.scale_weight_norms and stepped:  # max-norm on each LoRA update (mode lora)
        norms = dict(
            zip(("keys_scaled", "mean_norm"), scale_weight_norms(list(trained.values()), params.scale_weight_norms))
        )
    if ema is not None and stepped:
        ema.update()
    return applied, norms


# ---------------------------------------------------------------- loop


def training_record(params: Params) -> dict[str, Any]:
    """The settings a checkpoint's meta.json records (extract copies them into `ss_training_params`)."""
    keys = (
        "mode",
        "optimizer",
        "lr",
        "text_encoder_lr",
        "lr_scheduler",
        "epochs",
        "batch_size",
        "gradient_accumulation",
        "repeats",
        "mixed_precision",
        "min_snr_gamma",
        "noise_offset",
        "ema_decay",
        "seed",
    )
    return {key: getattr(params, key) for key in keys}


def run(params: Params, inputs: "Paths", outputs: "Paths", env: "StageEnv") -> dict[str, Any]:
    """Train in this process, or in several (`num_processes` or `accelerate_config`; see
    `loraforge.training.launch`).

    Args:
        params: the finetune params.
        inputs: `latents` and `captions` folders.
        outputs: `checkpoints` and `loss` folders (emptied by the runner).
        env: item store, state folder, publisher, progress bars.
    """
    import dataclasses

    from loraforge.training.launch import launch

    config = launch_config(params, env.state_dir.parent)
    if config.processes == 1:
        return train(params, inputs, outputs, env)
    params = dataclasses.replace(params, num_processes=config.processes)  # the plan splits the batches by it
    return launch(train, config, params, inputs, outputs, env)


def launch_config(params: Params, root: Path) -> Any:
    """The process count (and port, GPUs): from `accelerate_config` when set, else `num_processes`.

    Args:
        params: the finetune params.
        root: the project root (a relative `accelerate_config` is taken from it).
    """
    from loraforge.training.launch import LaunchConfig, read_accelerate_config

    if params.accelerate_config:
        return read_accelerate_config(root / params.accelerate_config, params.num_processes, params.mixed_precision)
    return LaunchConfig(processes=params.num_processes)


def train(params: Params, inputs: "Paths", outputs: "Paths", env: "StageEnv") -> dict[str, Any]:
    """Train (as one process of `num_processes`); write checkpoints to `outputs.checkpoints` and loss/LR tables to `outputs.loss`.

    Args:
        params: the finetune params.
        inputs: `latents` and `captions` folders.
        outputs: `checkpoints` and `loss` folders (emptied by the runner).
        env: item store, state folder, publisher, progress bars.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    from loraforge.fingerprint import hash_json, hash_tree
    from loraforge.models import load_noise_scheduler, load_text_encoders, load_unet, resolve_device, resolve_model
    from loraforge.training import resume
    from loraforge.training.ema import EMA
    from loraforge.training.optimizers import applied_lrs, make_optimizer
    from loraforge.training.precision import MixedPrecision, accelerate_mode
    from loraforge.training.resume import load_state, newest_state, publish_checkpoint
    from loraforge.training.schedules import make_lr_schedule, warmup_steps

    device = resolve_device(params.model.device)
    check_settings(params, device)
    if (reg := reg_images_folder(params, inputs, env.state_dir)) is not None:
        from loraforge.training.prior import reg_image_files

        reg_image_files(reg)  # a missing or empty folder fails before any model loads
    examples = load_examples(inputs.latents, inputs.captions, params.repeats)
    steps = plan(examples, params)
    print(
        f"finetune: {steps['images']} images, {steps['examples_per_epoch']} examples/epoch, batch {params.batch_size}, "
        f"{params.epochs} epochs -> {steps['steps']} steps ({steps['optimizer_steps']} optimizer steps), {params.optimizer}"
    )
    env.publish.table("plan", [steps], "Training plan")
    dataset_hash = hash_json({"latents": hash_tree(inputs.latents), "captions": hash_tree(inputs.captions)})

    # -- model: the UNet always trains; each text encoder when its LR is above 0
    torch.manual_seed(params.seed)
    info = resolve_model(params.model, env.state_dir)
    AcceleratorState._reset_state(reset_partial_state=True)  # the Prefect runner trains in-process, maybe repeatedly
    accelerator = Accelerator(
        mixed_precision=accelerate_mode(params.mixed_precision),
        gradient_accumulation_steps=params.gradient_accumulation,
        cpu=device.type == "cpu",
        step_scheduler_with_optimizer=False,  # one schedule step per optimizer step, whatever the process count
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )  # e.g. SD1.5's unused pooled output
    main = accelerator.is_main_process
    precision = MixedPrecision(params.mixed_precision, accelerator.device, accelerator)
    unet = load_unet(info, accelerator.device)
    pairs = load_text_encoders(info, accelerator.device)
    tokenizers, encoders = [t for t, _ in pairs], [e for _, e in pairs]
    noise_scheduler = load_noise_scheduler(info)
    if params.channels_last:
        unet.to(memory_format=torch.channels_last)
    if params.compile:  # in place (nn.Module.compile): state_dict keys stay free of `_orig_mod.`
        unet.compile(dynamic=False)  # one graph per bucket shape: few buckets, and inductor needs static shapes here
    lrs = component_lrs(params, len(encoders))
    trained = trainable(params, info.arch, {"unet": unet, **dict(zip(ENCODER_NAMES, encoders))}, lrs)
    groups = [{"name": name, "params": list(trained[name].parameters()), "lr": lr} for name, lr in lrs.items()]
    optimizer = make_optimizer(params.optimizer, groups, params.optimizer_args, params.weight_decay, device.type)
    warmup = warmup_steps(params.lr_warmup_steps, params.lr_warmup_ratio, steps["optimizer_steps"])
    lr_schedule = make_lr_schedule(
        params.lr_scheduler,
        optimizer,
        warmup,
        steps["optimizer_steps"],
        params.lr_scheduler_num_cycles,
        params.lr_scheduler_power,
    )
    unet, encoders, optimizer, lr_schedule = prepare(
        accelerator, params, unet, encoders, trained, optimizer, lr_schedule
    )
    wrapped = {"unet": unet, **dict(zip(ENCODER_NAMES, encoders))}
    ema = EMA(trained, params.ema_decay) if params.ema_decay else None
    train_encoders = any(name in lrs for name in ENCODER_NAMES)
    encode = text_encode(params, info, tokenizers, encoders, trained, env, accelerator.device)
    losses_cfg = loss_settings(params)

    # -- prior preservation: class latents (cached) from the base model before any weight moves, or from reg_images
    prior, reg_encoded = class_examples(params, steps["images"], info, inputs, env, device)

    # -- resume: continue from the newest state of this exact run (params, model, data)
    progress: dict[str, Any] = {"global_step": 0, "epoch": 0, "steps": [], "lrs": [], "epochs": [], "saved": []}
    keep = resume_folder(params, inputs, info, env.state_dir) if params.resume == "auto" else None
    if keep is not None and (state := newest_state(keep)) is not None:
        progress = load_state(state, trained, optimizer, lr_schedule, ema, precision.scaler)
        for name in progress["saved"]:
            publish_checkpoint(keep / "checkpoints" / name, outputs.checkpoints)
        print(f"finetune: resumed from {state.name} (step {progress['global_step']})")

    norms: dict[str, float] = (
        {"keys_scaled": 0, "mean_norm": 0.0} if params.scale_weight_norms else {}
    )  # logged per step
    bar = env.bar(total=steps["steps"], initial=progress["global_step"], desc="finetune", unit="step")
    for epoch in range(progress["epoch"] + 1, params.epochs + 1):
        epoch_losses = []
        batches = shard(
            epoch_batches(examples, params.batch_size, params.seed, epoch),
            accelerator.process_index,
            accelerator.num_processes,
        )
        for i, (batch, latents) in enumerate(prefetch(batches, lambda b: load_latents(b, info.scaling_factor))):
            step = progress["global_step"]
            draw = (
                step * accelerator.num_processes + accelerator.process_index
            )  # this process's random stream (= step with one)
            # step the optimizer every `gradient_accumulation` batches and at the end of the epoch
            sync = (i + 1) % params.gradient_accumulation == 0 or i + 1 == len(batches)
            with gradient_sync(accelerator, list(wrapped.values()), sync):
                latents = latents.to(accelerator.device, non_blocking=True)  # (B, 4, h, w)
                if params.channels_last:
                    latents = latents.contiguous(memory_format=torch.channels_last)
                captions = batch_captions(batch, params, draw, epoch)
                with torch.set_grad_enabled(train_encoders):  # frozen encoders: no activations kept
                    cond = conditioning(info.arch, encode, batch, captions, accelerator.device)
                with precision.autocast():
                    loss = diffusion_loss(
                        unet, noise_scheduler, latents, cond, step_generator(params.seed, draw), losses_cfg
                    )
                if prior:  # + prior_loss_weight × the loss on a batch of class images
                    loss = loss + params.prior_loss_weight * prior_loss(
                        prior, params, info, unet, noise_scheduler, encode, draw, precision, losses_cfg
                    )
                check_finite(loss, step, epoch, params)  # before backward: no NaN ever reaches the weights
                accelerator.backward(precision.scale(loss))
            applied = applied_lrs(optimizer)  # lr (or d·lr) this step uses
            if sync:
                applied, norms = optimizer_step(accelerator, precision, optimizer, lr_schedule, trained, ema, params)
            progress["global_step"] = step + 1
            epoch_losses.append(loss.item())
            progress["steps"].append(
                {"step": step + 1, "epoch": epoch, "loss": loss.item(), "lr": applied["unet"], **norms}
            )
            progress["lrs"].append({"step": step + 1, **applied})
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{applied['unet']:.3g}")
            env.publish.progress(progress["global_step"] / steps["steps"], f"finetune epoch {epoch}/{params.epochs}")
        progress["epochs"].append({"epoch": epoch, "loss": sum(epoch_losses) / len(epoch_losses)})
        progress["epoch"] = epoch
        env.publish.table("epoch-loss", progress["epochs"], "Mean loss per epoch")
        if main and (epoch % params.save_every_n_epochs == 0 or epoch == params.epochs):
            name = f"epoch-{epoch:04d}"
            meta = {
                "epoch": epoch,
                "global_step": progress["global_step"],
                "loss": progress["epochs"][-1]["loss"],
                "arch": info.arch,
                "base": info.source,
                "ema": ema is not None,
                "mode": params.mode,
                "dataset_hash": dataset_hash,
                **training_record(params),
            }
            save_epoch(
                (keep / "checkpoints" if keep else outputs.checkpoints) / name,
                trained,
                ema,
                getattr(torch, params.save_dtype),
                meta,
                params,
            )
            progress["saved"].append(name)
            if keep is not None:  # built in the resume folder, hard-linked into the outputs
                publish_checkpoint(keep / "checkpoints" / name, outputs.checkpoints)
                resume.save_state(keep, epoch, trained, optimizer, lr_schedule, ema, precision.scaler, progress)
    bar.close()

    if main:
        write_tsv(outputs.loss / "steps.tsv", progress["steps"])
        write_tsv(outputs.loss / "lr.tsv", progress["lrs"])
        write_tsv(outputs.loss / "epochs.tsv", progress["epochs"])
    accelerator.wait_for_everyone()
    return {
        "items": steps["images"],
        "computed": steps["images"],
        "reused": 0,
        "plan": steps,
        "epochs_saved": progress["saved"],
        "loss_first_epoch": progress["epochs"][0]["loss"],
        "loss_last_epoch": progress["epochs"][-1]["loss"],
        "device": str(accelerator.device),
        "mixed_precision": params.mixed_precision,
        "optimizer": params.optimizer,
        "loss_scale": precision.loss_scale,
        "skipped_steps": precision.skipped,
        "trained": list(lrs),
        "ema": ema is not None,
        "class_images": {"count": len(prior), "encoded": reg_encoded},
        "text_cache": {"hits": encode.hits, "misses": encode.misses} if hasattr(encode, "hits") else None,
        "final_lr": progress["lrs"][-1] if progress["lrs"] else {},
        "processes": accelerator.num_processes,
        "optimizer_steps_taken": getattr(lr_schedule, "scheduler", lr_schedule).last_epoch,
    }


def write_tsv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Tab-separated table with a header row (DVC plots read it).

    Args:
        path: the file (parents created).
        rows: dicts with the same keys.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    header = list(rows[0]) if rows else []
    lines = ["\t".join(header)] + [
        "\t".join(f"{r[h]:.6g}" if isinstance(r[h], float) else str(r[h]) for h in header) for r in rows
    ]
    path.write_text("\n".join(lines) + "\n")
