"""diffusers → original (ldm/sgm) state-dict keys: what A1111, ComfyUI and the single-file loader read.

An original-layout checkpoint is one file with every component under a prefix:

| component | SD1.5 | SDXL |
| --- | --- | --- |
| UNet | `model.diffusion_model.` (sgm block numbering) | same |
| VAE | `first_stage_model.` (`encoder.down.N.block.M`...) | same |
| CLIP ViT-L | `cond_stage_model.transformer.` + transformers' keys | `conditioner.embedders.0.transformer.` |
| OpenCLIP bigG | – | `conditioner.embedders.1.model.` (OpenCLIP names, fused q/k/v) |

The UNet names come from `loraforge.models.kohya_names.sgm_module_name` (the mapping kohya LoRA names
use); the VAE and OpenCLIP mappings are below. diffusers ships the reverse direction only
(`from_single_file`), which the round-trip test uses to check this one.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from loraforge.models.kohya_names import layout_from_config, sgm_module_name

if TYPE_CHECKING:
    import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = {
    "sd15": ("cond_stage_model.transformer.",),
    "sdxl": ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2"}
_OPEN_CLIP_LAYER |= {"mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def unet_to_original(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict under sgm names, prefixed `model.diffusion_model.`.

    Args:
        state: `unet.state_dict()`.
        config: the UNet's config (`unet.config`), for the block layout.
    """
    layout = layout_from_config(config)
    out = {}
    for key, value in state.items():
        module, leaf = key.rsplit(".", 1)
        out[f"{UNET_PREFIX}{sgm_module_name(module, layout)}.{leaf}"] = value
    return out


def _vae_key(key: str, n_up: int) -> str:
    """One diffusers AutoencoderKL key under its ldm name (`decoder.up_blocks.0` is ldm's `decoder.up.3`)."""
    key = key.replace("conv_norm_out", "norm_out")
    if m := re.match(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)$", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)$", key):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
    if m := re.match(
        r"^(encoder\.down|decoder\.up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)$", key
    ):
        block = int(m[2]) if m[1].startswith("encoder") else n_up - 1 - int(m[2])
        if m[3] == "resnets":
            name, leaf = m[5].rsplit(".", 1)
            return f"{m[1]}.{block}.block.{m[4]}.{_VAE_RESNET.get(name, name)}.{leaf}"
        return f"{m[1]}.{block}.{m[3][:-2]}.{m[5]}"  # downsamplers.0.conv → downsample.conv
    return key  # conv_in, conv_out, quant_conv, post_quant_conv


def vae_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict under ldm names, prefixed `first_stage_model.`; the
    mid-block attention's linear q/k/v/out (C, C) become ldm's 1×1 convolutions (C, C, 1, 1).

    Args:
        state: `vae.state_dict()`.
    """
    n_up = 1 + max(int(m[1]) for k in state if (m := re.match(r"^decoder\.up_blocks\.(\d+)\.", k)))
    out = {}
    for key, value in state.items():
        name = _vae_key(key, n_up)
        if ".mid.attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[VAE_PREFIX + name] = value
    return out


def clip_to_original(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel state dict as SD keeps it: `text_model.*` keys under `prefix`
    (transformers ≥ 5.6 drops the `text_model.` level from CLIPTextModel's own keys).

    Args:
        state: `text_encoder.state_dict()`.
        prefix: `cond_stage_model.transformer.` (SD1.5) or `conditioner.embedders.0.transformer.` (SDXL).
    """
    return {
        prefix + (k if k.startswith("text_model.") else "text_model." + k): v
        for k, v in state.items()
        if not k.endswith("position_ids")
    }


def open_clip_to_original(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection state dict under OpenCLIP names (SDXL's second
    encoder): q/k/v fused into `attn.in_proj_*` (3C, C), `text_projection` transposed to (C, P).

    Args:
        state: `text_encoder_2.state_dict()`.
        prefix: `conditioner.embedders.1.model.`.
    """
    import torch

    out = {
        prefix + "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        prefix + "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": state["text_model.final_layer_norm.weight"],
        prefix + "ln_final.bias": state["text_model.final_layer_norm.bias"],
        prefix + "text_projection": state["text_projection.weight"].T.contiguous(),
    }
    layers = {int(m[1]) for k in state if (m := re.match(r"^text_model\.encoder\.layers\.(\d+)\.", k))}
    for i in sorted(layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            qkv = [state[f"{src}self_attn.{p}_proj.{leaf}"] for p in "qkv"]
            out[f"{dst}attn.in_proj_{leaf}"] = torch.cat(qkv, dim=0)
            for name, new in _OPEN_CLIP_LAYER.items():
                out[f"{dst}{new}.{leaf}"] = state[f"{src}{name}.{leaf}"]
    return out


def pipeline_to_original(pipe: Any, arch: str) -> dict[str, torch.Tensor]:
    """The whole pipeline (UNet, VAE, text encoder(s)) as one original-layout state dict.

    Args:
        pipe: a StableDiffusionPipeline or StableDiffusionXLPipeline (or anything with `unet`,
            `vae`, `text_encoder` and, for SDXL, `text_encoder_2`).
        arch: `sd15` or `sdxl`.
    """
    names = ("unet", "vae", "text_encoder", "text_encoder_2") if arch == "sdxl" else ("unet", "vae", "text_encoder")
    states = {name: getattr(pipe, name).state_dict() for name in names}
    return states_to_original(states, dict(pipe.unet.config), arch)


def states_to_original(
    states: dict[str, dict[str, torch.Tensor]], unet_config: dict[str, Any], arch: str
) -> dict[str, torch.Tensor]:
    """Component state dicts (diffusers/transformers key names) as one original-layout state dict.

    Args:
        states: `unet`, `vae`, `text_encoder` (and `text_encoder_2` for SDXL) -> state dict.
        unet_config: the UNet's config (block layout).
        arch: `sd15` or `sdxl`.
    """
    out = unet_to_original(states["unet"], unet_config)
    out |= vae_to_original(states["vae"])
    out |= clip_to_original(states["text_encoder"], TEXT_PREFIXES[arch][0])
    if arch == "sdxl":
        out |= open_clip_to_original(states["text_encoder_2"], TEXT_PREFIXES[arch][1])
    return {k: v.detach().contiguous() for k, v in out.items()}


def open_clip_from_original(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The inverse of `open_clip_to_original`: OpenCLIP keys under `prefix` → transformers'
    CLIPTextModelWithProjection keys (fused q/k/v split in three, `text_projection` transposed back).

    Args:
        state: an original-layout checkpoint's tensors.
        prefix: `conditioner.embedders.1.model.`.
    """
    inverse = {new: old for old, new in _OPEN_CLIP_LAYER.items()}
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if m := re.match(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", name):
            for part, chunk in zip("qkv", value.chunk(3, dim=0)):  # (3C, ...) → q, k, v
                out[f"text_model.encoder.layers.{m[1]}.self_attn.{part}_proj.{m[2]}"] = chunk.contiguous()
        elif m := re.match(r"^transformer\.resblocks\.(\d+)\.(.*)\.(weight|bias)$", name):
            out[f"text_model.encoder.layers.{m[1]}.{inverse[m[2]]}.{m[3]}"] = value
        elif name in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[name]] = value.T.contiguous() if name == "text_projection" else value
    return out


_OPEN_CLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection": "text_projection.weight",
}
