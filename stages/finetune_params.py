"""The `finetune` section of params.yaml: typed, frozen, validated (no torch, no stage code)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from loraforge.pipeline.params import ModelParams, section


@section
class Params:
    """The `finetune` section. Guides: 000 = RFKTR, 001 = SDXL finetune-then-extract, 002 =
    DreamBooth research, 003 = LoRA guide (docs/training.md gives each guide's value per key).

    Attributes:
        mode: `full` finetunes the weights (the 001 guide; `extract` then makes the LoRA);
            `lora` trains a LoRA directly (the 003 guide), saved as `epoch-NNNN/lora.safetensors`.
        unet_layers: which UNet weights a full finetune trains: `all` (the guides); `lora`: only
            the weights of the modules a kohya LoRA carries (attention and feed-forward
            projections), so `extract` at full rank gives back the finetune exactly; `lora_conv`:
            those and the ResNet/resampler convolutions (with `extract.conv_dim` > 0). Biases,
            norms, embeddings and `conv_in`/`conv_out` stay the base model's (in `all` they carry
            a few % of the change, which no LoRA file can hold: SDXL's pooled-text `add_embedding`
            most). OneTrainer's layer filter, for extraction. Mode full only.
        network_dim: LoRA rank of linear layers (mode lora); the 003 guide: 4-32.
        network_alpha: LoRA alpha; the 003 guide: 1 or half the rank.
        conv_dim: LoRA rank of the ResNet 3×3 convolutions (LoCon); 0 = none; the 003 guide: under 32.
        conv_alpha: their alpha.
        network_dropout: dropout on the LoRA rank activations; the 003 guide: 0.1-0.5.
        rank_dropout: drop whole rank channels per sample with this probability.
        module_dropout: skip a whole LoRA module for a step with this probability.
        scale_weight_norms: cap each LoRA update's norm after every step (max-norm); the 003 guide: 1; 0 = off.
        network_algo: the adapter trained in mode lora (kohya's `--network_module lycoris.kohya
            --network_args algo=...`): `lora` (default; `conv_dim` makes it LoCon), `locon` (the
            same, and says so: needs `conv_dim` > 0), `loha` (LyCORIS LoHa, Hadamard product of
            two low-rank pairs), `lokr` (LyCORIS LoKr, Kronecker product), `dora` (LoRA with a
            learned per-output magnitude: LyCORIS' `dora_wd=True`, peft's `use_dora`). loha, lokr
            and dora train through the `lycoris-lora` package and save LyCORIS keys
            (`.hada_*`, `.lokr_*`, `.dora_scale`) that ComfyUI and A1111 load; `resize` passes
            them through unresized; not with `network_dropout` for loha / lokr (LyCORIS has none).
        network_factor: LoKr's Kronecker factor (LyCORIS `factor`); -1 (default) = the most
            balanced split of each dimension.
        decompose_both: LoKr: also decompose the smaller Kronecker factor into a low-rank pair
            (LyCORIS `decompose_both`); default off.
        use_tucker: Tucker decomposition of the 3×3 convolutions (LyCORIS `use_tucker`; loha
            and dora with `conv_dim` > 0; not lokr, whose Tucker layers no loader reads the same
            way); default off.
        epochs: passes over the (repeated) dataset; the 001 guide trains 100.
        batch_size: images per step (same bucket); the 001 guide: 1, with accumulation 3.
        gradient_accumulation: steps whose gradients are summed before one optimizer step.
        repeats: multiplies each image's folder repeats (`N_name` folders); the 001 guide: 2.
        optimizer: AdamW, AdamW8bit (bitsandbytes), Lion, Prodigy, DAdaptAdam, Adafactor, or `module.Class`.
        optimizer_args: extra constructor arguments, e.g. the 003 guide's Prodigy set
            `{decouple: true, weight_decay: 0.01, d_coef: 0.8, use_bias_correction: true,
            safeguard_warmup: true, betas: [0.9, 0.99]}`.
        lr: UNet learning rate; the 001 guide: 1e-6 (AdamW, constant); Prodigy/DAdapt: 1.
        train_text_encoder: also train the text encoder(s); the 001 guide: always.
        text_encoder_lr: null = lr / 4 (the 000 guide: a quarter to a sixth; = lr for Prodigy and
            DAdaptAdam, which need equal LRs); 0 freezes it.
        text_encoder_2_lr: SDXL's second encoder; null = text_encoder_lr; 0 freezes it.
        lr_scheduler: constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial.
        lr_warmup_steps: optimizer steps of linear warmup (not with `constant`).
        lr_warmup_ratio: warmup as a share of all optimizer steps (the 003 guide: 0.02-0.05 for Prodigy).
        lr_scheduler_num_cycles: hard restarts of `cosine_with_restarts`.
        lr_scheduler_power: exponent of `polynomial`.
        weight_decay: weight decay (optimizer_args.weight_decay wins).
        max_grad_norm: gradient clipping norm (0 disables).
        mixed_precision: `fp16` (autocast + dynamic loss scaling) / `bf16` autocast; `no` = float32.
            Meant for GPUs; both also run on CPU (fp16 slowly).
        gradient_checkpointing: trade compute for memory in the UNet and text encoders.
        fused_backward: mode full: step each parameter's optimizer as soon as its gradient is
            complete, inside backward, and drop the gradient (kohya's `--fused_backward_pass`,
            OneTrainer's fused back pass): no full set of gradients is ever held. Each parameter
            gets its own optimizer of the configured class; `max_grad_norm` then clips each
            parameter's gradient on its own (as kohya does), not the global norm. Needs
            `gradient_accumulation: 1`, one process, no fp16, and not Prodigy/DAdaptAdam. Default false.
        weights_dtype: mode full: `bfloat16` holds the trained components' weights (and so their
            gradients) in bf16, half of float32 (OneTrainer's weight dtype, kohya's `--full_bf16`);
            each step runs in float32 per parameter and rounds back; optimizer states stay float32;
            the EMA stays float32. Needs `mixed_precision: bf16`, one process, not Prodigy/DAdaptAdam.
            Default `float32`.
        stochastic_rounding: with `weights_dtype: bfloat16`, round each updated weight to bf16
            stochastically (unbiased: updates under half a bf16 step accumulate instead of
            vanishing; random bits from (seed, step, parameter)); false rounds to nearest.
            Default true; no effect with float32 weights.
        channels_last: UNet weights and latents in channels-last memory format (faster convolutions
            on tensor-core GPUs).
        num_processes: data-parallel training processes on this machine (through accelerate: one per
            GPU, or gloo on CPU); each takes its share of every epoch's batches, so an optimizer
            step sees num_processes × batch_size images; only the first process saves.
        accelerate_config: an accelerate config file (`accelerate config` writes one), relative to
            the project: its `num_processes` (all machines together), `num_machines`,
            `machine_rank`, `main_process_ip`, `main_process_port` and `gpu_ids` set the launch, on
            one machine or several (the others run `loraforge stage finetune --machine-rank N`).
            DDP (`MULTI_GPU`/`MULTI_CPU`), or `FSDP` for mode full (FSDP2 sharding of the trained
            components; full checkpoints); DeepSpeed is refused, with the reason.
        compile: compile the UNet's forward with `torch.compile` (inductor): the first steps pay
            the compile time, later ones run faster; weights keep their plain key names.
        save_every_n_epochs: checkpoint interval; the last epoch is always saved.
        save_last_n_epochs: keep only the newest N saved epochs (kohya's `save_last_n_epochs`):
            each new checkpoint removes the ones before them from `models/checkpoints` (and the
            resume folder), so extract and evaluate see those N; null = keep every one.
        save_dtype: dtype of saved checkpoints (float16 halves disk; extraction works in float32).
        save_single_file: mode full: also write each saved epoch (and its EMA) as one original-layout
            `model.safetensors` that A1111 / ComfyUI / `model.base` load (disk: one more model per epoch).
        seed: seeds data order, noise, timesteps and caption augmentation.
        loss_type: `l2` (MSE) or `huber` (pseudo-Huber, threshold `huber_c`).
        huber_c: pseudo-Huber threshold.
        min_snr_gamma: min-SNR-γ loss weighting; 0 disables; the 001 (Dec 2023) and 003 guides: 5.
        debiased_estimation: weight the loss by 1/√SNR (ε) or 1/(SNR+1) (v).
        v_parameterization: train with the v-prediction target (SD2-768-style models).
        noise_offset: per-channel offset noise strength; 0 disables (the 001 guide leaves it off).
        noise_offset_random_strength: draw the offset strength in [0, noise_offset) each step.
        adaptive_noise_scale: add this × |latent channel mean| to the offset (needs noise_offset).
        multires_noise_iterations: pyramid noise levels; 0 disables; the 003 guide: 6-10.
        multires_noise_discount: pyramid level weight decay; the 003 guide: 0.2-0.4.
        ip_noise_gamma: input perturbation noise strength; 0 disables (0.1 in the paper).
        masked_loss: weight the loss by each image's mask (its alpha channel, or `<stem>-mask.png`
            beside it; kohya's `alpha_mask`, OneTrainer's masked training); off by default. Per
            sample the loss is Σ w·ℓ / Σ w over the latent, w = mask + unmasked_weight × (1 − mask);
            images without a mask and class images train everywhere (mask all ones). With no mask
            in the dataset the run warns and trains unmasked.
        unmasked_weight: the weight of pixels outside the mask with `masked_loss` (OneTrainer's
            `unmasked_weight`): 0 (default) = they get no gradient, 1 = no masking.
        ema_decay: EMA of the trained weights, saved as `ema/` beside each checkpoint; 0 disables;
            the 001 guide's A100 config: 0.9995.
        resume: `auto` saves the full training state with each checkpoint (outside the outputs)
            and continues from the newest one whose params and data match; `off` saves none.
        class_prompt: prior preservation: class images generated by the base model from this
            prompt ("a woman") train alongside the instance images; null = off (the 001 guide: off).
        reg_images: prior preservation from your own class images instead: a folder (relative to
            the project) of images, VAE-encoded once through the item store; each image's caption is
            its sidecar `<stem>.txt`, else the folder name less a kohya `N_` prefix (`1_woman` ->
            "woman"). Every image in it is used (`num_class_images` does not apply). Not with
            `class_prompt`.
        num_class_images: null = the 002 guide's formula, images × 200 (× 100 with the text encoder).
        class_inference_steps: sampler steps per generated class image.
        prior_loss_weight: weight of the class images' loss (the 002 guide: 1).
        shuffle_caption: shuffle comma-separated tags after the first `keep_tokens` (003: on).
        keep_tokens: leading tags kept in place and never dropped (003: 1, the activation tag).
        keep_tokens_separator: kohya's: in a caption holding it (e.g. `|||`), the tags before it,
            and after a second one, stay in place instead of the first `keep_tokens`; the
            separators never reach the text encoder (`reg_images` and `validation_folder`
            sidecars are read as written); "" = none.
        caption_dropout_rate: share of examples trained with an empty caption.
        caption_dropout_every_n_epochs: every n-th epoch trains without captions; 0 disables.
        caption_tag_dropout_rate: drop each non-kept tag with this probability.
        validation_split: hold images out of training for the validation loss: a share in (0, 1)
            of the images (rounded, at least 1) or a count ≥ 1; the images with the smallest
            content hashes (ids), every repeat and flipped copy of them; 0 = off (the default;
            kohya's `validation_split` is a share too). Not with `validation_folder`.
        validation_folder: or a folder (relative to the project) of other images for the
            validation loss, VAE-encoded once through the item store like `reg_images` (caption:
            sidecar `<stem>.txt`, else the folder name); null = off.
        validation_timesteps: the validation loss's fixed timesteps per image, spread evenly over
            the schedule (noise and timesteps are the same for every epoch and experiment).
    """

    model: ModelParams
    mode: Literal["full", "lora"] = "full"
    unet_layers: Literal["all", "lora", "lora_conv"] = "all"
    network_dim: int = Field(16, ge=1)
    network_alpha: float = Field(8.0, gt=0)
    conv_dim: int = Field(0, ge=0)
    conv_alpha: float = Field(1.0, gt=0)
    network_dropout: float = Field(0.0, ge=0, lt=1)
    rank_dropout: float = Field(0.0, ge=0, lt=1)
    module_dropout: float = Field(0.0, ge=0, lt=1)
    scale_weight_norms: float = Field(0.0, ge=0)
    network_algo: Literal["lora", "locon", "loha", "lokr", "dora"] = "lora"
    network_factor: int = Field(-1, ge=-1)
    decompose_both: bool = False
    use_tucker: bool = False
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(1, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    repeats: int = Field(1, ge=1)
    optimizer: str = Field("AdamW", min_length=1)
    optimizer_args: dict[str, Any] = Field(default_factory=dict)
    lr: float = Field(1e-6, gt=0, le=10)
    train_text_encoder: bool = False
    text_encoder_lr: float | None = Field(None, ge=0, le=10)
    text_encoder_2_lr: float | None = Field(None, ge=0, le=10)
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    lr_warmup_ratio: float = Field(0.0, ge=0, lt=1)
    lr_scheduler_num_cycles: int = Field(1, ge=1)
    lr_scheduler_power: float = Field(1.0, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    fused_backward: bool = False
    weights_dtype: Literal["float32", "bfloat16"] = "float32"
    stochastic_rounding: bool = True
    channels_last: bool = False
    compile: bool = False
    num_processes: int = Field(1, ge=1)
    accelerate_config: str | None = Field(None, min_length=1)
    save_every_n_epochs: int = Field(1, ge=1)
    save_last_n_epochs: int | None = Field(None, ge=1)
    save_dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    save_single_file: bool = False
    seed: int = 42
    loss_type: Literal["l2", "huber"] = "l2"
    huber_c: float = Field(0.1, gt=0)
    min_snr_gamma: float = Field(0.0, ge=0)
    debiased_estimation: bool = False
    v_parameterization: bool = False
    noise_offset: float = Field(0.0, ge=0)
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float = Field(0.0, ge=0)
    multires_noise_iterations: int = Field(0, ge=0)
    multires_noise_discount: float = Field(0.3, ge=0, le=1)
    ip_noise_gamma: float = Field(0.0, ge=0)
    masked_loss: bool = False
    unmasked_weight: float = Field(0.0, ge=0, le=1)
    ema_decay: float = Field(0.0, ge=0, lt=1)
    resume: Literal["off", "auto"] = "off"
    class_prompt: str | None = None
    reg_images: str | None = Field(None, min_length=1)
    num_class_images: int | None = Field(None, ge=1)
    class_inference_steps: int = Field(25, ge=1)
    prior_loss_weight: float = Field(1.0, ge=0)
    shuffle_caption: bool = False
    keep_tokens: int = Field(0, ge=0)
    keep_tokens_separator: str = ""
    caption_dropout_rate: float = Field(0.0, ge=0, le=1)
    caption_dropout_every_n_epochs: int = Field(0, ge=0)
    caption_tag_dropout_rate: float = Field(0.0, ge=0, le=1)
    validation_split: int | float = Field(0, ge=0)
    validation_folder: str | None = Field(None, min_length=1)
    validation_timesteps: int = Field(4, ge=1, le=1000)

    @model_validator(mode="after")
    def _one_prior_source(self) -> "Params":
        if self.class_prompt and self.reg_images:
            raise ValueError(
                "set `finetune.class_prompt` (generated class images) or `finetune.reg_images` (your own), not both"
            )
        if isinstance(self.validation_split, float) and self.validation_split >= 1:
            raise ValueError(
                f"`finetune.validation_split` is a share in (0, 1) or a whole count ≥ 1, got {self.validation_split}"
            )
        if self.validation_split and self.validation_folder:
            raise ValueError(
                "set `finetune.validation_split` (held-out images) or `finetune.validation_folder`, not both"
            )
        if self.unet_layers != "all" and self.mode != "full":
            raise ValueError(
                f"`finetune.unet_layers: {self.unet_layers}` picks what a full finetune trains: "
                "it needs `finetune.mode: full`"
            )
        if self.save_single_file and self.mode != "full":
            raise ValueError("`finetune.save_single_file` writes whole models: it needs `finetune.mode: full`")
        self._check_network_algo()
        return self

    def _check_network_algo(self) -> None:
        algo = self.network_algo
        if algo != "lora" and self.mode != "lora":
            raise ValueError(f"`finetune.network_algo: {algo}` trains an adapter: it needs `finetune.mode: lora`")
        if algo == "locon" and not self.conv_dim:
            raise ValueError("`finetune.network_algo: locon` trains the 3×3 convolutions: set `finetune.conv_dim` > 0")
        if algo in ("loha", "lokr") and self.network_dropout:
            raise ValueError(f"`finetune.network_dropout` is not implemented by LyCORIS {algo}: set it to 0")
        if algo == "dora" and self.scale_weight_norms:
            raise ValueError(
                "`finetune.scale_weight_norms` does not apply to `network_algo: dora` (its norm is learned)"
            )
        if algo != "lokr" and (self.network_factor != -1 or self.decompose_both):
            key = "network_factor" if self.network_factor != -1 else "decompose_both"
            raise ValueError(f"`finetune.{key}` applies to `finetune.network_algo: lokr` only (it is `{algo}`)")
        if self.use_tucker and algo not in ("loha", "dora"):
            why = (
                "LoKr's Tucker convolutions are read differently by every loader (ComfyUI skips them, Forge "
                "raises, LyCORIS' loader fails)"
                if algo == "lokr"
                else f"it is `{algo}`"
            )
            raise ValueError(f"`finetune.use_tucker` applies to `network_algo` loha or dora: {why}")
        if self.network_factor == 0:
            raise ValueError("`finetune.network_factor` must be -1 (balanced) or a factor ≥ 1, got 0")
