"""kohya module names: sgm numbering derived from the UNet config, checked on the real SD1.5 and
SDXL UNet configs (built on the meta device: no weights) and against diffusers' own converters."""

from __future__ import annotations

import re

import pytest
import torch

from loraforge.lora import format as L
from loraforge.models import tiny
from loraforge.models.kohya_names import (
    UnetLayout,
    kohya_unet_name,
    kohya_unet_names,
    layout_from_config,
    layout_from_keys,
    load_real_config,
    real_unet_keys,
    sgm_module_name,
    unet_targets,
)

SDXL = UnetLayout(2, (False, True, True), (True, True, False))


@pytest.fixture(scope="module")
def real_keys() -> dict[str, list[str]]:
    return {arch: real_unet_keys(arch) for arch in ("sd15", "sdxl")}  # type: ignore[misc]


def test_real_configs_build_the_real_sized_unets(real_keys: dict[str, list[str]]) -> None:
    from diffusers import UNet2DConditionModel

    for arch, params in (("sd15", 859_520_964), ("sdxl", 2_567_463_684)):
        config = {k: v for k, v in load_real_config(arch).items() if not k.startswith("_")}  # type: ignore[arg-type]
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)
        assert sum(p.numel() for p in unet.parameters()) == params, arch
    assert layout_from_config(load_real_config("sdxl")) == SDXL
    assert layout_from_keys(real_keys["sdxl"]) == SDXL


@pytest.mark.parametrize(
    ("module", "sgm"),
    [  # the real SDXL UNet, as kohya's sdxl_original_unet names it
        ("down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2"),
        ("down_blocks.0.resnets.1.time_emb_proj", "input_blocks.2.0.emb_layers.1"),
        ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
        ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
        (
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        ),
        ("down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2", "input_blocks.8.1.transformer_blocks.9.ff.net.2"),
        ("mid_block.resnets.0.conv2", "middle_block.0.out_layers.3"),
        ("mid_block.attentions.0.proj_in", "middle_block.1.proj_in"),
        ("mid_block.resnets.1.conv1", "middle_block.2.in_layers.2"),
        ("up_blocks.0.resnets.2.conv1", "output_blocks.2.0.in_layers.2"),
        ("up_blocks.0.attentions.2.proj_out", "output_blocks.2.1.proj_out"),
        ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
        (
            "up_blocks.1.attentions.0.transformer_blocks.1.attn2.to_out.0",
            "output_blocks.3.1.transformer_blocks.1.attn2.to_out.0",
        ),
        ("up_blocks.2.resnets.2.conv2", "output_blocks.8.0.out_layers.3"),
        ("conv_in", "input_blocks.0.0"),
    ],
)
def test_sgm_names_of_real_sdxl(module: str, sgm: str) -> None:
    assert sgm_module_name(module, SDXL) == sgm


def test_upsampler_of_a_block_without_attention_sits_at_index_1() -> None:
    sd15 = layout_from_config(load_real_config("sd15"))  # up_blocks.0 is an UpBlock2D with an upsampler
    assert sgm_module_name("up_blocks.0.upsamplers.0.conv", sd15) == "output_blocks.2.1.conv"


def _ldm_to_diffusers(arch: str, sgm_modules: list[str]) -> dict[str, str]:
    """diffusers' single-file converter applied to ldm keys: sgm module → diffusers module."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = {k: v for k, v in load_real_config(arch).items() if not k.startswith("_")}  # type: ignore[arg-type]
    checkpoint = {}
    for i, m in enumerate(sgm_modules):  # weight i marks module i; biases are -1
        checkpoint |= {
            f"model.diffusion_model.{m}.weight": torch.tensor([float(i)]),
            f"model.diffusion_model.{m}.bias": torch.tensor([-1.0]),
        }
    # the top-level layers the converter copies unconditionally (not LoRA targets)
    for top in ("time_embed.0", "time_embed.2", "label_emb.0.0", "label_emb.0.2", "input_blocks.0.0", "out.0", "out.2"):
        checkpoint |= {f"model.diffusion_model.{top}.{p}": torch.tensor([-1.0]) for p in ("weight", "bias")}
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    by_index = {
        int(v.item()): k for k, v in converted.items() if k.endswith(".weight") and v.numel() == 1 and v.item() >= 0
    }
    return {m: by_index[i][: -len(".weight")] for i, m in enumerate(sgm_modules) if i in by_index}


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_every_real_unet_module_gets_a_unique_kohya_name(arch: str, real_keys: dict[str, list[str]]) -> None:
    keys = real_keys[arch]
    modules = unet_targets(keys, conv=True)
    names = L.lora_targets(arch, "unet", keys, conv=True, unet_config=load_real_config(arch))  # type: ignore[arg-type]
    assert set(names) == set(modules) and len(set(names.values())) == len(modules)
    # SDXL: 70 transformer blocks × 10 + 11 transformers × proj_in/out; SD1.5: 16 × 10 + 16 × 2
    attention = [m for m in modules if ".attentions." in m]
    assert len(attention) == {"sdxl": 70 * 10 + 11 * 2, "sd15": 16 * 12}[arch]
    for module, name in names.items():
        assert re.fullmatch(r"lora_unet_[a-z0-9_]+", name), name
        if arch == "sd15":
            assert name == "lora_unet_" + module.replace(".", "_")
        else:
            assert re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_\d+_", name), name


@pytest.mark.parametrize("arch", ["sdxl"])
def test_sgm_names_invert_with_diffusers_single_file_converter(arch: str, real_keys: dict[str, list[str]]) -> None:
    # An independent reference: diffusers' ldm → diffusers checkpoint converter must turn every
    # sgm name back into the diffusers module it came from.
    layout = layout_from_config(load_real_config(arch))  # type: ignore[arg-type]
    modules = unet_targets(real_keys[arch], conv=True)
    sgm = [sgm_module_name(m, layout) for m in modules]
    back = _ldm_to_diffusers(arch, sgm)
    assert len(back) == len(sgm)
    assert [back[s] for s in sgm] == modules


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_diffusers_lora_key_converter_maps_every_real_name_back(arch: str, real_keys: dict[str, list[str]]) -> None:
    # What load_lora_weights runs on a kohya file: sgm block remap (SDXL), then key conversion.
    from types import SimpleNamespace

    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    config = load_real_config(arch)  # type: ignore[arg-type]
    names = L.lora_targets(arch, "unet", real_keys[arch], conv=True, unet_config=config)  # type: ignore[arg-type]
    state = {}
    for name in names.values():
        state |= {name + L.DOWN: torch.zeros(1), name + L.UP: torch.zeros(1), name + L.ALPHA: torch.tensor(1.0)}
    state = _maybe_map_sgm_blocks_to_diffusers(state, SimpleNamespace(**config))
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(state)
    got = set()
    for key in converted:
        module = key[len("unet.") :].split(".lora")[0].split("_lora")[0]
        got.add(module.replace(".processor", "").replace("to_out", "to_out.0") if "processor" in module else module)
    assert len(alphas) == len(names)
    # diffusers' legacy attention spelling (`attn1.processor.to_q_lora`) aside, every module comes back
    normalised = {m.replace("to_out.0.0", "to_out.0") for m in got}
    assert normalised == set(names), sorted(normalised ^ set(names))[:10]


def test_tiny_sdxl_layout_matches_its_config_and_keys() -> None:
    unet = tiny.build_tiny_sdxl(0)["unet"]
    keys = list(unet.state_dict())
    assert layout_from_config(unet.config) == layout_from_keys(keys) == UnetLayout(2, (False, True), (True, False))
    assert kohya_unet_name(
        "down_blocks.1.attentions.1.transformer_blocks.1.attn1.to_k", "sgm", layout_from_keys(keys)
    ) == ("lora_unet_input_blocks_5_1_transformer_blocks_1_attn1_to_k")


def test_bad_inputs_name_the_argument() -> None:
    with pytest.raises(ValueError, match="`layers_per_block`"):
        layout_from_config(
            {"layers_per_block": [2, 2], "down_block_types": ["DownBlock2D"], "up_block_types": ["UpBlock2D"]}
        )
    with pytest.raises(ValueError, match="`module`"):
        sgm_module_name("time_proj.weight", SDXL)
    with pytest.raises(ValueError, match="`module`.*layout"):
        sgm_module_name("mid_block.resnets.5.conv1", SDXL)
    with pytest.raises(ValueError, match="`layout`"):
        kohya_unet_name("down_blocks.0.resnets.0.conv1", "sgm")
    with pytest.raises(ValueError, match="`naming`"):
        kohya_unet_names(["conv_in"], "ldm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`keys`"):
        layout_from_keys(["text_model.encoder.layers.0.mlp.fc1.weight"])
