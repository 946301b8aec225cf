"""Parameter counts for the memory estimate (`loraforge.planning.memory`), without loading or downloading weights.

Each component is built from its config on torch's meta device (shapes, no storage):
- a local diffusers folder (a builtin's written folder, a hub snapshot already in the cache): its
  `unet/config.json` and `text_encoder*/config.json`;
- the real SD1.5 / SDXL (`reference_architecture`): the UNet configs shipped in
  `loraforge/assets/configs/` and the CLIP text configs below, written from their published sizes.

The LoRA adapters mode lora would attach are sized from the same modules `loraforge.training.lora_net`
adapts (`loraforge.lora.format.unet_targets` / `text_encoder_targets`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Mapping

from loraforge.planning.memory import Architecture, Component, ParamStats

CONFIG_DIR = Path(__file__).resolve().parents[1] / "assets" / "configs"
# CLIP ViT-L/14's text tower (openai/clip-vit-large-patch14): SD1.5's encoder and SDXL's first, 123.06 M.
CLIP_L: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
# OpenCLIP ViT-bigG/14's text tower with its projection: SDXL's second encoder, 694.66 M.
CLIP_BIG_G: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
REFERENCE_NATIVE = {"sd15": 512, "sdxl": 1024}  # pixels: UNet sample_size × 8


def _unet(config: Mapping[str, Any]) -> Any:
    """A UNet2DConditionModel on the meta device."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def _text_encoder(config: Mapping[str, Any], projection: bool) -> Any:
    """A CLIPTextModel (or CLIPTextModelWithProjection) on the meta device."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    with torch.device("meta"):
        return cls(CLIPTextConfig.from_dict(dict(config)))


def _shapes(module: Any) -> Iterator[tuple[int, ...]]:
    return (tuple(p.shape) for p in module.parameters())


def lora_shapes(module: Any, component: str, dim: int, conv_dim: int) -> list[tuple[int, ...]]:
    """Shapes of the LoRA matrices `loraforge.training.lora_net.add_lora` would attach.

    Linear (out, in): down (dim, in), up (out, dim). Conv (out, in, kh, kw): down (r, in, kh, kw),
    up (out, r, 1, 1), with r = conv_dim for kernels over 1×1 (skipped when conv_dim is 0), else dim.

    Args:
        module: the component (meta or real).
        component: `unet`, `text_encoder` or `text_encoder_2`.
        dim: `finetune.network_dim`.
        conv_dim: `finetune.conv_dim`.
    """
    from loraforge.lora.format import text_encoder_targets, unet_targets

    keys = list(module.state_dict().keys())
    names = unet_targets(keys, conv=conv_dim > 0) if component == "unet" else text_encoder_targets(keys)
    shapes: list[tuple[int, ...]] = []
    for name in names:
        weight = tuple(module.get_submodule(name).weight.shape)
        big_kernel = len(weight) == 4 and weight[2:] != (1, 1)
        if big_kernel and not conv_dim:
            continue
        rank = conv_dim if big_kernel else dim
        if len(weight) == 4:
            shapes += [(rank, weight[1], *weight[2:]), (weight[0], rank, 1, 1)]
        else:
            shapes += [(rank, weight[1]), (weight[0], rank)]
    return shapes


def _component(module: Any, name: str, dim: int, conv_dim: int, config: Mapping[str, Any] | None) -> Component:
    return Component(
        params=ParamStats.from_shapes(_shapes(module)),
        lora=ParamStats.from_shapes(lora_shapes(module, name, dim, conv_dim)),
        layers=int(config["num_hidden_layers"]) if config else 0,
        width=int(config["hidden_size"]) if config else 0,
    )


def build_architecture(
    arch: str, unet_config: Mapping[str, Any], text_configs: list[Mapping[str, Any]], dim: int, conv_dim: int
) -> Architecture:
    """The Architecture of a UNet config and its text-encoder configs (the second has the projection).

    Args:
        arch: `sd15` or `sdxl`.
        unet_config: the UNet's config.json contents.
        text_configs: one CLIPTextConfig dict per encoder, in order.
        dim: `finetune.network_dim` (LoRA sizes).
        conv_dim: `finetune.conv_dim`.
    """
    components = {"unet": _component(_unet(unet_config), "unet", dim, conv_dim, None)}
    for i, config in enumerate(text_configs):
        name = ("text_encoder", "text_encoder_2")[i]
        components[name] = _component(_text_encoder(config, projection=i == 1), name, dim, conv_dim, config)
    return Architecture(arch=arch, unet_config=dict(unet_config), components=components)


def reference_architecture(arch: str, dim: int = 16, conv_dim: int = 0) -> Architecture:
    """The real SD1.5 or SDXL, from the shipped UNet configs and the CLIP sizes above.

    Args:
        arch: `sd15` or `sdxl`.
        dim: `finetune.network_dim`.
        conv_dim: `finetune.conv_dim`.
    """
    if arch not in REFERENCE_NATIVE:
        raise ValueError(f"`--arch` must be one of {', '.join(REFERENCE_NATIVE)}, got {arch!r}")
    unet = json.loads((CONFIG_DIR / f"{arch}-unet.json").read_text(encoding="utf-8"))
    return build_architecture(arch, unet, [CLIP_L, CLIP_BIG_G] if arch == "sdxl" else [CLIP_L], dim, conv_dim)


def folder_architecture(path: Path, arch: str, dim: int = 16, conv_dim: int = 0) -> Architecture:
    """A local diffusers folder's architecture, from its components' config.json files.

    Args:
        path: the folder (model_index.json, unet/, text_encoder/...).
        arch: `sd15` or `sdxl` (`loraforge.models.loading.detect_arch`).
        dim: `finetune.network_dim`.
        conv_dim: `finetune.conv_dim`.
    """

    def config(component: str) -> dict[str, Any]:
        file = Path(path) / component / "config.json"
        try:
            return json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"{path}: component `{component}` has no config.json") from None

    encoders = ["text_encoder", "text_encoder_2"] if arch == "sdxl" else ["text_encoder"]
    return build_architecture(arch, config("unet"), [config(e) for e in encoders], dim, conv_dim)
