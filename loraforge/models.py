"""Base models: resolve `model.base` to a local diffusers folder, hash its components, load them.

`model.base` is one of
- `builtin:tiny-sdxl` / `builtin:tiny-sd15`: built in code (`loraforge.tiny`) and written once
  to `<state_dir>/models/builtin-<name>-v<N>/`;
- a local diffusers folder (has `model_index.json`), absolute or relative to the project root;
- a Hugging Face id (`owner/name`): only the files training needs are downloaded, once, into the
  usual Hugging Face cache.

Weights load from safetensors. Pickle weights (`.bin`, `.ckpt`, `.pt`, `.pth`) can run code when
unpickled, so a component that has only those is refused unless `model.allow_pickle: true`, and
then diffusers/transformers load it with `torch.load(weights_only=True)`.

The identity of a model in every cache key is the hash of its files (`component_hash`), never
its name; a per-file hash cache keyed on (path, size, mtime) makes that cheap after the first time.

torch, diffusers and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from loraforge.fingerprint import hash_file, hash_json

if TYPE_CHECKING:
    import torch
    from transformers import CLIPTokenizer

    from loraforge.params import ModelParams

Arch = Literal["sd15", "sdxl"]

BUILTIN_PREFIX = "builtin:"
BUILTIN_VERSION = 1  # bump when loraforge.tiny changes what it builds: a new folder is written
HASH_CACHE = "hashcache.json"
WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
HUB_COMPONENTS = (*WEIGHTED_COMPONENTS, "tokenizer", "tokenizer_2", "scheduler")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


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
    """

    path: Path
    arch: Arch
    native_resolution: int
    vae_scale_factor: int
    source: str
    scaling_factor: float = 0.18215
    allow_pickle: bool = False


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
    base = params.base
    state_dir = Path(state_dir)
    if base.startswith(BUILTIN_PREFIX):
        path = materialize_builtin(base[len(BUILTIN_PREFIX) :], state_dir)
    else:
        path = _local_or_hub(base, params, Path(root) if root is not None else state_dir.parent)
    return inspect_model(path, source=base, allow_pickle=params.allow_pickle)


def materialize_builtin(name: str, state_dir: Path) -> Path:
    """The folder of builtin model `name`, written once (built in a temp folder, then renamed).

    Args:
        name: the part after `builtin:` (`tiny-sdxl` or `tiny-sd15`).
        state_dir: loraforge's private folder.
    """
    from loraforge.tiny import BUILTINS, save_builtin

    if name not in BUILTINS:
        known = ", ".join(f"`{BUILTIN_PREFIX}{n}`" for n in sorted(BUILTINS))
        raise ValueError(f"`model.base` = `{BUILTIN_PREFIX}{name}` is not a builtin model (builtins: {known})")
    final = state_dir / "models" / f"builtin-{name}-v{BUILTIN_VERSION}"
    if (final / "model_index.json").is_file():  # complete: the folder only appears by rename
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-builtin-{name}-", dir=final.parent))
    try:
        save_builtin(name, tmp)
        os.rename(tmp, final)
    except OSError:
        if not (final / "model_index.json").is_file():  # not a lost race with another process
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _local_or_hub(base: str, params: ModelParams, root: Path) -> Path:
    """A local folder if `base` names one, else a hub download if `base` looks like `owner/name`."""
    local = Path(base).expanduser()
    local = local if local.is_absolute() else root / local
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise ValueError(
                f"`model.base` = {base!r}: {local} is not a diffusers folder (no model_index.json); "
                "single-file .safetensors/.ckpt checkpoints must be converted to the diffusers layout first"
            )
        return local
    if base.startswith((".", "/", "~")) or "\\" in base or not HUB_ID.match(base):
        raise ValueError(
            f"`model.base` = {base!r}: no such folder {local} (and not a Hugging Face id like `owner/name`)"
        )
    return download_from_hub(base, params.revision, params.allow_pickle)


def hub_patterns(components: tuple[str, ...], pickle: bool) -> list[str]:
    """`allow_patterns` for a hub download: configs, tokenizer files and non-variant weights.

    Variant files (`*.fp16.safetensors`) and other formats (ONNX, OpenVINO, Flax) are left out,
    which keeps an SDXL download to the ~7 GB that training loads.

    Args:
        components: sub-folders to fetch.
        pickle: fetch `.bin` weights instead of safetensors.
    """
    # diffusers names its weights diffusion_pytorch_model.*, transformers model.* / pytorch_model.*
    ext, stems = (
        ("bin", ("diffusion_pytorch_model", "pytorch_model"))
        if pickle
        else ("safetensors", ("diffusion_pytorch_model", "model"))
    )
    patterns = [] if pickle else ["model_index.json"]
    for c in components:
        if not pickle:
            patterns += [f"{c}/*.json", f"{c}/*.txt"]
        for stem in stems:
            patterns += [f"{c}/{stem}.{ext}", f"{c}/{stem}-*-of-*.{ext}"]  # single file, or shards
    return patterns


def download_from_hub(repo_id: str, revision: str | None, allow_pickle: bool) -> Path:
    """Download (or find in the Hugging Face cache) what training needs from `repo_id`.

    Args:
        repo_id: `owner/name` on the hub.
        revision: branch, tag or commit (`model.revision`); None for the default branch.
        allow_pickle: when a component has no safetensors, also fetch its `.bin` weights.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    def fetch(patterns: list[str]) -> Path:
        try:
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
            raise ValueError(f"`model.base` = {repo_id!r}: could not get it from the Hugging Face hub: {e}") from e

    path = fetch(hub_patterns(HUB_COMPONENTS, pickle=False))
    if allow_pickle:
        missing = tuple(
            c for c in WEIGHTED_COMPONENTS if (path / c).is_dir() and not _standard_weights(path / c, ".safetensors")
        )
        if missing:
            path = fetch(hub_patterns(missing, pickle=True))
    return path


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


def _standard_weights(folder: Path, suffix: str) -> list[Path]:
    """Non-variant weight files with `suffix` in `folder`: an index's shards, else the single file.

    `model.safetensors` and `model-00001-of-00002.safetensors` count; `model.fp16.safetensors`
    (a variant, loaded only on request) does not.
    """
    indexes = [p for p in folder.glob(f"*{suffix}.index.json") if p.name.count(".") == 3]
    if indexes:
        weight_map = json.loads(indexes[0].read_text(encoding="utf-8"))["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    return sorted(p for p in folder.glob(f"*{suffix}") if p.name.count(".") == 1 and p.is_file())


def weight_files(info: ModelInfo, component: str) -> list[Path]:
    """The weight files `component` loads from: safetensors (sharded or not), else pickle files
    when `info.allow_pickle`; [] for components without weights (tokenizer, scheduler).

    Args:
        info: the resolved model.
        component: a sub-folder (`unet`, `vae`, `text_encoder`, `text_encoder_2`...).

    Raises:
        ValueError: the component has only pickle weights and `model.allow_pickle` is off.
    """
    folder = info.path / component
    if not folder.is_dir():
        raise ValueError(f"{info.path}: no component `{component}` (`model.base` = {info.source!r})")
    if files := _standard_weights(folder, ".safetensors"):
        return files
    pickles = [p for s in PICKLE_SUFFIXES for p in _standard_weights(folder, s)]
    if pickles and not info.allow_pickle:
        raise ValueError(
            f"{folder}: only pickle weights ({', '.join(p.name for p in pickles)}); pickle files can run code "
            "when loaded, so they are refused unless `model.allow_pickle: true` (then loaded with weights_only=True)"
        )
    return pickles


def _config_files(folder: Path) -> list[Path]:
    """Every non-weight file of a component folder (configs, tokenizer vocab and merges)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES))


def component_hash(info: ModelInfo, component: str, state_dir: Path) -> str:
    """xxh3-128 of a component's config and weight files (names relative to its folder).

    Each file's hash is cached in `state_dir/hashcache.json` by (path, size, mtime), so a 7 GB
    UNet is read once, not on every run.

    Args:
        info: the resolved model.
        component: a sub-folder (`unet`, `vae`, `text_encoder`, `tokenizer`...).
        state_dir: loraforge's private folder (holds the hash cache).
    """
    folder = info.path / component
    files = sorted(set(_config_files(folder)) | set(weight_files(info, component)))
    cache = HashCache(Path(state_dir) / HASH_CACHE)
    digests = {p.relative_to(folder).as_posix(): cache.hash(p) for p in files}
    cache.save()
    return hash_json(digests)


class HashCache:
    """File hashes remembered by (resolved path, size, mtime_ns), stored as one JSON file.

    Args:
        path: the cache file (created on `save`; an unreadable one is treated as empty).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.changed = False
        try:
            self.entries: dict[str, dict[str, Any]] = json.loads(self.path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            self.entries = {}

    def hash(self, file: Path) -> str:
        """The file's xxh3-128, from the cache when its size and mtime are unchanged."""
        real = Path(file).resolve()  # hub snapshots are symlinks into a shared blob store
        stat = real.stat()
        key = str(real)
        entry = self.entries.get(key)
        if entry and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns:
            return entry["hash"]
        digest = hash_file(real)
        self.entries[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "hash": digest}
        self.changed = True
        return digest

    def save(self) -> None:
        """Write the cache atomically (temp file + rename) if anything was added."""
        if not self.changed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-hashcache-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.entries, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        self.changed = False


# ---------------------------------------------------------------------------------------------
# Loading


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
                f"`model.device` is `cuda` but no CUDA GPU is available (torch {torch.__version__}, {build}); use `cpu` or `auto`"
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


class _NoTorchvisionNotice:
    """Drops transformers' "requires torchvision ... falling back to ...Pil" notice: the PIL
    image processors are what loraforge wants (no torchvision is installed on CPU), and the
    notice's advice to install one would break a CPU torch."""

    def filter(self, record: Any) -> bool:
        return "requires torchvision" not in record.getMessage()


def quiet_hf_loading() -> None:
    """No per-file "Loading weights" bars from transformers/diffusers (the stages draw their own)."""
    import logging

    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    for name in ("transformers.utils.import_utils",):
        logging.getLogger(name).addFilter(_NoTorchvisionNotice())


def load_vae(info: ModelInfo, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """The AutoencoderKL, in eval mode on `device`.

    Args:
        info: the resolved model.
        device: where to put it.
        dtype: weight dtype; None means float32.
    """
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(info.path / "vae", **_load_kwargs(info, "vae", dtype)).to(device).eval()


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
