"""Single-file checkpoints: the shipped CLIP tokenizer, architecture detection, conversion to a
diffusers folder (weights equal both ways) and the refusals that name the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loraforge.errors import InputError
from loraforge.models.loading import component_hash, load_text_encoders, load_unet, load_vae, resolve_model
from loraforge.models.original_layout import pipeline_to_original
from loraforge.pipeline.params import ModelParams
from loraforge.models.safetensors_io import save_tensors
from loraforge.models.single_file import ASSETS, detect_checkpoint_arch, shipped_config
from loraforge.models.tiny import build_pipeline

BUILTIN = {"sd15": "tiny-sd15", "sdxl": "tiny-sdxl"}
ENCODERS = {"sd15": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"]}


def write_single_file(arch: str, folder: Path, dtype: torch.dtype = torch.float32) -> tuple[Path, Path, object]:
    """The tiny builtin `arch` as (original-layout file, its diffusers config folder, the pipeline)."""
    pipe = build_pipeline(BUILTIN[arch])
    config = folder / f"config-{arch}"
    pipe.save_pretrained(config, safe_serialization=True)
    file = folder / f"tiny-{arch}.safetensors"
    save_tensors({k: v.to(dtype) for k, v in pipeline_to_original(pipe, arch).items()}, file)
    return file, config, pipe


def test_shipped_clip_tokenizer_matches_openai_ids(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(shipped_config("sdxl", tmp_path) / "tokenizer")
    assert len(tok) == 49408
    # openai/clip-vit-large-patch14 ids (49406 = <|startoftext|>, 49407 = <|endoftext|>)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("sks dog").input_ids == [49406, 48136, 1929, 49407]
    assert CLIPTokenizer.from_pretrained(tmp_path / "tokenizer_2").pad_token == "!"  # SDXL's second pads with id 0


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_single_file_converts_with_equal_weights(arch: str, tmp_path: Path) -> None:
    file, config, pipe = write_single_file(arch, tmp_path)
    state = tmp_path / "state"
    info = resolve_model(ModelParams(base=str(file), config=str(config)), state)
    assert info.arch == arch and info.path.parent == state / "models" and info.path.name.startswith(f"single-{arch}-")
    loaded = {"unet": load_unet(info, torch.device("cpu")), "vae": load_vae(info, torch.device("cpu"))}
    loaded |= dict(zip(ENCODERS[arch], (enc for _, enc in load_text_encoders(info, torch.device("cpu")))))
    for name, model in loaded.items():
        want, got = getattr(pipe, name).state_dict(), model.state_dict()
        assert set(want) == set(got), name
        assert all(torch.equal(want[k], got[k]) for k in want), name
    other = tmp_path / f"config-{'sdxl' if arch == 'sd15' else 'sd15'}"
    build_pipeline(BUILTIN["sdxl" if arch == "sd15" else "sd15"]).save_pretrained(other)
    with pytest.raises(InputError, match="model.config"):
        resolve_model(ModelParams(base=str(file), config=str(other)), tmp_path / "other-state")
    # a relative path names the same file; a second resolve reuses the converted folder
    again = resolve_model(ModelParams(base=file.name, config=str(config)), state, root=tmp_path)
    assert again.path == info.path


def test_identity_is_the_file_content(tmp_path: Path) -> None:
    file, config, pipe = write_single_file("sd15", tmp_path)
    state = tmp_path / "state"
    params = ModelParams(base=str(file), config=str(config))
    first = resolve_model(params, state)
    unet_hash = component_hash(first, "unet", state)
    tensors = pipeline_to_original(pipe, "sd15")
    key = "model.diffusion_model.out.2.weight"
    tensors[key] = tensors[key] + 1.0
    save_tensors(tensors, file)  # same path, new content
    second = resolve_model(params, state)
    assert second.path != first.path
    assert component_hash(second, "unet", state) != unet_hash


def test_fp16_checkpoint_keeps_its_dtype(tmp_path: Path) -> None:
    file, config, pipe = write_single_file("sdxl", tmp_path, torch.float16)
    info = resolve_model(ModelParams(base=str(file), config=str(config)), tmp_path / "state")
    stored = json.loads((info.path / "unet" / "config.json").read_text())
    assert stored["block_out_channels"] == list(pipe.unet.config.block_out_channels)
    unet = load_unet(info, torch.device("cpu"))  # training loads float32 from the fp16 weights
    want = pipe.unet.state_dict()["conv_in.weight"].half().float()
    assert torch.equal(unet.state_dict()["conv_in.weight"], want)


def _keys(*names: str) -> set[str]:
    return {"model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight", *names}


def test_arch_from_keys_and_refusals_name_the_file(tmp_path: Path) -> None:
    f = tmp_path / "m.safetensors"
    assert detect_checkpoint_arch(_keys("cond_stage_model.transformer.text_model.x"), f) == "sd15"
    assert detect_checkpoint_arch(_keys("conditioner.embedders.1.model.ln_final.weight"), f) == "sdxl"
    assert detect_checkpoint_arch(_keys("model.diffusion_model.label_emb.0.0.weight"), f) == "sdxl"
    cases = {
        "SD2": _keys("cond_stage_model.model.token_embedding.weight"),
        "Flux": {"double_blocks.0.img_attn.qkv.weight"},
        "SD3": {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"},
        "not an original-layout": {"lora_unet_down_blocks_0.alpha"},
        "without a VAE": {"model.diffusion_model.input_blocks.0.0.weight"},
    }
    for what, keys in cases.items():
        with pytest.raises(InputError, match=what) as err:
            detect_checkpoint_arch(keys, f)
        assert str(f) in str(err.value)
    with pytest.raises(InputError, match="SD2"):  # SD2's 1024-wide cross-attention
        detect_checkpoint_arch(_keys("cond_stage_model.transformer.text_model.x"), f, context_dim=1024)


def test_pickle_and_garbage_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}}, ckpt)
    with pytest.raises(InputError, match="model.allow_pickle"):
        resolve_model(ModelParams(base=str(ckpt)), tmp_path / "state")
    with pytest.raises(InputError, match="not an original-layout"):
        resolve_model(ModelParams(base=str(ckpt), allow_pickle=True), tmp_path / "state")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="junk.safetensors"):
        resolve_model(ModelParams(base=str(junk)), tmp_path / "state")


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_shipped_configs_are_the_real_sizes(arch: str, tmp_path: Path) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = shipped_config(arch, tmp_path)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    millions = lambda m: round(sum(p.numel() for p in m.parameters()) / 1e6)  # noqa: E731
    assert millions(unet) == {"sd15": 860, "sdxl": 2567}[arch]
    assert millions(vae) == 84 and millions(te) == 123
    assert (ASSETS / "clip-tokenizer" / "vocab.json").stat().st_size > 900_000


def test_full_checkpoint_with_ema_keys_as_a_pickle_loads_the_live_weights(tmp_path: Path) -> None:
    _, config, pipe = write_single_file("sd15", tmp_path)
    tensors = pipeline_to_original(pipe, "sd15")
    # A1111/kohya "full" files also hold the EMA (`model_ema.` + the UNet key without dots) and counters
    ema = {
        "model_ema." + k[len("model.") :].replace(".", ""): v + 1 for k, v in tensors.items() if k.startswith("model.")
    }
    ckpt = tmp_path / "full.ckpt"
    torch.save({"state_dict": {**tensors, **ema, "model_ema.decay": torch.tensor(0.9999)}, "global_step": 10}, ckpt)
    info = resolve_model(ModelParams(base=str(ckpt), config=str(config), allow_pickle=True), tmp_path / "state")
    want, got = pipe.unet.state_dict(), load_unet(info, torch.device("cpu")).state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
