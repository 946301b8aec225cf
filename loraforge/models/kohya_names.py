"""Module names as kohya sd-scripts writes them in LoRA files, for SD1.5 and SDXL UNets.

kohya trains SD1.x on a UNet that keeps diffusers' module names, so its SD1.5 LoRAs name UNet
modules as diffusers does (`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`).
For SDXL it trains Stability's original ("sgm"/ldm) UNet, so its SDXL LoRAs use that layout:

    diffusers                              sgm (kohya SDXL)
    conv_in                                input_blocks.0.0
    down_blocks.i.resnets.j                input_blocks.(1 + i·(L+1) + j).0
    down_blocks.i.attentions.j             input_blocks.(1 + i·(L+1) + j).1
    down_blocks.i.downsamplers.0.conv      input_blocks.((i+1)·(L+1)).0.op
    mid_block.resnets.0 / attentions.0 / resnets.1   middle_block.0 / .1 / .2
    up_blocks.i.resnets.j                  output_blocks.(i·(L+1) + j).0
    up_blocks.i.attentions.j               output_blocks.(i·(L+1) + j).1
    up_blocks.i.upsamplers.0.conv          output_blocks.(i·(L+1) + L).(2 with attention, else 1).conv

with L = `layers_per_block` (up blocks have L+1 layers), and inside a ResNet block conv1 →
`in_layers.2`, conv2 → `out_layers.3`, time_emb_proj → `emb_layers.1`, conv_shortcut →
`skip_connection`. Names inside a transformer (proj_in, attn1.to_q, ff.net.2...) are the same in
both. The block indices are computed from the UNet config, never from a table, so the same code
names the tiny builtin SDXL and the real one; diffusers' loader
(`_maybe_map_sgm_blocks_to_diffusers`) inverts exactly this mapping.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

CONFIG_DIR = Path(__file__).resolve().parents[1] / "assets" / "configs"
# Shipped copies of the real models' unet/config.json (no weights).
REAL_UNET_CONFIGS = {"sd15": CONFIG_DIR / "sd15-unet.json", "sdxl": CONFIG_DIR / "sdxl-unet.json"}

KOHYA_PREFIXES = ("lora_unet", "lora_te", "lora_te1", "lora_te2")
Prefix = Literal["lora_unet", "lora_te", "lora_te1", "lora_te2"]
UnetNaming = Literal["diffusers", "sgm"]
# Which naming kohya uses for each architecture's UNet.
KOHYA_UNET_NAMING: dict[str, UnetNaming] = {"sd15": "diffusers", "sdxl": "sgm"}

_RESNET_INNER = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
    "norm1": "in_layers.0",
    "norm2": "out_layers.0",
}
_BLOCK = re.compile(
    r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$"
)


@dataclass(frozen=True)
class UnetLayout:
    """What the sgm numbering depends on.

    Attributes:
        layers_per_block: ResNet (+ attention) layers per down block (up blocks have one more).
        down_attention: per down block, whether it has attentions (CrossAttnDownBlock2D).
        up_attention: per up block, whether it has attentions (CrossAttnUpBlock2D).
    """

    layers_per_block: int
    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]


def layout_from_config(config: Mapping[str, Any]) -> UnetLayout:
    """The layout of a diffusers `UNet2DConditionModel` from its config.json contents.

    Args:
        config: the parsed config (needs `layers_per_block`, `down_block_types`, `up_block_types`).
    """
    lpb = config.get("layers_per_block")
    if not isinstance(lpb, int) or lpb < 1:
        raise ValueError(f"UNet config `layers_per_block` must be one integer ≥ 1 for sgm names, got {lpb!r}")
    down, up = config.get("down_block_types"), config.get("up_block_types")
    if not down or not up or len(down) != len(up):
        raise ValueError(
            f"UNet config `down_block_types` {down!r} and `up_block_types` {up!r} must be non-empty and as long"
        )
    return UnetLayout(lpb, tuple("CrossAttn" in t for t in down), tuple("CrossAttn" in t for t in up))


def layout_from_keys(keys: Iterable[str]) -> UnetLayout:
    """The layout of a diffusers UNet from its state-dict key names alone (single-file checkpoints).

    Args:
        keys: state-dict keys such as `down_blocks.1.attentions.0.proj_in.weight`.
    """
    resnets: dict[int, set[int]] = {}
    down_att: set[int] = set()
    up_att: set[int] = set()
    n_up = -1
    for key in keys:
        if m := re.match(r"^down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.", key):
            block = int(m[1])
            if m[2] == "resnets":
                resnets.setdefault(block, set()).add(int(m[3]))
            else:
                down_att.add(block)
        elif m := re.match(r"^up_blocks\.(\d+)\.(\w+)\.", key):
            n_up = max(n_up, int(m[1]))
            if m[2] == "attentions":
                up_att.add(int(m[1]))
    if not resnets:
        raise ValueError("`keys` hold no `down_blocks.N.resnets.M` weights: not a diffusers UNet state dict")
    counts = {len(v) for v in resnets.values()}
    if len(counts) != 1:
        raise ValueError(
            f"`keys`: down blocks have different ResNet counts {sorted(counts)}; sgm names need one `layers_per_block`"
        )
    n_down = max(resnets) + 1
    return UnetLayout(
        counts.pop(), tuple(i in down_att for i in range(n_down)), tuple(i in up_att for i in range(n_up + 1))
    )


def load_real_config(arch: Literal["sd15", "sdxl"]) -> dict[str, Any]:
    """The shipped unet/config.json of the real SD1.5 or SDXL base model.

    Args:
        arch: `sd15` (runwayml/stable-diffusion-v1-5) or `sdxl` (stabilityai/stable-diffusion-xl-base-1.0).
    """
    if arch not in REAL_UNET_CONFIGS:
        raise ValueError(f"`arch` must be one of {', '.join(REAL_UNET_CONFIGS)}, got {arch!r}")
    return json.loads(REAL_UNET_CONFIGS[arch].read_text(encoding="utf-8"))


def _sgm_block(kind: str, block: str, index: int, layout: UnetLayout) -> str:
    """The sgm prefix of one diffusers block part (`down_blocks.1` + `attentions` + 0 → `input_blocks.4.1`)."""
    lpb = layout.layers_per_block
    if block == "mid_block":
        return {
            ("resnets", 0): "middle_block.0",
            ("attentions", 0): "middle_block.1",
            ("resnets", 1): "middle_block.2",
        }[(kind, index)]
    i = int(block.split(".")[1])
    if block.startswith("down_blocks"):
        if kind == "downsamplers":
            return f"input_blocks.{(i + 1) * (lpb + 1)}.0"
        return f"input_blocks.{1 + i * (lpb + 1) + index}.{0 if kind == 'resnets' else 1}"
    if kind == "upsamplers":
        return f"output_blocks.{i * (lpb + 1) + lpb}.{2 if layout.up_attention[i] else 1}"
    return f"output_blocks.{i * (lpb + 1) + index}.{0 if kind == 'resnets' else 1}"


def sgm_module_name(module: str, layout: UnetLayout) -> str:
    """The sgm (original Stability) name of a diffusers UNet module.

    Args:
        module: dotted diffusers module name, e.g. `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`.
        layout: the UNet's layout (`layout_from_config` or `layout_from_keys`).

    Example:
        with SDXL's layout, `down_blocks.1.attentions.0.proj_in` → `input_blocks.4.1.proj_in` and
        `up_blocks.0.upsamplers.0.conv` → `output_blocks.2.2.conv`.
    """
    m = _BLOCK.match(module)
    if m is None:
        top = {
            "conv_in": "input_blocks.0.0",
            "conv_out": "out.2",
            "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2",
            "conv_norm_out": "out.0",
        }
        if module in top:
            return top[module]
        raise ValueError(f"`module` {module!r} is not a UNet module with an sgm name")
    block, kind, index, inner = m[1], m[2], int(m[3]), m[4] or ""
    try:
        prefix = _sgm_block(kind, block, index, layout)
    except (KeyError, IndexError):
        raise ValueError(f"`module` {module!r} does not fit the UNet layout {layout}") from None
    if kind == "resnets":
        inner = _RESNET_INNER.get(inner, inner)
    elif kind == "downsamplers" and inner == "conv":
        inner = "op"
    return f"{prefix}.{inner}" if inner else prefix


def kohya_unet_name(module: str, naming: UnetNaming, layout: UnetLayout | None = None) -> str:
    """The kohya LoRA name of a diffusers UNet module: `lora_unet_` + its (sgm) name with `_` for `.`.

    Args:
        module: dotted diffusers module name.
        naming: `diffusers` (kohya's SD1.x convention) or `sgm` (kohya's SDXL convention).
        layout: required for `sgm`.
    """
    if naming == "sgm":
        if layout is None:
            raise ValueError("`layout` is required for `naming='sgm'`")
        module = sgm_module_name(module, layout)
    elif naming != "diffusers":
        raise ValueError(f"`naming` must be `diffusers` or `sgm`, got {naming!r}")
    return "lora_unet_" + module.replace(".", "_")


def kohya_unet_names(modules: Iterable[str], naming: UnetNaming, layout: UnetLayout | None = None) -> dict[str, str]:
    """Map diffusers UNet module names to kohya LoRA names; fails if two names collide.

    Args:
        modules: dotted diffusers module names (e.g. from `unet_targets`).
        naming: `diffusers` or `sgm` (see `kohya_unet_name`).
        layout: required for `sgm`.
    """
    names = {module: kohya_unet_name(module, naming, layout) for module in modules}
    if len(set(names.values())) != len(names):
        raise ValueError(f"`modules` give colliding kohya names with naming {naming!r}")
    return names


def real_unet_keys(arch: Literal["sd15", "sdxl"]) -> list[str]:
    """Every state-dict key of the real SD1.5 or SDXL UNet, built on the meta device (no weights).

    Args:
        arch: `sd15` or `sdxl`.
    """
    import torch
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in load_real_config(arch).items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    return [name for name, _ in unet.named_parameters()]


# --------------------------------------------------------------------------------------------
# Which modules get a LoRA (from state-dict key names only), and their names
# --------------------------------------------------------------------------------------------

_UNET_BLOCK = r"(?:down_blocks\.\d+|mid_block|up_blocks\.\d+)"
# Linear and 1x1-conv weights inside a Transformer2DModel (kohya: UNET_TARGET_REPLACE_MODULE).
_UNET_ATTENTION = re.compile(
    rf"^{_UNET_BLOCK}\.attentions\.\d+\."
    r"(?:proj_in|proj_out|transformer_blocks\.\d+\."
    r"(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))\.weight$"
)
# Every conv/linear weight of ResnetBlock2D, Downsample2D and Upsample2D (kohya's "conv_dim"
# LoRA, a.k.a. LoCon): the 3x3 convs get `conv_dim`, time_emb_proj and 1x1 conv_shortcut `dim`.
_UNET_CONV = re.compile(
    rf"^{_UNET_BLOCK}\."
    r"(?:resnets\.\d+\.(?:conv1|conv2|conv_shortcut|time_emb_proj)|(?:downsamplers|upsamplers)\.0\.conv)"
    r"\.weight$"
)
# CLIP text encoder: attention projections and MLP (kohya: TEXT_ENCODER_TARGET_REPLACE_MODULE).
# transformers ≥ 5 flattens CLIPTextModel (`encoder.layers...`, no `text_model.` level), while
# CLIPTextModelWithProjection and every checkpoint on disk before it keep `text_model.`.
_TEXT_ENCODER = re.compile(
    r"^(?:text_model\.)?encoder\.layers\.\d+\."
    r"(?:self_attn\.(?:q_proj|k_proj|v_proj|out_proj)|mlp\.(?:fc1|fc2))\.weight$"
)


def unet_targets(keys: Iterable[str], conv: bool) -> list[str]:
    """UNet modules that get a LoRA, chosen from diffusers state-dict key names.

    Args:
        keys: state-dict keys of a diffusers `UNet2DConditionModel` (SD1.5 or SDXL), e.g.
            `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight`.
        conv: also target the ResNet, downsampler and upsampler convolutions (and the ResNet's
            `time_emb_proj` / `conv_shortcut`), as kohya does when `conv_dim` is set.

    Returns:
        Sorted module names (keys without `.weight`).
    """
    patterns = [_UNET_ATTENTION, _UNET_CONV] if conv else [_UNET_ATTENTION]
    return _matching_modules(keys, patterns)


def text_encoder_targets(keys: Iterable[str]) -> list[str]:
    """CLIP text-encoder modules that get a LoRA: q/k/v/out projections and the MLP's fc1/fc2.

    Args:
        keys: state-dict keys of a transformers `CLIPTextModel` or `CLIPTextModelWithProjection`,
            e.g. `text_model.encoder.layers.0.self_attn.q_proj.weight`, or
            `encoder.layers.0.self_attn.q_proj.weight` (CLIPTextModel in transformers ≥ 5).

    Returns:
        Sorted module names (keys without `.weight`), spelled as in `keys`.
    """
    return _matching_modules(keys, [_TEXT_ENCODER])


def _matching_modules(keys: Iterable[str], patterns: list[re.Pattern[str]]) -> list[str]:
    modules = {key[: -len(".weight")] for key in keys if any(p.match(key) for p in patterns)}
    return sorted(modules)


def kohya_name(prefix: Prefix, module: str) -> str:
    """The kohya name of a module: `prefix` + `_` + the module name with `.` replaced by `_`.

    Text-encoder modules are always named as in the checkpoint layout every tool expects
    (`text_model.encoder.layers.N...`), also when transformers ≥ 5 calls them `encoder.layers.N...`.

    UNet modules keep their diffusers names here, which is kohya's SD1.5 convention; kohya's SDXL
    LoRAs use the original Stability ("sgm") names, which `loraforge.lora.format.lora_targets` (via
    `kohya_unet_names`) writes for SDXL.

    Args:
        prefix: `lora_unet`, `lora_te` (SD1.5 text encoder), `lora_te1` or `lora_te2` (SDXL).
        module: dotted module name, e.g. `down_blocks.1.attentions.0.proj_in`.

    Example:
        `kohya_name("lora_unet", "mid_block.attentions.0.proj_in")` →
        `lora_unet_mid_block_attentions_0_proj_in`
    """
    if prefix not in KOHYA_PREFIXES:
        raise ValueError(f"`prefix` must be one of {', '.join(KOHYA_PREFIXES)}, got {prefix!r}")
    if not module or module.endswith(".weight"):
        raise ValueError(f"`module` must be a module name without `.weight`, got {module!r}")
    if prefix != "lora_unet" and module.startswith("encoder."):
        module = "text_model." + module  # transformers ≥ 5's flattened CLIPTextModel
    return f"{prefix}_{module.replace('.', '_')}"


def kohya_names(prefix: Prefix, modules: Iterable[str]) -> dict[str, str]:
    """Map module names to their kohya names (see `kohya_name`); fails if two names collide.

    Args:
        prefix: `lora_unet`, `lora_te`, `lora_te1` or `lora_te2`.
        modules: dotted module names, e.g. from `unet_targets` or `text_encoder_targets`.
    """
    targets = {module: kohya_name(prefix, module) for module in modules}
    if len(set(targets.values())) != len(targets):
        raise ValueError(f"`modules` give colliding kohya names under prefix {prefix!r}")
    return targets
