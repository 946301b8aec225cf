"""Reading kohya's config files as data: the kohya_ss GUI's JSON, sd-scripts' `--config_file` TOML
(its command-line flags as keys) and `--dataset_config` TOML, and the key tables that say where
each kohya setting goes in params.yaml, or why it goes nowhere (`loraforge.kohya.importer` applies
them). Values are parsed, never evaluated: nothing in a config is executed or unpickled.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from loraforge.errors import InputError, MissingInput

# kohya key -> params.yaml key and kind: f float, i int, b bool, s str; F / I: 0 means unset (GUI).
_DIRECT_TABLE = """
train_batch_size finetune.batch_size i      batch_size finetune.batch_size i
gradient_accumulation_steps finetune.gradient_accumulation i      dataset_repeats finetune.repeats i
save_every_n_epochs finetune.save_every_n_epochs i      seed finetune.seed i
mixed_precision finetune.mixed_precision s      min_snr_gamma finetune.min_snr_gamma f
debiased_estimation_loss finetune.debiased_estimation b      v_parameterization finetune.v_parameterization b
noise_offset finetune.noise_offset f      noise_offset_random_strength finetune.noise_offset_random_strength b
adaptive_noise_scale finetune.adaptive_noise_scale f      multires_noise_iterations finetune.multires_noise_iterations i
multires_noise_discount finetune.multires_noise_discount f      ip_noise_gamma finetune.ip_noise_gamma f
loss_type finetune.loss_type s      huber_c finetune.huber_c f      max_grad_norm finetune.max_grad_norm f
gradient_checkpointing finetune.gradient_checkpointing b      prior_loss_weight finetune.prior_loss_weight f
save_last_n_epochs finetune.save_last_n_epochs I
fused_backward_pass finetune.fused_backward b      caption_prefix caption.prefix s      caption_suffix caption.suffix s
shuffle_caption finetune.shuffle_caption b      keep_tokens finetune.keep_tokens i
keep_tokens_separator finetune.keep_tokens_separator s
caption_dropout_rate finetune.caption_dropout_rate f      caption_tag_dropout_rate finetune.caption_tag_dropout_rate f
caption_dropout_every_n_epochs finetune.caption_dropout_every_n_epochs i
network_dim finetune.network_dim i      network_alpha finetune.network_alpha f
conv_dim finetune.conv_dim i      conv_alpha finetune.conv_alpha f      network_dropout finetune.network_dropout f
rank_dropout finetune.rank_dropout f      module_dropout finetune.module_dropout f
scale_weight_norms finetune.scale_weight_norms f      lr_scheduler finetune.lr_scheduler s
lr_scheduler_num_cycles finetune.lr_scheduler_num_cycles I      lr_scheduler_power finetune.lr_scheduler_power F
num_processes finetune.num_processes I      flip_aug latents.flip b      bucket_reso_steps latents.bucket_step i
min_bucket_reso latents.min_bucket I      max_bucket_reso latents.max_bucket I      vae_batch_size latents.batch_size I
clamp_quantile extract.clamp_quantile f      min_diff extract.min_diff f
new_rank resize.rank i      dynamic_param resize.param F      alpha_mask finetune.masked_loss b
"""
DIRECT: dict[str, tuple[str, str]] = {
    words[i]: (words[i + 1], words[i + 2]) for words in [_DIRECT_TABLE.split()] for i in range(0, len(words), 3)
}
_KINDS = {"f": "a number", "i": "an integer", "b": "true or false", "s": "a string"}
LYCORIS = "algo use_cp use_scalar rank_dropout_scale constrain rescaled train_norm bypass_mode "
LYCORIS += "unit train_on_input"
LYCORIS_MAPPED = "dora_wd factor decompose_both use_tucker"  # with algo loha/lokr: `lycoris_settings`
# the GUI's LyCORIS types loraforge trains (`finetune.network_algo`)
LYCORIS_TYPES = {"LyCORIS/LoHa": "loha", "LyCORIS/LoKr": "lokr"}
_REASON_GROUPS = {
    "xformers sdpa mem_eff_attn": "loraforge uses torch SDPA attention; no setting needed",
    "cache_latents cache_latents_to_disk": "latents are always cached (content-addressed)",
    "cache_text_encoder_outputs cache_text_encoder_outputs_to_disk sdxl_cache_text_encoder_outputs": (
        "text-encoder outputs are cached by themselves when the encoders are frozen and captions fixed"
    ),
    "output_dir output_name logging_dir log_prefix save_model_as": (
        "outputs are fixed by pipeline.yaml (models/, reports/), LoRAs as safetensors"
    ),
    "sample_every_n_epochs sample_every_n_steps sample_prompts sample_sampler sample_at_first": (
        "samples are the `evaluate` stage's job (`evaluate.prompts`, `evaluate.seeds`)"
    ),
    "max_train_steps": "loraforge counts in epochs (`finetune.epochs`); `loraforge plan` does the steps arithmetic",
    "save_every_n_steps save_last_n_steps save_last_n_epochs_state save_last_n_steps_state "
    "save_n_epoch_ratio save_state_on_train_end": "checkpoints are saved every `finetune.save_every_n_epochs` epochs",
    "max_data_loader_n_workers persistent_data_loader_workers num_cpu_threads_per_process": (
        "training reads cached latents in-process; no loader workers to set"
    ),
    "full_fp16 fp8_base": "loraforge keeps float32 weights and autocasts (`finetune.mixed_precision`)",
    "full_bf16": "set `finetune.weights_dtype: bfloat16` (bf16 weights, float32 steps, stochastic rounding)",
    "clip_skip": "loraforge conditions on the text encoders' usual layer (clip skip 1)",
    "max_token_length": "loraforge encodes one 75-token CLIP window (`caption.max_tokens` reports longer captions)",
    "color_aug random_crop face_crop_aug_range": (
        "latents are encoded once per image (centre crop): no per-step augmentation"
    ),
    "bucket_no_upscale": "small images are upscaled by the `upscale` stage (`upscale.min_side`) before bucketing",
    "enable_bucket": "loraforge always uses aspect-ratio buckets",
    "v2 v_pred_like_loss scale_v_pred_loss_like_noise_pred": "SD 2.x options: loraforge trains SD1.5 and SDXL",
    "resume network_weights lora_network_weights dim_from_weights base_weights base_weights_multiplier": (
        "training starts from the base model; `finetune.resume: auto` continues loraforge's own runs"
    ),
    "min_timestep max_timestep": "timesteps are sampled over the full range",
    "zero_terminal_snr no_token_padding weighted_captions": "not implemented in loraforge",
    "masked_loss": (
        "kohya reads these masks from conditioning_data_dir: put each beside its image as `<stem>-mask.png` "
        "and set `finetune.masked_loss: true`"
    ),
    "caption_extension": "captions are read from `.txt` / `.caption` sidecar files",
    "secondary_separator enable_wildcard token_warmup_min "
    "token_warmup_step": "caption option loraforge does not have (edit the captions or `caption.template`)",
    "metadata_file in_json": "captions come from sidecar files or file names: write the metadata's captions as .txt",
    "block_lr down_lr_weight mid_lr_weight up_lr_weight block_dims block_alphas conv_block_dims conv_block_alphas "
    "conv_dims conv_alphas block_lr_zero_threshold": "loraforge uses one LR and one rank for every block",
    "lr_scheduler_args lr_scheduler_type": "loraforge's schedulers take no extra arguments",
    "stop_text_encoder_training": "the text encoders train for the whole run (`finetune.text_encoder_lr: 0` freezes)",
    "network_train_text_encoder_only": "loraforge always trains the UNet",
    LYCORIS: "LyCORIS option: loraforge trains lora, locon, loha, lokr, dora (`finetune.network_algo`)",
    LYCORIS_MAPPED: "applies to `finetune.network_algo` loha / lokr / dora only",
    "huber_schedule huber_scale": "loraforge's pseudo-Huber threshold is constant (`finetune.huber_c`)",
    "log_with log_tracker_name log_tracker_config log_config use_wandb wandb_api_key wandb_run_name": (
        "progress goes to the Prefect UI and reports/"
    ),
    "huggingface_repo_id huggingface_token huggingface_repo_type huggingface_repo_visibility huggingface_path_in_repo "
    "save_state_to_huggingface resume_from_huggingface async_upload": "loraforge uploads nothing; share a DVC remote",
    "metadata_title metadata_author metadata_description metadata_license metadata_tags training_comment": (
        "loraforge writes its own `ss_*` metadata"
    ),
    "gpu_ids multi_gpu num_machines main_process_port extra_accelerate_launch_args dynamo_backend dynamo_mode "
    "dynamo_use_fullgraph dynamo_use_dynamic lowram highvram": (
        "launcher setting: see `finetune.num_processes`, `finetune.accelerate_config`, `finetune.compile`"
    ),
    "flux1_checkbox sd3_checkbox guidance_scale discrete_flow_shift timestep_sampling model_prediction_type "
    "weighting_scheme logit_mean logit_std mode_scale t5xxl t5xxl_dtype t5xxl_max_token_length clip_l clip_g ae "
    "apply_t5_attn_mask split_mode train_blocks blocks_to_swap sd3_text_encoder_batch_size": (
        "Flux / SD3 setting: loraforge trains SD1.5 and SDXL"
    ),
}
REASONS: dict[str, str] = {key: reason for keys, reason in _REASON_GROUPS.items() for key in keys.split()}
# values that are loraforge's behaviour already: nothing to report
INERT: dict[str, tuple[Any, ...]] = {
    "clip_skip": (1,), "max_token_length": (75,), "caption_extension": (".txt", ".caption"), "enable_bucket": (True,),
    "save_model_as": ("safetensors",), "max_timestep": (1000,), "xformers": ("none",), "dynamo_backend": ("no",),
    "dynamo_mode": ("default",), "num_machines": (1,), "factor": (-1,), "unit": (1,), "huber_scale": (1,),
    "guidance_scale": (3.5,), "discrete_flow_shift": (3,), "timestep_sampling": ("sigma",), "logit_std": (1,),
    "model_prediction_type": ("sigma_scaled",), "weighting_scheme": ("logit_normal",), "mode_scale": (1.29,),
    "t5xxl_dtype": ("bf16",), "t5xxl_max_token_length": (512,), "sd3_text_encoder_batch_size": (1,),
    "train_blocks": ("all",), "algo": ("lora", "locon"), "network_module": ("networks.lora", "networks.lora_sdxl"),
    "LoRA_type": ("Standard", "Kohya LoCon", "LyCORIS/LoCon", "LoCon", *LYCORIS_TYPES),
}  # fmt: skip
# GUI bookkeeping, or settings that loraforge reads off the model itself
SILENT = set(
    "model_list sdxl sdxl_checkbox full_path generate_caption_database train_dir "
    "generate_image_buckets use_latent_files caption_metadata_filename latent_metadata_filename save_as_bool "
    "save_clip save_t5xxl dataset_config".split()
)
OPTIMIZERS = {
    "adamw": "AdamW", "adamw8bit": "AdamW8bit", "lion": "Lion", "prodigy": "Prodigy", "dadaptadam": "DAdaptAdam",
    "adafactor": "Adafactor", "pagedadamw": "bitsandbytes.optim.PagedAdamW", "sgdnesterov": "torch.optim.SGD",
    "pagedadamw8bit": "bitsandbytes.optim.PagedAdamW8bit", "pagedadamw32bit": "bitsandbytes.optim.PagedAdamW32bit",
    "lion8bit": "bitsandbytes.optim.Lion8bit", "pagedlion8bit": "bitsandbytes.optim.PagedLion8bit",
}  # fmt: skip
# each optimizer class's own weight_decay default: what kohya trains with when optimizer_args lacks it
# (kohya passes none of its own; loraforge's finetune.weight_decay default is AdamW's 0.01)
OWN_WEIGHT_DECAY = {
    "AdamW": 0.01, "AdamW8bit": 0.01, "Lion": 0.0, "Prodigy": 0.0, "DAdaptAdam": 0.0, "Adafactor": 0.0,
    "torch.optim.SGD": 0.0, "bitsandbytes.optim.PagedAdamW": 0.01, "bitsandbytes.optim.PagedAdamW8bit": 0.01,
    "bitsandbytes.optim.PagedAdamW32bit": 0.01, "bitsandbytes.optim.Lion8bit": 0.0,
    "bitsandbytes.optim.PagedLion8bit": 0.0,
}  # fmt: skip
PRECISIONS = {"fp16": "float16", "bf16": "bfloat16", "float": "float32", "fp32": "float32", "no": "float32"}
PICKLE_FILE = (".ckpt", ".pt", ".pth", ".bin")
REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")  # kohya: `2_lfx style` -> 2 repeats, class tokens `lfx style`
NETWORK_ARGS = ("conv_dim", "conv_alpha", "rank_dropout", "module_dropout", "algo", "dora_wd", "factor")
NETWORK_ARGS += ("decompose_both", "use_tucker")  # kept; others reported
# read by `loraforge.kohya.importer`'s map_* functions (mapped, reported, or ignored as kohya would)
HANDLED = set(
    "train_data_dir image_folder reg_data_dir pretrained_model_name_or_path vae no_half_vae sdxl_no_half_vae "
    "save_precision save_state resolution max_resolution learning_rate unet_lr text_encoder_lr learning_rate_te "
    "learning_rate_te1 learning_rate_te2 train_text_encoder network_train_unet_only max_train_epochs epoch "
    "lr_warmup_steps lr_warmup enable_ema use_ema ema_decay optimizer optimizer_type optimizer_args use_8bit_adam "
    "use_lion_optimizer network_dim network_alpha LoRA_type network_module noise_offset_type".split()
)
# the longer reasons of `loraforge.kohya.importer`
NOTES = {
    "pickle_file": "a pickle checkpoint loads only with `model.allow_pickle: true` (read with weights_only=True); "
    "a .safetensors copy needs no opt-in",
    "subset": "loraforge reads one folder of each kind: put each concept in an `N_name` folder "
    "(N = its repeats) under one folder",
    "reg_tokens": "reg images are captioned from sidecar files or their folder name",
    "optimizer": "loraforge has AdamW, AdamW8bit, Lion, Prodigy, DAdaptAdam, Adafactor, kohya's Paged / 8-bit "
    "variants, or a `module.Class` path",
    "network": "loraforge trains LoRA (LoCon with `finetune.conv_dim`)",
    "area": "loraforge's bucket area is resolution²; set `latents.resolution` to about",
    "ema": "no `ema_decay` given: set `finetune.ema_decay` (the 001 guide: 0.9995)",
    "ema_option": "EMA option: loraforge's EMA has only `finetune.ema_decay`",
}


def ignored_by_kohya(s: dict[str, Any], lora: bool) -> set[str]:
    """Settings kohya itself does not use in this config: the noise type not chosen, Huber knobs
    with an L2 loss, the sampler when nothing is sampled, LyCORIS knobs of a plain LoRA...

    Args:
        s: the settings.
        lora: whether the config trains a network.
    """
    unused = set()
    noise = str(s.get("noise_offset_type") or "").lower()
    if noise == "multires":
        unused |= {"noise_offset", "adaptive_noise_scale", "noise_offset_random_strength"}
    elif noise:
        unused |= {"multires_noise_iterations", "multires_noise_discount"}
    if str(s.get("loss_type") or "l2") not in ("huber", "smooth_l1"):
        unused |= {"huber_c", "huber_schedule", "huber_scale"}
    if not any(number(s.get(k)) for k in ("sample_every_n_epochs", "sample_every_n_steps")):
        unused |= {"sample_sampler", "sample_prompts"}
    if "LoRA_type" in s and not str(s["LoRA_type"]).startswith("LyCORIS"):
        unused |= set(f"{LYCORIS} {LYCORIS_MAPPED}".split()) | (
            {"conv_dim", "conv_alpha"} if s["LoRA_type"] == "Standard" else set()
        )
    if not lora:  # a finetune's network keys, if any, are inert
        unused |= {"network_dim", "network_alpha", "conv_dim", "conv_alpha", "unet_lr", "text_encoder_lr"}
    return unused | ({"max_train_steps"} if number(s.get("max_train_epochs")) or number(s.get("epoch")) else set())


def typed(text: str) -> Any:
    """A kohya `key=value` value as data (kohya evaluates it as a Python literal; this only parses).

    Args:
        text: the value: True/False/None, an int, a float, or comma-separated values (a list);
            anything else stays a string.
    """
    text = text.strip().strip("\"'")
    if text[:1] + text[-1:] in ("[]", "()"):  # a Python list or tuple literal: `betas=[0.9,0.99]`
        return [typed(part) for part in text[1:-1].split(",") if part.strip()]
    if "," in text:
        return [typed(part) for part in text.split(",") if part.strip()]
    if text.lower() in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[text.lower()]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_pairs(value: Any, key: str, where: Path) -> dict[str, Any]:
    """`optimizer_args` / `network_args`: a list of `k=v` (TOML) or one string of them (GUI).

    Args:
        value: the setting's value.
        key: its name, for the error message.
        where: the file it is from.
    """
    try:
        items = shlex.split(value) if isinstance(value, str) else [str(v) for v in value]
    except (TypeError, ValueError) as e:
        raise InputError(f"{where}: `{key}` = {value!r}: expected `name=value` items ({e})") from None
    pairs = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise InputError(f"{where}: `{key}`: {item!r} is not `name=value`")
        pairs[name.strip()] = typed(text)
    return pairs


def parse_flags(text: Any, where: Path) -> dict[str, Any]:
    """The GUI's `additional_parameters` (`--enable_ema --ema_decay=0.9995`) as settings (values as strings).

    Args:
        text: the setting's value.
        where: the file it is from.
    """
    try:
        tokens = shlex.split(text)
    except (AttributeError, ValueError) as e:
        raise InputError(f"{where}: `additional_parameters` = {text!r}: cannot be read as flags ({e})") from None
    flags: dict[str, Any] = {}
    for i, token in enumerate(tokens):
        if not token.startswith("--"):
            continue  # a value, taken with its flag below
        name, sep, value = token[2:].partition("=")
        if not sep:
            values = list(itertools.takewhile(lambda t: not t.startswith("--"), tokens[i + 1 :]))
            # several values (`--optimizer_args "a=1" "b=2"`): kept quoted, as `parse_pairs` splits them
            value = values[0] if len(values) == 1 else " ".join(shlex.quote(v) for v in values)
            sep = "=" if values else ""
        flags[name] = value if sep else True  # a string, typed by the key's table entry like the GUI's
    return flags


def coerce(value: Any, kind: str, key: str, where: Path) -> Any:
    """`value` as `kind` (f, i, b, s; F/I alike), accepting the GUI's numbers-in-strings.

    Args:
        value: the setting's value.
        kind: the kind wanted.
        key: its name, for the error message.
        where: the file it is from.
    """
    num = number(value)
    if kind == "b" and isinstance(value, bool):
        return value
    if kind == "b" and str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    if kind in "iI" and num is not None and float(num).is_integer():
        return int(num)
    if kind in "fF" and num is not None:
        return float(num)
    if kind == "s" and isinstance(value, str):
        return value
    raise InputError(f"{where}: `{key}` = {value!r}: expected {_KINDS[kind.lower()]}")


def number(value: Any) -> float | int | None:
    """`value` as a number (the GUI writes `"100"` as often as `100`); None when it is not one.

    Args:
        value: a setting's value.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    try:
        return float(value.strip()) if isinstance(value, str) else None
    except ValueError:
        return None


def lycoris_settings(s: dict[str, Any], where: Path) -> list[tuple[str, Any, str]]:
    """The `finetune.network_algo` (and its LoKr / Tucker options) a LyCORIS config asks for, as
    (params key, value, kohya key): `algo=loha|lokr` (or the GUI's `LyCORIS/LoHa|LoKr`), and
    `dora_wd=True` on a LoRA / LoCon -> `dora`. Empty for a plain LoRA.

    Args:
        s: the settings (`network_args` spelled out).
        where: the config file (error messages).
    """
    algo = str(s.get("algo") or LYCORIS_TYPES.get(str(s.get("LoRA_type")), "")).lower()
    source = "algo" if s.get("algo") else "LoRA_type"
    dora = s.get("dora_wd") not in (None, "") and coerce(s["dora_wd"], "b", "dora_wd", where)
    if algo not in ("loha", "lokr") and not (dora and algo in ("", "lora", "locon")):
        return []
    out = [("finetune.network_algo", algo if algo in ("loha", "lokr") else "dora", source if not dora else "dora_wd")]
    if algo == "lokr" and s.get("factor") not in (None, "", -1, "-1"):
        out.append(("finetune.network_factor", coerce(s["factor"], "i", "factor", where), "factor"))
    for key in ("decompose_both", "use_tucker"):
        if s.get(key) not in (None, "") and coerce(s[key], "b", key, where) and (key == "use_tucker" or algo == "lokr"):
            out.append((f"finetune.{key}", True, key))
    return out


OTHER_ALGOS = {  # LyCORIS / kohya network kinds loraforge does not train, by algo or GUI LoRA_type tail
    "ia3": "an iA3", "diag-oft": "a Diag-OFT", "oft": "an OFT", "boft": "a BOFT", "glora": "a GLoRA",
    "dylora": "a DyLoRA", "kohya dylora": "a DyLoRA", "full": "a LyCORIS full (native fine-tuning)",
    "native fine-tuning": "a LyCORIS full (native fine-tuning)", "lora-fa": "a LoRA-FA",
}  # fmt: skip


def switched_on(value: Any) -> bool:
    """A GUI checkbox or flag that is set (`true`, `"True"`, 1)."""
    return value is True or str(value).strip().lower() in ("true", "1")


def other_kind(s: dict[str, Any]) -> str | None:
    """What a config trains when it is not an SD1.5/SDXL LoRA, LoCon, LoHa, LoKr, DoRA or full
    finetune (a Flux or SD3 model, textual inversion, ControlNet-LLLite, another network kind),
    else None.

    Args:
        s: the settings (`network_args` spelled out).
    """
    module, lora_type = str(s.get("network_module") or ""), str(s.get("LoRA_type") or "")
    if switched_on(s.get("flux1_checkbox")) or "flux" in module or lora_type.startswith("Flux"):
        return "a Flux config"
    if switched_on(s.get("sd3_checkbox")) or "sd3" in module or lora_type.startswith("SD3"):
        return "an SD3 config"
    if str(s.get("token_string") or "").strip():
        return "a textual-inversion config"
    if "lllite" in module or not inactive(s.get("cond_emb_dim"), "cond_emb_dim"):
        return "a ControlNet-LLLite config"
    if module == "networks.dylora":
        return "a DyLoRA network config"
    for name in (str(s.get("algo") or "").lower(), lora_type.split("/")[-1].lower()):
        if name in OTHER_ALGOS:
            return f"{OTHER_ALGOS[name]} network config"
    return None


def refuse_other_kinds(s: dict[str, Any], where: Path) -> None:
    """Stop, naming what the config is, when loraforge would train something else from it.

    Args:
        s: the settings (`network_args` spelled out).
        where: the config file.

    Raises:
        InputError: the config is for another model family or training method.
    """
    kind = other_kind(s)
    if kind is not None:
        raise InputError(
            f"{where}: {kind}: loraforge trains SD1.5 and SDXL full finetunes and LoRA, LoCon, LoHa, LoKr "
            "and DoRA networks; nothing was imported"
        )


def inactive(value: Any, key: str) -> bool:
    """Whether a setting is off, empty or equal to loraforge's behaviour: nothing to carry over.

    Args:
        value: its value.
        key: its kohya key (for `INERT`).
    """
    loose = number(value) if isinstance(value, str) and number(value) is not None else value
    return loose in (None, "", False, 0, [], {}) or loose in INERT.get(key, ())


def read_config(path: Path, flatten: bool = False) -> dict[str, Any]:
    """A config file as one mapping: JSON or TOML by suffix (other names: JSON, then TOML).

    Args:
        path: the file.
        flatten: merge top-level tables into the mapping, as sd-scripts reads a training TOML
            (`[optimizer_arguments]`, `[training_arguments]`... group its flags).
    """
    if not path.is_file():
        raise MissingInput(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot be read as text: {e}") from None
    errors = []
    for kind, parse in (("JSON", json.loads), ("TOML", tomllib.loads)):
        if path.suffix.lower() in (".json", ".toml") and path.suffix.lower() != f".{kind.lower()}":
            continue
        try:
            data = parse(text)
        except ValueError as e:  # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
            errors.append(f"not valid {kind} ({e})")
            continue
        if not isinstance(data, dict):
            raise InputError(f"{path}: must hold a mapping of settings, got {type(data).__name__}")
        if flatten:
            data = {
                k: v
                for key, value in data.items()
                for k, v in (value if isinstance(value, dict) else {key: value}).items()
            }
        return data
    raise InputError(f"{path}: " + "; ".join(errors))


def dataset_settings(data: dict[str, Any], where: Path) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """The first dataset's settings (`[general]` under `[[datasets]]`), its subsets with their own
    keys on top of those, and how many datasets the file has.

    Args:
        data: the dataset config.
        where: its file.
    """
    general, datasets = data.get("general") or {}, data.get("datasets") or []
    if (
        not isinstance(general, dict)
        or not isinstance(datasets, list)
        or not all(isinstance(d, dict) for d in datasets)
    ):
        raise InputError(f"{where}: `general` must be a table and `datasets` an array of tables")
    first = datasets[0] if datasets else {}
    settings = {**general, **{k: v for k, v in first.items() if k != "subsets"}}
    subsets = first.get("subsets") or []
    if not isinstance(subsets, list) or not all(isinstance(s, dict) for s in subsets):
        raise InputError(f"{where}: `datasets[0].subsets` must be an array of tables")
    return settings, [{**settings, **s} for s in subsets], len(datasets)
