"""Content fingerprints (xxh3-128) shared by the item store and the Prefect cache policy.

Item keys are built in one place only, `loraforge.store.items.ItemStore.item`, from these hashes.

Every cache decision in loraforge is one of these hashes: of bytes, of a file, of a folder
tree, or of a canonical JSON rendering of parameters. Hex digests are 32 characters.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Iterable

import xxhash

CHUNK = 1 << 22  # 4 MiB reads keep memory flat on multi-GB checkpoints


def hash_bytes(data: bytes) -> str:
    """xxh3-128 hex digest of `data`."""
    return xxhash.xxh3_128_hexdigest(data)


def hash_file(path: Path) -> str:
    """xxh3-128 hex digest of a file's content, read in chunks."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def iter_files(root: Path) -> Iterable[Path]:
    """Files under `root` in a stable order (a single file yields itself); hidden files skipped."""
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def hash_tree(root: Path) -> str:
    """Hash of a file or folder: relative names and contents of every file, in sorted order.

    A missing path hashes to a fixed marker so that "absent" is a state like any other.
    """
    root = Path(root)
    if not root.exists():
        return hash_bytes(b"<missing>")
    h = xxhash.xxh3_128()
    for path in iter_files(root):
        rel = path.relative_to(root).as_posix() if root.is_dir() else path.name
        h.update(rel.encode() + b"\0" + hash_file(path).encode() + b"\n")
    return h.hexdigest()


def canonical(obj: Any) -> Any:
    """Turn dataclasses, paths and tuples into plain JSON-able values (for hashing and reports)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return canonical(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if isinstance(obj, Path):
        return obj.as_posix()
    return obj


def hash_json(obj: Any) -> str:
    """Hash of the canonical JSON rendering of `obj` (sorted keys, no whitespace)."""
    text = json.dumps(canonical(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hash_bytes(text.encode())
