"""Model captioners for the caption stage: where their model files are, and the tag normaliser.

The captioners are `loraforge.captioning.blip.BlipCaptioner` (transformers) and `loraforge.captioning.wd14.Wd14Tagger`
(WD14-style ONNX taggers). Both load from a local folder or a Hugging Face id (downloaded once
into the Hugging Face cache; only a hub id ever downloads):

- `blip`: a folder written by `save_pretrained` (config.json, safetensors weights, processor and
  tokenizer files), e.g. `Salesforce/blip-image-captioning-large`.
- `wd14`: a folder with `model.onnx` and `selected_tags.csv`, the layout of the SmilingWolf/wd-*
  repos.

A captioner's `run(images)` returns one raw output per image as bytes (BLIP: the caption text,
WD14: the tag scores as .npy), which the stage caches in the item store; `caption(raw)` turns a
raw output into the caption with the current settings. WD14 scores therefore survive a change of
threshold: the tags are re-selected, the model does not run again. A cache key holds the hash of
the model's files (`loraforge.models.weights.files_hash` over `model_files`), never its name.

huggingface_hub is imported inside the functions that use it, so this module imports nothing heavy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from loraforge.errors import InputError, MissingInput
from loraforge.models.hub import HUB_ID

CaptionerKind = Literal["blip", "wd14"]
DEFAULT_MODELS: dict[str, str] = {  # what `caption.captioner_path: null` means (kohya's defaults)
    "blip": "Salesforce/blip-image-captioning-large",
    "wd14": "SmilingWolf/wd-v1-4-convnext-tagger-v2",
}
WD14_FILES = ("model.onnx", "selected_tags.csv")
BLIP_PATTERNS = ("*.json", "*.txt", "*.safetensors")  # configs, tokenizer vocab, weights; never pickles


# ---------------------------------------------------------------------------------------------
# Finding the model files


def locate_model(
    kind: CaptionerKind,
    value: str | None,
    root: Path,
    revision: str | None = None,
    param: str = "caption.captioner_path",
) -> Path:
    """The local folder holding the captioner's files: `value` as a folder, else a hub download.

    Args:
        kind: `blip` or `wd14` (decides which files a hub download fetches).
        value: a folder (absolute or relative to `root`), a Hugging Face id, or None for
            `DEFAULT_MODELS[kind]`.
        root: the project root, which relative folders are taken from.
        revision: hub branch, tag or commit; None for the default branch.
        param: the params key named in errors.
    """
    value = value or DEFAULT_MODELS[kind]
    local = Path(value).expanduser()
    local = local if local.is_absolute() else Path(root) / local
    if local.exists():
        if not local.is_dir():
            raise InputError(f"`{param}` = {value!r}: {local} is a file; give the folder that holds the {kind} model")
        return local
    if value.startswith((".", "/", "~")) or "\\" in value or not HUB_ID.match(value):
        raise MissingInput(
            f"`{param}` = {value!r}: no such folder {local} (and not a Hugging Face id like `owner/name`)"
        )
    try:
        return download_model(kind, value, revision)
    except Exception as e:  # offline, no such repo, no such file: one message naming the param
        raise MissingInput(
            f"`{param}` = {value!r}: no folder {local}, and the Hugging Face hub could not provide it: {e}"
        ) from e


def download_model(kind: CaptionerKind, repo_id: str, revision: str | None) -> Path:
    """Fetch (or find in the Hugging Face cache) a captioner's files; returns the snapshot folder.

    Args:
        kind: `wd14` fetches `model.onnx` and `selected_tags.csv`; `blip` configs, vocab and safetensors.
        repo_id: `owner/name` on the hub.
        revision: branch, tag or commit; None for the default branch.
    """
    from huggingface_hub import hf_hub_download, snapshot_download

    if kind == "wd14":
        paths = [Path(hf_hub_download(repo_id, name, revision=revision)) for name in WD14_FILES]
        return paths[0].parent
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(BLIP_PATTERNS)))


def model_files(kind: CaptionerKind, folder: Path, param: str = "caption.captioner_path") -> list[Path]:
    """The files a captioner loads (what its identity hash covers); raises naming a missing one.

    Args:
        kind: `blip` or `wd14`.
        folder: the resolved model folder.
        param: the params key named in errors.
    """
    if kind == "wd14":
        for name in WD14_FILES:
            if not (folder / name).is_file():
                raise MissingInput(
                    f"`{param}`: no {name} at {folder / name} (a WD14 tagger folder holds {' and '.join(WD14_FILES)})"
                )
        return [folder / name for name in WD14_FILES]
    if not (folder / "config.json").is_file():
        raise MissingInput(
            f"`{param}`: no config.json at {folder / 'config.json'} (a BLIP folder as written by save_pretrained)"
        )
    if not any(folder.glob("*.safetensors")):
        raise MissingInput(f"`{param}`: no .safetensors weights in {folder} (pickle weights are not loaded)")
    return sorted({p for pattern in BLIP_PATTERNS for p in folder.glob(pattern) if p.is_file()})


def normalize_tag(tag: str) -> str:
    """A tag as compared: lower case, `_` as space, single spaces (`Long_Hair ` → `long hair`).

    Args:
        tag: one comma-separated tag.
    """
    return " ".join(tag.replace("_", " ").split()).lower()
