"""Base models: resolve `model.base` to a local diffusers folder, hash its components, load them.

`model.base` is one of
- `builtin:tiny-sdxl` / `builtin:tiny-sd15`: built in code (`loraforge.models.tiny`) and written once
  to `<state_dir>/models/builtin-<name>-v<N>/` (`loraforge.models.hub`);
- a local diffusers folder (has `model_index.json`), absolute or relative to the project root;
- a single-file SD1.5/SDXL checkpoint (`.safetensors`), converted once (`loraforge.models.single_file`);
- a Hugging Face id (`owner/name`): only the files training needs are downloaded, once, into the
  usual Hugging Face cache (`loraforge.models.hub`).

Weights load from safetensors. Pickle weights (`.bin`, `.ckpt`, `.pt`, `.pth`) can run code when
unpickled, so a component that has only those is refused unless `model.allow_pickle: true`, and
then diffusers/transformers load it with `torch.load(weights_only=True)`.

The identity of a model in every cache key is the hash of its files (`component_hash`), never
its name; a per-file hash cache keyed on (path, size, mtime) makes that cheap after the first time
(`loraforge.models.weights`).

torch, diffusers and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from loraforge.models.hub import BUILTIN_PREFIX, model_folder
from loraforge.errors import InputError
from loraforge.models.hf_quiet import quiet_hf_loading
from loraforge.models.single_file import single_file_folder
from loraforge.models.vae_override import vae_folder
from loraforge.models.weights import config_files, files_hash, folder_weights

if TYPE_CHECKING:
    import torch
    from transformers import CLIPTokenizer

    from loraforge.pipeline.params import ModelParams

Arch = Literal["sd15", "sdxl"]


@dataclass(frozen=True)
class ModelInfo:
    """A resolved base model.

    Attributes:
        path: the local diffusers folder (model_index.json plus one sub-folder per component).
        arch: `sd15` (SD1.x/2.x layout: one text encoder) or `sdxl` (two text encoders).
        native_resolution: the side the UNet was built for, in pixels: `unet.sample_size ×
            vae_scale_factor` (128 tiny, 512 SD1.5, 1024 SDXL).
        vae_scale_factor: pixels per latent cell (8 for every SD VAE).
        source: what the user wrote in `model.base`.
        scaling_factor: the VAE's latent scale (0.18215 SD1.5, 0.13025 SDXL): latents are
            `vae.encode(x).latent_dist.sample() * scaling_factor`.
        allow_pickle: whether pickle weights may be loaded (`model.allow_pickle`).
        vae_path: the AutoencoderKL folder `model.vae` names, replacing `path / "vae"`; None = the base's.
    """

    path: Path
    arch: Arch
    native_resolution: int
    vae_scale_factor: int
    source: str
    scaling_factor: float = 0.18215
    allow_pickle: bool = False
    vae_path: Path | None = None


# ---------------------------------------------------------------------------------------------
# Resolving model.base


def resolve_model(params: ModelParams, state_dir: Path, root: Path | None = None) -> ModelInfo:
    """Turn `model.base` into a local diffusers folder and describe it; fails before any work.

    Args:
        params: the `model` section (base, revision, allow_pickle, device).
        state_dir: loraforge's private folder; builtins are written under `state_dir/models/`.
        root: folder that relative local paths are taken from; defaults to `state_dir`'s parent
            (the project root, since the runner uses `<root>/.loraforge`).
    """
    state_dir = Path(state_dir)
    root = Path(root) if root is not None else state_dir.parent
    path = single_file_folder(params, state_dir, root) or model_folder(
        params.base, params.revision, params.allow_pickle, state_dir, root
    )
    info = inspect_model(path, source=params.base, allow_pickle=params.allow_pickle)
    if params.vae is None:
        return info
    vae = vae_folder(params.vae, path / "vae", params.allow_pickle, state_dir, root)
    scaling = json.loads((vae / "config.json").read_text(encoding="utf-8")).get("scaling_factor", info.scaling_factor)
    return replace(info, vae_path=vae, scaling_factor=float(scaling))


def read_model_index(path: Path) -> dict[str, Any]:
    """The folder's model_index.json.

    Args:
        path: a diffusers folder.
    """
    index_file = Path(path) / "model_index.json"
    try:
        return json.loads(index_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} is not a diffusers folder (no model_index.json)") from None


def detect_arch(index: dict[str, Any], path: Path) -> Arch:
    """`sdxl` or `sd15` from model_index.json: the pipeline class, else the components present.

    Args:
        index: the parsed model_index.json.
        path: the folder (for the error message).
    """
    cls = str(index.get("_class_name", ""))
    if cls.startswith("StableDiffusionXL") or (index.get("text_encoder_2") or [None])[0]:
        return "sdxl"
    if cls.startswith("StableDiffusion") or {"unet", "text_encoder", "vae"} <= index.keys():
        return "sd15"
    raise ValueError(f"{path}: `{cls}` is not a Stable Diffusion 1.x/2.x or SDXL pipeline (model_index.json)")


def _read_config(path: Path, component: str) -> dict[str, Any]:
    """A component's config.json."""
    file = path / component / "config.json"
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: component `{component}` has no config.json") from None


def inspect_model(path: Path, source: str, allow_pickle: bool = False) -> ModelInfo:
    """Describe a local diffusers folder; checks every weighted component's files up front.

    Args:
        path: the folder.
        source: what the user wrote in `model.base` (kept for reports and LoRA metadata).
        allow_pickle: whether pickle-only components are acceptable.
    """
    path = Path(path)
    arch = detect_arch(read_model_index(path), path)
    info = ModelInfo(
        path=path, arch=arch, native_resolution=0, vae_scale_factor=0, source=source, allow_pickle=allow_pickle
    )
    for component in arch_components(arch):
        if not weight_files(info, component):
            raise ValueError(f"{path / component}: no weight files (`model.base` = {source!r})")
    vae = _read_config(path, "vae")
    factor = 2 ** (len(vae["block_out_channels"]) - 1)  # one 2× downsampling between blocks
    return ModelInfo(
        path=path,
        arch=arch,
        native_resolution=int(_read_config(path, "unet")["sample_size"]) * factor,
        vae_scale_factor=factor,
        source=source,
        scaling_factor=float(vae.get("scaling_factor", 0.18215)),
        allow_pickle=allow_pickle,
    )


def arch_components(arch: Arch) -> tuple[str, ...]:
    """The weighted components of an architecture (what a LoRA or a cache key can depend on).

    Args:
        arch: `sd15` or `sdxl`.
    """
    return ("unet", "vae", "text_encoder", "text_encoder_2") if arch == "sdxl" else ("unet", "vae", "text_encoder")


# ---------------------------------------------------------------------------------------------
# Weight files and hashes


def component_folder(info: ModelInfo, component: str) -> Path:
    """Where a component's files are: `model.vae`'s folder for the VAE when set, else `path / component`."""
    return info.vae_path if component == "vae" and info.vae_path is not None else info.path / component


def weight_files(info: ModelInfo, component: str) -> list[Path]:
    """The weight files `component` loads from: safetensors (sharded or not), else pickle files
    when `info.allow_pickle`; [] for components without weights (tokenizer, scheduler).

    Args:
        info: the resolved model.
        component: a sub-folder (`unet`, `vae`, `text_encoder`, `text_encoder_2`...).

    Raises:
        ValueError: the component has only pickle weights and `model.allow_pickle` is off.
    """
    folder = component_folder(info, component)
    if not folder.is_dir():
        raise InputError(f"{info.path}: no component `{component}` (`model.base` = {info.source!r})")
    return folder_weights(folder, info.allow_pickle)


def component_hash(info: ModelInfo, component: str, state_dir: Path) -> str:
    """xxh3-128 of a component's config and weight files (names relative to its folder).

    Each file's hash is cached in `state_dir/hashcache.json` by (path, size, mtime), so a 7 GB
    UNet is read once, not on every run.

    Args:
        info: the resolved model.
        component: a sub-folder (`unet`, `vae`, `text_encoder`, `tokenizer`...).
        state_dir: loraforge's private folder (holds the hash cache).
    """
    folder = component_folder(info, component)
    files = sorted(set(config_files(folder)) | set(weight_files(info, component)))
    return files_hash(files, folder, state_dir)


# ---------------------------------------------------------------------------------------------
# Loading


def native_resolution(model: Any, state_dir: Path) -> int:
    """The model's native side in pixels, without building a builtin model to read it off.

    Args:
        model: the `model` section.
        state_dir: loraforge's private folder.
    """
    from loraforge.models.tiny import BUILTINS, NATIVE_RESOLUTION

    if model.base.removeprefix(BUILTIN_PREFIX) in BUILTINS and model.base.startswith(BUILTIN_PREFIX):
        return NATIVE_RESOLUTION
    return resolve_model(model, state_dir).native_resolution


def resolve_device(setting: str) -> torch.device:
    """The torch device for `model.device`.

    Args:
        setting: `auto` (CUDA when available, else CPU), `cpu` or `cuda`.
    """
    import torch

    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cpu":
        return torch.device("cpu")
    if setting == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(
                f"`model.device` is `cuda` but no CUDA GPU is available (torch {torch.__version__}, {build}); "
                "use `cpu` or `auto`"
            )
        return torch.device("cuda")
    raise ValueError(f"`model.device` must be one of auto, cpu, cuda; got {setting!r}")


def _load_kwargs(info: ModelInfo, component: str, dtype: torch.dtype | None) -> dict[str, Any]:
    """from_pretrained arguments: local files only, safetensors unless pickle is what there is."""
    import torch

    quiet_hf_loading()

    files = weight_files(info, component)  # refuses pickle-only components without allow_pickle
    if not files:
        raise ValueError(f"{info.path / component}: no weight files (`model.base` = {info.source!r})")
    return {
        "local_files_only": True,
        "use_safetensors": files[0].name.endswith(".safetensors"),
        "dtype": dtype or torch.float32,
    }


def load_vae(info: ModelInfo, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """The AutoencoderKL, in eval mode on `device`.

    Args:
        info: the resolved model.
        device: where to put it.
        dtype: weight dtype; None means float32.
    """
    from diffusers import AutoencoderKL

    return (
        AutoencoderKL.from_pretrained(component_folder(info, "vae"), **_load_kwargs(info, "vae", dtype))
        .to(device)
        .eval()
    )


def load_unet(info: ModelInfo, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """The UNet2DConditionModel, in eval mode on `device`.

    Args:
        info: the resolved model.
        device: where to put it.
        dtype: weight dtype; None means float32.
    """
    from diffusers import UNet2DConditionModel

    return (
        UNet2DConditionModel.from_pretrained(info.path / "unet", **_load_kwargs(info, "unet", dtype)).to(device).eval()
    )


def load_tokenizers(info: ModelInfo) -> list[CLIPTokenizer]:
    """The CLIP tokenizers: [tokenizer] for sd15, [tokenizer, tokenizer_2] for sdxl.

    Args:
        info: the resolved model.
    """
    from transformers import CLIPTokenizer

    names = ["tokenizer", "tokenizer_2"] if info.arch == "sdxl" else ["tokenizer"]
    return [CLIPTokenizer.from_pretrained(info.path / name, local_files_only=True) for name in names]


def load_text_encoders(
    info: ModelInfo, device: torch.device, dtype: torch.dtype | None = None
) -> list[tuple[Any, Any]]:
    """(tokenizer, text encoder) pairs in eval mode: one for sd15 (CLIPTextModel), two for sdxl
    (CLIPTextModel, then CLIPTextModelWithProjection, whose pooled output SDXL also uses).

    Args:
        info: the resolved model.
        device: where to put the encoders.
        dtype: weight dtype; None means float32.
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    classes = [("text_encoder", CLIPTextModel)]
    if info.arch == "sdxl":
        classes.append(("text_encoder_2", CLIPTextModelWithProjection))
    encoders = [
        cls.from_pretrained(info.path / name, **_load_kwargs(info, name, dtype)).to(device).eval()
        for name, cls in classes
    ]
    return list(zip(load_tokenizers(info), encoders))


def load_noise_scheduler(info: ModelInfo) -> Any:
    """A DDPMScheduler on the model's training noise schedule (betas, steps, prediction type).

    Args:
        info: the resolved model.
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(info.path / "scheduler", local_files_only=True)


def _load_sampler(info: ModelInfo) -> Any:
    """The scheduler class model_index.json names (the model's default sampler), from its config."""
    import diffusers

    _, cls_name = read_model_index(info.path)["scheduler"]
    return getattr(diffusers, cls_name).from_pretrained(info.path / "scheduler", local_files_only=True)


def load_pipeline(info: ModelInfo, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """A StableDiffusionPipeline (sd15) or StableDiffusionXLPipeline (sdxl) on `device`, built
    from the components above (same safetensors policy), without safety checker or watermark,
    progress bar off.

    Args:
        info: the resolved model.
        device: where to put it.
        dtype: weight dtype; None means float32.
    """
    quiet_hf_loading()  # before the pipeline import, which triggers the torchvision notice
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pairs = load_text_encoders(info, device, dtype)
    common = {
        "vae": load_vae(info, device, dtype),
        "unet": load_unet(info, device, dtype),
        "tokenizer": pairs[0][0],
        "text_encoder": pairs[0][1],
        "scheduler": _load_sampler(info),
    }
    if info.arch == "sdxl":
        force_zeros = read_model_index(info.path).get("force_zeros_for_empty_prompt", True)
        pipe = StableDiffusionXLPipeline(
            **common,
            tokenizer_2=pairs[1][0],
            text_encoder_2=pairs[1][1],
            force_zeros_for_empty_prompt=force_zeros,
            add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            **common, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe
