"""Where the diffusers folder `model.base` names comes from: a builtin, a local folder, or the hub.

A random builtin (`builtin:tiny-sd15`, `builtin:tiny-sdxl`) is built by `loraforge.models.tiny` and
written once under the state folder. A trained builtin (`builtin:shapes-sd15`, `builtin:shapes-sdxl`,
made by `scripts/pretrain_shapes.py`) ships as a diffusers folder in `loraforge/assets/builtin/`
and is used from there. A local folder (has `model_index.json`), absolute or relative to the
project root, is used as it is. A Hugging Face id (`owner/name`) downloads only the files
training needs, once, into the usual Hugging Face cache: configs, tokenizer files and non-variant
safetensors weights (`.bin` weights only for components without safetensors, and only with
`model.allow_pickle`).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from loraforge.errors import InputError
from loraforge.models.weights import standard_weights
from loraforge.pipeline.filedeps import BUILTIN_PREFIX, SHIPPED_MODELS

TRAINED_BUILTINS = ("shapes-sd15", "shapes-sdxl")
BUILTIN_VERSION = 1  # bump when loraforge.models.tiny changes what it builds: a new folder is written
WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
HUB_COMPONENTS = (*WEIGHTED_COMPONENTS, "tokenizer", "tokenizer_2", "scheduler")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def model_folder(base: str, revision: str | None, allow_pickle: bool, state_dir: Path, root: Path) -> Path:
    """The local diffusers folder `model.base` names: a builtin (written once), a folder, or a hub download.

    Args:
        base: `model.base`.
        revision: hub branch, tag or commit (`model.revision`); None for the default branch.
        allow_pickle: `model.allow_pickle` (see `download_from_hub`).
        state_dir: loraforge's private folder; builtins are written under `state_dir/models/`.
        root: the folder relative local paths are taken from.
    """
    if base.startswith(BUILTIN_PREFIX):
        return materialize_builtin(base[len(BUILTIN_PREFIX) :], state_dir)
    return local_or_hub(base, revision, allow_pickle, root)


def materialize_builtin(name: str, state_dir: Path) -> Path:
    """The folder of builtin model `name`, written once (built in a temp folder, then renamed).

    Args:
        name: the part after `builtin:` (`tiny-sdxl` or `tiny-sd15`).
        state_dir: loraforge's private folder.
    """
    from loraforge.models.tiny import BUILTINS, save_builtin

    if name in TRAINED_BUILTINS:
        return shipped_builtin(name)
    if name not in BUILTINS:
        known = ", ".join(f"`{BUILTIN_PREFIX}{n}`" for n in sorted([*BUILTINS, *TRAINED_BUILTINS]))
        raise InputError(f"`model.base` = `{BUILTIN_PREFIX}{name}` is not a builtin model (builtins: {known})")
    final = state_dir / "models" / f"builtin-{name}-v{BUILTIN_VERSION}"
    if (final / "model_index.json").is_file():  # complete: the folder only appears by rename
        return final
    write_folder_atomically(final, lambda tmp: save_builtin(name, tmp))
    return final


def shipped_builtin(name: str) -> Path:
    """The shipped folder of trained builtin `name` (`shapes-sdxl`), read in place.

    Raises:
        InputError: this checkout lacks the folder (its weights were not exported yet).
    """
    folder = SHIPPED_MODELS / name
    if not (folder / "model_index.json").is_file():
        raise InputError(
            f"`model.base` = `{BUILTIN_PREFIX}{name}`: {folder} is missing; "
            f"`python scripts/pretrain_shapes.py` trains and exports it"
        )
    return folder


def write_folder_atomically(final: Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` into a temp sibling folder, then rename it to `final` (a killed run leaves no
    half model folder; the folder only appears complete). Losing the race to another process that
    renamed its copy first is fine."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        write(tmp)
        os.rename(tmp, final)
    except OSError:
        if not (final / "model_index.json").is_file():  # not a lost race with another process
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def local_or_hub(base: str, revision: str | None, allow_pickle: bool, root: Path) -> Path:
    """A local folder if `base` names one, else a hub download if `base` looks like `owner/name`.

    Args:
        base: `model.base` (not a builtin).
        revision: hub branch, tag or commit (`model.revision`); None for the default branch.
        allow_pickle: `model.allow_pickle` (see `download_from_hub`).
        root: the folder relative local paths are taken from.
    """
    local = Path(base).expanduser()
    local = local if local.is_absolute() else root / local
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise InputError(
                f"`model.base` = {base!r}: {local} is not a diffusers folder (no model_index.json); "
                "single-file .safetensors/.ckpt checkpoints must be converted to the diffusers layout first"
            )
        return local
    if base.startswith((".", "/", "~")) or "\\" in base or not HUB_ID.match(base):
        raise InputError(
            f"`model.base` = {base!r}: no such folder {local} (and not a Hugging Face id like `owner/name`)"
        )
    return download_from_hub(base, revision, allow_pickle)


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
            raise InputError(f"`model.base` = {repo_id!r}: could not get it from the Hugging Face hub: {e}") from e

    path = fetch(hub_patterns(HUB_COMPONENTS, pickle=False))
    if allow_pickle:
        missing = tuple(
            c for c in WEIGHTED_COMPONENTS if (path / c).is_dir() and not standard_weights(path / c, ".safetensors")
        )
        if missing:
            path = fetch(hub_patterns(missing, pickle=True))
    return path
