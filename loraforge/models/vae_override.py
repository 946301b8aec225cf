"""`model.vae`: a VAE that replaces the base model's (an fp16-fix SDXL VAE, SD1.5's ft-MSE VAE).

It is a diffusers AutoencoderKL folder (has `config.json` and weights), used as it is, or one
`.safetensors` file in diffusers or original (ldm, optionally `first_stage_model.`-prefixed)
layout, converted once into `<state_dir>/models/vae-<content hash>/` with the base model's VAE
config. Its files' hash replaces the base VAE's in every cache key (latents, class images,
evaluation renders), so swapping the VAE re-encodes everything it touches and nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from loraforge.errors import InputError, MissingInput
from loraforge.models.original_layout import VAE_PREFIX
from loraforge.models.weights import HASH_CACHE, HashCache, folder_weights

VAE_VERSION = 1  # bump when the conversion changes what it writes


def vae_folder(vae: str, base_vae: Path, allow_pickle: bool, state_dir: Path, root: Path) -> Path:
    """The AutoencoderKL folder `model.vae` names (a file is converted once).

    Args:
        vae: `model.vae`, absolute or relative to `root`.
        base_vae: the base model's `vae` folder (its config shapes a single-file VAE).
        allow_pickle: `model.allow_pickle`.
        state_dir: loraforge's private folder; converted VAEs go under `state_dir/models/`.
        root: the folder relative paths are taken from.
    """
    path = Path(vae).expanduser()
    path = path if path.is_absolute() else Path(root) / path
    if path.is_dir():
        if not (path / "config.json").is_file() or not folder_weights(path, allow_pickle):
            raise InputError(f"`model.vae` = {vae!r}: {path} is not a diffusers VAE folder (config.json + weights)")
        return path
    if not path.is_file():
        raise MissingInput(f"`model.vae` = {vae!r}: no such file or folder {path}")
    cache = HashCache(Path(state_dir) / HASH_CACHE)
    digest = cache.hash(path)[:16] + "-" + cache.hash(base_vae / "config.json")[:8]
    cache.save()
    final = Path(state_dir) / "models" / f"vae-{digest}-v{VAE_VERSION}"
    if not (final / "config.json").is_file():
        _convert_atomically(path, base_vae, allow_pickle, final)
    return final


def _convert_atomically(file: Path, base_vae: Path, allow_pickle: bool, final: Path) -> None:
    """Write the converted VAE in a temp sibling folder, then rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        load_vae_file(file, base_vae, allow_pickle).save_pretrained(tmp, safe_serialization=True)
        os.rename(tmp, final)
    except OSError:
        if not (final / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_vae_file(file: Path, base_vae: Path, allow_pickle: bool) -> Any:
    """An AutoencoderKL from one weights file in diffusers or original layout, shaped by `base_vae`'s config.

    Args:
        file: the `.safetensors` file (pickle only with `allow_pickle`).
        base_vae: a diffusers VAE folder whose config.json describes the file's network.
        allow_pickle: `model.allow_pickle`.
    """
    from diffusers import AutoencoderKL

    from loraforge.models.safetensors_io import load_tensors

    state = load_tensors(file, allow_pickle=allow_pickle, opt_in="model.allow_pickle")
    dtype = next(iter(state.values())).dtype
    if any(k.startswith("encoder.down_blocks.") for k in state):  # diffusers layout
        config = json.loads((base_vae / "config.json").read_text(encoding="utf-8"))
        vae = AutoencoderKL.from_config(config)
        missing, unexpected = vae.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise InputError(f"`model.vae`: {file} does not fit the base model's VAE ({(missing or unexpected)[0]})")
        return vae.to(dtype)
    state = {k.removeprefix(VAE_PREFIX): v for k, v in state.items()}
    if not any(k.startswith("encoder.down.") for k in state):
        raise InputError(f"`model.vae`: {file} holds no VAE weights (no `encoder.down.*` / `encoder.down_blocks.*`)")
    state = {VAE_PREFIX + k: v for k, v in state.items()}
    return AutoencoderKL.from_single_file(state, config=str(base_vae), local_files_only=True, torch_dtype=dtype)
