"""The one way loraforge reads and writes weight files.

Reading: safetensors only. A pickle file (`.pth`, `.pt`, `.ckpt`, `.bin`) is refused, naming the
file and the param that opts in; with the opt-in it is read by `torch.load(weights_only=True)`,
which refuses arbitrary objects.

Writing: byte-identical for identical tensors. The safetensors writer keeps its metadata in a
hash map, so the order of the `__metadata__` keys (and with it the file's bytes and hash) changes
from process to process; `save_tensors` rewrites the header with the keys sorted, so a rerun
that computes the same tensors writes the same file and DVC, the item store and the evaluation
cache see no change.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loraforge.errors import InputError, MissingInput

PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
SAFE_SUFFIXES = (".safetensors",)


def load_tensors(path: Path, *, allow_pickle: bool = False, opt_in: str = "allow_pickle") -> dict[str, torch.Tensor]:
    """Every tensor of a weights file, on the CPU.

    Args:
        path: a `.safetensors` file (or, with `allow_pickle`, a pickle file).
        allow_pickle: read pickle files (with `weights_only=True`).
        opt_in: the param that sets `allow_pickle`, named in the refusal (e.g. `upscale.allow_pickle`).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"{path}: no such file")
    refuse_pickle(path, allow_pickle, opt_in)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state.get("state_dict", state) if isinstance(state, dict) else state
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise InputError(f"{path}: not a readable safetensors file ({e})") from None


def refuse_pickle(path: Path, allow_pickle: bool, opt_in: str) -> None:
    """Stop before any work when `path` is a pickle file and the user did not opt in.

    Args:
        path: the weights file.
        allow_pickle: the opt-in's value.
        opt_in: the param that opts in, named in the message.
    """
    if Path(path).suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise InputError(
            f"{path} is a pickle file, which can run code when loaded: convert it to .safetensors "
            f"or set `{opt_in}: true` (then it is read with torch.load(weights_only=True))"
        )


def read_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file (empty when it has none)."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose bytes depend only on the tensors and the metadata.

    Args:
        tensors: name -> tensor (contiguous, on any device).
        path: the file to write (replaced).
        metadata: string -> string header entries; written in sorted key order.
    """
    save_file(tensors, str(path), metadata=metadata)
    if metadata:
        sort_metadata(Path(path))


def sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header in place with its `__metadata__` keys sorted."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header: dict[str, Any] = json.loads(f.read(size))
        meta = header.pop("__metadata__", None)
        if meta is None:
            return
        ordered = {"__metadata__": dict(sorted(meta.items())), **header}
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= size:  # the usual case: same entries, same length; pad as the writer does
            f.seek(8)
            f.write(text + b" " * (size - len(text)))
            return
    _rewrite_with_header(path, text, size)


def _rewrite_with_header(path: Path, text: bytes, old_size: int) -> None:
    """Copy `path` with a new (longer) header, padded so the data stays 8-byte aligned."""
    text += b" " * (-(8 + len(text)) % 8)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=Path(path).parent)
    with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
        out.write(len(text).to_bytes(8, "little") + text)
        src.seek(8 + old_size)
        shutil.copyfileobj(src, out, 1 << 22)
    os.replace(tmp, path)
