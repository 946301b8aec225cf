"""The embedded models: seeded random SD1.5- and SDXL-shaped diffusers components, built in code.

`builtin:tiny-sdxl` and `builtin:tiny-sd15` let the whole pipeline run anywhere in minutes with no
download. They are real diffusers/transformers classes with the real architectures' layout (same
block types, module names, attention projections, VAE downsampling factor of 8, CLIP tokenizer
with 77 positions), only narrow: under a million weights (~4 MB), native resolution 128 px.
What they generate is noise; what matters is that every stage exercises the exact code paths a
real SD1.5 or SDXL checkpoint would (LoRA target names, kohya key names, latent shapes).

The tokenizer is shipped in `loraforge/assets/tiny-clip-tokenizer/` (made by
`scripts/make_tiny_tokenizer.py`). Building is deterministic: the same seed gives the same
weights, and `save_builtin` writes byte-identical safetensors.

torch, diffusers and transformers are imported inside the functions, so importing this module
is cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny-clip-tokenizer"
NATIVE_RESOLUTION = 128  # unet sample_size 16 × VAE factor 8
BUILTIN_SEED = 0  # the seed `save_builtin` uses: every checkout builds the same builtin weights

# SD's noise schedule (both SD1.5 and SDXL train with it): 1000 steps, betas 0.00085 → 0.012 on a
# sqrt ("scaled_linear") ramp, the UNet predicting the noise ("epsilon").
SD_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def load_tiny_tokenizer() -> CLIPTokenizer:
    """The shipped tiny CLIP tokenizer (~1,300 tokens, 77 positions), loaded offline."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR)


def _text_config(tokenizer: CLIPTokenizer, hidden_act: str, projection_dim: int | None = None) -> Any:
    """A 2-layer, 32-wide CLIP text config whose vocabulary and special ids match `tokenizer`.

    Args:
        tokenizer: the tokenizer the encoder will read; sets vocab size and BOS/EOS/pad ids (the
            pooled output is taken at the first EOS, so the ids must agree).
        hidden_act: `quick_gelu` (OpenAI CLIP: SD1.5, SDXL's first encoder) or `gelu` (OpenCLIP
            bigG: SDXL's second encoder).
        projection_dim: width of the pooled projection (CLIPTextModelWithProjection only).
    """
    from transformers import CLIPTextConfig

    extra = {} if projection_dim is None else {"projection_dim": projection_dim}
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,  # 77
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _vae(scaling_factor: float, force_upcast: bool) -> Any:
    """A 4-block AutoencoderKL: 3 downsamplings, so 128 px ↔ 16×16×4 latents like the real 8× VAE.

    Args:
        scaling_factor: latent scale the trainer multiplies by (0.18215 SD1.5, 0.13025 SDXL).
        force_upcast: whether pipelines run the VAE in float32 under fp16 (True for SDXL's VAE).
    """
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),  # real: (128, 256, 512, 512)
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=NATIVE_RESOLUTION,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )


def _scheduler() -> Any:
    """Euler (the SDXL default sampler) on SD's training schedule."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**SD_SCHEDULE)


def build_tiny_sdxl(seed: int = 0) -> dict[str, Any]:
    """Components for `StableDiffusionXLPipeline(**components)`, with seeded random weights.

    Layout follows diffusers' own SDXL tests: a 2-level UNet (plain down block, then a
    cross-attention block with 2 transformer layers), micro-conditioning on size/crop ("text_time"),
    two CLIP text encoders whose penultimate hidden states are concatenated for cross-attention.

    Args:
        seed: seeds torch's generator while the weights are drawn; the global RNG is left as it was.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = load_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(_text_config(tokenizer, "quick_gelu"))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer, "gelu", projection_dim=32))
        te_dims = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size  # 32 + 32
        unet = UNet2DConditionModel(
            sample_size=NATIVE_RESOLUTION // 8,  # latents are 16×16
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32),  # real: (320, 640, 1280)
            layers_per_block=2,
            attention_head_dim=(2, 4),  # diffusers' legacy name: heads per block (head width 8)
            use_linear_projection=True,  # SDXL's proj_in/proj_out are Linear
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=te_dims,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            # 6 size/crop numbers × 8-wide Fourier embedding + the pooled text embedding (32)
            projection_class_embeddings_input_dim=6 * 8 + text_encoder_2.config.projection_dim,
            norm_num_groups=8,
        )
        vae = _vae(scaling_factor=0.13025, force_upcast=True)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": load_tiny_tokenizer(),
        "scheduler": _scheduler(),
    }


def build_tiny_sd15(seed: int = 0) -> dict[str, Any]:
    """Components for `StableDiffusionPipeline(**components)`, with seeded random weights.

    SD1.5's layout in miniature: cross-attention in the first (high-resolution) level, 1×1 Conv2d
    proj_in/proj_out (`use_linear_projection=False`), one CLIP text encoder, no safety checker.

    Args:
        seed: seeds torch's generator while the weights are drawn; the global RNG is left as it was.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = load_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(_text_config(tokenizer, "quick_gelu"))
        unet = UNet2DConditionModel(
            sample_size=NATIVE_RESOLUTION // 8,  # latents are 16×16
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(16, 32),  # real: (320, 640, 1280, 1280)
            layers_per_block=2,
            attention_head_dim=4,  # diffusers' legacy name: heads per block (real SD1.5: 8)
            use_linear_projection=False,  # SD1.5's proj_in/proj_out are 1×1 Conv2d
            cross_attention_dim=text_encoder.config.hidden_size,  # 32
            norm_num_groups=8,
        )
        vae = _vae(scaling_factor=0.18215, force_upcast=False)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": _scheduler(),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


BUILTINS: dict[str, Callable[[int], dict[str, Any]]] = {
    "tiny-sdxl": build_tiny_sdxl,
    "tiny-sd15": build_tiny_sd15,
}
BUILTIN_ARCH: dict[str, str] = {"tiny-sdxl": "sdxl", "tiny-sd15": "sd15"}


def build_pipeline(name: str, seed: int = BUILTIN_SEED) -> Any:
    """The builtin `name` as a diffusers pipeline (on CPU, float32).

    Args:
        name: a key of `BUILTINS` (`tiny-sdxl` or `tiny-sd15`).
        seed: weight seed.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if name not in BUILTINS:
        raise ValueError(f"unknown builtin model `{name}` (known: {', '.join(sorted(BUILTINS))})")
    components = BUILTINS[name](seed)
    if BUILTIN_ARCH[name] == "sdxl":
        return StableDiffusionXLPipeline(**components, add_watermarker=False)
    return StableDiffusionPipeline(**components)


def save_builtin(name: str, folder: Path) -> None:
    """Write the builtin `name` (seed `BUILTIN_SEED`) as a diffusers pipeline folder.

    The folder gets model_index.json and one sub-folder per component, weights as safetensors,
    exactly like a model downloaded from the hub; the same name always gives byte-identical
    weight files.

    Args:
        name: a key of `BUILTINS` (`tiny-sdxl` or `tiny-sd15`).
        folder: destination (created; existing files are overwritten).
    """
    pipe = build_pipeline(name, BUILTIN_SEED)
    pipe.save_pretrained(Path(folder), safe_serialization=True)
