"""Weight files of a model folder, and content hashes of model files.

A component folder's weights are its non-variant files of one format: the shards an index names,
else the single file (`model.safetensors`, not `model.fp16.safetensors`). The identity of a model
in every cache key is the hash of its files, never its name; `HashCache` remembers each file's
hash by (path, size, mtime), so a 7 GB UNet is read once, not on every run.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from loraforge.errors import InputError, MissingInput
from loraforge.store.fingerprint import hash_file, hash_json

HASH_CACHE = "hashcache.json"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


def standard_weights(folder: Path, suffix: str) -> list[Path]:
    """Non-variant weight files with `suffix` in `folder`: an index's shards, else the single file.

    `model.safetensors` and `model-00001-of-00002.safetensors` count; `model.fp16.safetensors`
    (a variant, loaded only on request) does not.

    Args:
        folder: a component folder.
        suffix: the weight format, e.g. `.safetensors` or `.bin`.
    """
    indexes = [p for p in folder.glob(f"*{suffix}.index.json") if p.name.count(".") == 3]
    if indexes:
        weight_map = json.loads(indexes[0].read_text(encoding="utf-8"))["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    return sorted(p for p in folder.glob(f"*{suffix}") if p.name.count(".") == 1 and p.is_file())


def folder_weights(folder: Path, allow_pickle: bool, opt_in: str = "model.allow_pickle") -> list[Path]:
    """The weight files a model folder loads from: safetensors (sharded or not), else pickle
    files, refused unless `allow_pickle` ([] for a folder without weights: tokenizer, scheduler).

    Args:
        folder: a component or model folder.
        allow_pickle: the opt-in's value.
        opt_in: the param that opts in, named in the refusal.

    Raises:
        InputError: only pickle weights, and no opt-in.
    """
    if files := standard_weights(folder, ".safetensors"):
        return files
    pickles = [p for s in PICKLE_SUFFIXES for p in standard_weights(folder, s)]
    if pickles and not allow_pickle:
        raise InputError(
            f"{folder}: only pickle weights ({', '.join(p.name for p in pickles)}); pickle files can run code "
            f"when loaded, so they are refused unless `{opt_in}: true` (then loaded with weights_only=True)"
        )
    return pickles


def pretrained_kwargs(folder: Path, allow_pickle: bool, opt_in: str = "model.allow_pickle") -> dict[str, Any]:
    """`from_pretrained` arguments for a local folder (diffusers or transformers): offline, and
    safetensors only unless the folder has nothing else and the user opted in. Every model loaded
    from a folder goes through here.

    Args:
        folder: the model folder.
        allow_pickle: the opt-in's value.
        opt_in: the param that opts in, named in the refusal.
    """
    files = folder_weights(Path(folder), allow_pickle, opt_in)
    if not files:
        raise MissingInput(f"{folder}: no weight files (.safetensors)")
    return {"local_files_only": True, "use_safetensors": files[0].name.endswith(".safetensors")}


def config_files(folder: Path) -> list[Path]:
    """Every non-weight file of a component folder (configs, tokenizer vocab and merges).

    Args:
        folder: a component folder.
    """
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES))


def files_hash(files: list[Path], folder: Path, state_dir: Path) -> str:
    """xxh3-128 over the files' names (relative to `folder`) and contents; each file's hash is
    remembered in `state_dir/hashcache.json` by (path, size, mtime), so big weights are read once.

    Args:
        files: the model's files (`model_files`).
        folder: the model folder.
        state_dir: loraforge's private folder.
    """
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
        """The file's xxh3-128, from the cache when its size and mtime are unchanged.

        Args:
            file: the file (symlinks are resolved: the cache is keyed by the real path).
        """
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
