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

CONFIG_DIR = Path(__file__).resolve().parent / "assets" / "configs"
# Shipped copies of the real models' unet/config.json (no weights).
REAL_UNET_CONFIGS = {"sd15": CONFIG_DIR / "sd15-unet.json", "sdxl": CONFIG_DIR / "sdxl-unet.json"}

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
        modules: dotted diffusers module names (e.g. from `loraforge.lora.unet_targets`).
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
