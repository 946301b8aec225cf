"""The content-addressed item store: per-image work (images, captions, latents...) cached by key.

Entries live at `<root>/<kind>/<key[:2]>/<key><suffix>`. Writes are atomic (temp file in the
same folder, fsync, rename), so a killed run never leaves a half-written entry. Stage outputs
are materialised from the store with hard links where the filesystem allows, else copies.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


class ItemStore:
    """A folder of immutable, content-addressed entries.

    Args:
        root: folder holding the store (created on demand); lives outside DVC outputs, since
            DVC deletes a stage's outputs before running it.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, kind: str, key: str, suffix: str) -> Path:
        """Where the entry `key` of `kind` lives (whether or not it exists)."""
        return self.root / kind / key[:2] / f"{key}{suffix}"

    def get(self, kind: str, key: str, suffix: str) -> Path | None:
        """The entry's path if it exists, else None."""
        path = self.path(kind, key, suffix)
        return path if path.is_file() else None

    def put(self, kind: str, key: str, suffix: str, write: Callable[[Path], None]) -> Path:
        """Create the entry by calling `write(tmp_path)`, then fsync and rename it into place.

        Args:
            kind: entry family (`image`, `latent`, `caption`...), a sub-folder of the store.
            key: the entry's fingerprint (see `loraforge.fingerprint.item_key`).
            suffix: file suffix including the dot, e.g. `.png`.
            write: writes the entry's content to the path it is given.
        """
        final = self.path(kind, key, suffix)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=final.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            write(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; entries are shared, read-only data
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return final

    def put_bytes(self, kind: str, key: str, suffix: str, data: bytes) -> Path:
        """Store `data` as the entry `key`."""
        return self.put(kind, key, suffix, lambda p: p.write_bytes(data))


def materialize(src: Path, dst: Path) -> None:
    """Place `src` at `dst` as a hard link (no extra disk), falling back to a copy across devices."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
