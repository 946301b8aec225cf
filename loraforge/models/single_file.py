"""`model.base` as one original-layout checkpoint (Civitai / A1111 `.safetensors`), fully offline.

The file is converted once into a diffusers folder under `<state_dir>/models/single-<arch>-<hash>/`,
named by the file's content hash and its configs' (shipped or `model.config`), so every stage
then loads, hashes and caches it like any other diffusers folder, and a replaced file at the
same path is a different model.
The conversion reads every tensor through diffusers' own single-file converters (UNet, VAE) and
transformers' CLIP classes (text encoders: diffusers' pipeline loader tells SDXL's CLIP-L from its
OpenCLIP bigG by their widths, which fails for models whose encoders are as wide, so the keys'
prefixes decide here), from a local config folder:

- by default the SD1.5 / SDXL configs shipped in `loraforge/assets/pipelines/` (the published
  diffusers configs, plus CLIP's real BPE tokenizer from `assets/clip-tokenizer/`), chosen by the
  architecture read off the keys;
- or `model.config`: any diffusers folder (configs only suffice) for checkpoints of another shape
  (a v-prediction fine-tune's scheduler, a custom-sized model such as the builtin tiny ones).

Cost: the folder is as big as the checkpoint's weights (kept in the file's own dtype); delete
`.loraforge/models/single-*` to reclaim it, it is rebuilt on demand.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from loraforge.errors import InputError
from loraforge.store.fingerprint import hash_json
from loraforge.models.hub import write_folder_atomically
from loraforge.models.original_layout import TEXT_PREFIXES, UNET_PREFIX, VAE_PREFIX, open_clip_from_original
from loraforge.models.weights import HASH_CACHE, HashCache

if TYPE_CHECKING:
    import torch

    from loraforge.pipeline.params import ModelParams

Arch = Literal["sd15", "sdxl"]
CONVERTER_VERSION = 1  # bump when the conversion changes what it writes: a new folder is made
ASSETS = Path(__file__).resolve().parents[1] / "assets"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_UNET_CONTEXT = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def single_file(base: str, root: Path) -> Path | None:
    """`model.base` as an existing checkpoint file (absolute or relative to `root`), else None."""
    if base.startswith("builtin:"):
        return None
    path = Path(base).expanduser()
    path = path if path.is_absolute() else Path(root) / path
    return path if path.is_file() else None


def detect_checkpoint_arch(keys: set[str], file: Path, context_dim: int | None = None) -> Arch:
    """`sd15` or `sdxl` from an original-layout checkpoint's key names; InputError naming the file otherwise.

    Args:
        keys: the checkpoint's tensor names.
        file: the checkpoint (named in the error).
        context_dim: the UNet's cross-attention width when known (768 SD1.x, 1024 SD2.x, 2048 SDXL).
    """
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("double_blocks.") or has("model.diffusion_model.double_blocks.") or has("transformer_blocks.0.ff_context"):
        raise InputError(f"{file}: a Flux checkpoint; `model.base` takes SD1.5 or SDXL checkpoints only")
    if has("model.diffusion_model.joint_blocks.") or has("text_encoders."):
        raise InputError(f"{file}: an SD3 checkpoint; `model.base` takes SD1.5 or SDXL checkpoints only")
    if not has(UNET_PREFIX + "input_blocks."):
        raise InputError(
            f"{file}: not an original-layout SD checkpoint (no `model.diffusion_model.input_blocks.*` keys); "
            "`model.base` takes a diffusers folder, a Hugging Face id or an SD1.5/SDXL single file"
        )
    if not has(VAE_PREFIX):
        raise InputError(f"{file}: an SD checkpoint without a VAE (`first_stage_model.*`), e.g. a UNet-only file")
    if has("conditioner.embedders.1.") or has(UNET_PREFIX + "label_emb."):
        return "sdxl"
    if has("cond_stage_model.model.") or (context_dim is not None and context_dim == 1024):
        raise InputError(f"{file}: an SD2.x checkpoint (OpenCLIP text encoder); loraforge trains SD1.5 or SDXL")
    if not has(TEXT_PREFIXES["sd15"][0]):
        raise InputError(f"{file}: an SD checkpoint without a CLIP text encoder (`cond_stage_model.transformer.*`)")
    return "sd15"


def read_checkpoint(file: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint on the CPU (safetensors; pickle only with `model.allow_pickle`)."""
    from loraforge.models.safetensors_io import load_tensors

    state = load_tensors(file, allow_pickle=allow_pickle, opt_in="model.allow_pickle")
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise InputError(f"{file}: not a checkpoint (no tensor dictionary)")
    return state


def single_file_folder(params: ModelParams, state_dir: Path, root: Path) -> Path | None:
    """The diffusers folder converted from `model.base` when it is a single file (made once), else None.

    Args:
        params: the `model` section (base, config, allow_pickle).
        state_dir: loraforge's private folder; converted models go under `state_dir/models/`.
        root: folder that relative paths are taken from.
    """
    file = single_file(params.base, root)
    if file is None:
        return None
    if file.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise InputError(f"`model.base` = {params.base!r}: {file} is not a .safetensors checkpoint")
    config = _user_config(params, root)
    cache = HashCache(Path(state_dir) / HASH_CACHE)
    described_by = {p.relative_to(config or ASSETS).as_posix(): cache.hash(p) for p in _config_files(config)}
    digest = cache.hash(file)[:16] + "-" + hash_json(described_by)[:8]
    cache.save()
    existing = sorted((Path(state_dir) / "models").glob(f"single-*-{digest}-v{CONVERTER_VERSION}"))
    if existing and (existing[0] / "model_index.json").is_file():
        return existing[0]
    state = read_checkpoint(file, params.allow_pickle)
    arch = detect_checkpoint_arch(set(state), file, _context_dim(state))
    if config is not None and _config_arch(config) != arch:
        raise InputError(f"`model.config` = {params.config!r} describes {_config_arch(config)}, but {file} is {arch}")
    final = Path(state_dir) / "models" / f"single-{arch}-{digest}-v{CONVERTER_VERSION}"
    write_folder_atomically(final, lambda tmp: convert_checkpoint(state, arch, config, tmp))
    return final


def _context_dim(state: dict[str, Any]) -> int | None:
    """The UNet's cross-attention input width (to_k's in-features), when the key exists."""
    weight = state.get(_UNET_CONTEXT)
    return int(weight.shape[1]) if weight is not None and weight.ndim == 2 else None


def _config_files(config: Path | None) -> list[Path]:
    """The files that describe a checkpoint: `model.config`'s JSON files, else the shipped configs and tokenizer."""
    if config is not None:
        return sorted(config.rglob("*.json"))
    return sorted(p for d in ("pipelines", "configs", "clip-tokenizer") for p in (ASSETS / d).rglob("*") if p.is_file())


def _config_arch(folder: Path) -> Arch:
    """`sdxl` when the folder's model_index.json names an SDXL pipeline (or a second text encoder), else `sd15`."""
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    return "sdxl" if "XL" in str(index.get("_class_name", "")) or "text_encoder_2" in index else "sd15"


def _user_config(params: ModelParams, root: Path) -> Path | None:
    """`model.config` as an existing folder, or None when unset."""
    if params.config is None:
        return None
    path = Path(params.config).expanduser()
    path = path if path.is_absolute() else Path(root) / path
    if not (path / "model_index.json").is_file():
        raise InputError(f"`model.config` = {params.config!r}: {path} is not a diffusers folder (no model_index.json)")
    return path


def shipped_config(arch: Arch, dest: Path) -> Path:
    """Assemble the shipped SD1.5 / SDXL config folder (configs, CLIP tokenizer files) in `dest`."""
    shutil.copytree(ASSETS / "pipelines" / arch, dest, dirs_exist_ok=True)
    (dest / "unet").mkdir(exist_ok=True)
    shutil.copy(ASSETS / "configs" / f"{arch}-unet.json", dest / "unet" / "config.json")
    for tok in ("tokenizer", "tokenizer_2") if arch == "sdxl" else ("tokenizer",):
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(ASSETS / "clip-tokenizer" / name, dest / tok / name)
    return dest


def convert_checkpoint(state: dict[str, torch.Tensor], arch: Arch, config: Path | None, out: Path) -> None:
    """Write an original-layout checkpoint as a diffusers folder (weights in the checkpoint's dtype).

    Args:
        state: the checkpoint's tensors (`read_checkpoint`).
        arch: `sd15` or `sdxl` (`detect_checkpoint_arch`).
        config: a diffusers folder describing it; None = the shipped config for `arch`.
        out: the destination folder.
    """
    with tempfile.TemporaryDirectory(prefix="loraforge-config-") as tmp:
        folder = config or shipped_config(arch, Path(tmp))
        pipe = _build_pipeline(state, arch, folder)
        pipe.save_pretrained(out, safe_serialization=True)


def _build_pipeline(state: dict[str, torch.Tensor], arch: Arch, folder: Path) -> Any:
    """The diffusers pipeline from the checkpoint's tensors and the config folder's configs."""
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTokenizer

    diffusers.utils.logging.disable_progress_bar()  # no per-file bars (the stages draw their own)
    transformers.utils.logging.disable_progress_bar()
    dtype = state[UNET_PREFIX + "input_blocks.0.0.weight"].dtype
    common = {"config": str(folder), "local_files_only": True, "torch_dtype": dtype}
    parts: dict[str, Any] = {
        "unet": UNet2DConditionModel.from_single_file(state, subfolder="unet", **common),
        "vae": AutoencoderKL.from_single_file(state, subfolder="vae", **common),
        "tokenizer": CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True),
        "text_encoder": _clip(state, folder, "text_encoder", TEXT_PREFIXES[arch][0], dtype),
    }
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    parts["scheduler"] = getattr(diffusers, index["scheduler"][1]).from_pretrained(folder / "scheduler")
    if arch == "sdxl":
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(folder / "tokenizer_2", local_files_only=True)
        parts["text_encoder_2"] = _clip(state, folder, "text_encoder_2", TEXT_PREFIXES[arch][1], dtype)
        return diffusers.StableDiffusionXLPipeline(**parts, add_watermarker=False)
    return diffusers.StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def _clip(state: dict[str, torch.Tensor], folder: Path, name: str, prefix: str, dtype: torch.dtype) -> Any:
    """A CLIP text encoder from the checkpoint: OpenAI CLIP keys are transformers' own under
    `prefix`; OpenCLIP (SDXL's second) are renamed by `open_clip_from_original`."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
    model = cls(CLIPTextConfig.from_pretrained(folder / name, local_files_only=True))
    if name == "text_encoder_2":
        weights = open_clip_from_original(state, prefix)
    else:
        weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    own = set(model.state_dict())
    weights = {(k if k in own else k.removeprefix("text_model.")): v for k, v in weights.items()}
    missing, _unexpected = model.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise InputError(f"the checkpoint's {name} lacks {len(missing)} weights (e.g. `{prefix}{missing[0]}`)")
    return model.to(dtype).eval()
