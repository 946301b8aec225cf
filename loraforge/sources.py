"""The user's source folder, read the kohya way: which files are images, their captions, repeats.

kohya's layout: `N_name/` subfolders give N repeats and class token `name` (`10_sks dog` → 10
repeats, class token `sks dog`); `<stem>.txt` / `<stem>.caption` beside an image is its caption.
Notes and tool files (`.md`, `.json`, `thumbs.db`...) are listed as ignored, never rejected.

Also `Ingested`: a source image once decoded into the item store, which the ingest stage and
dataset craft (`loraforge.craft`) pass around.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraforge.fingerprint import iter_files
from loraforge.images import ImageRejected

log = logging.getLogger(__name__)
CAPTION_SUFFIXES = (".txt", ".caption")  # in order of precedence when both exist
# Notes and tool files that live beside datasets; listed under `ignored` in the report, not rejected.
IGNORED_SUFFIXES = frozenset({".md", ".json", ".jsonl", ".yaml", ".yml", ".toml", ".npz"})
IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini"})
REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")  # kohya: `10_sks dog` → 10 repeats, class token `sks dog`
ROOT_FOLDER = "."


@dataclass(frozen=True)
class SourceImage:
    """One file to try as an image.

    Attributes:
        path: absolute path of the file.
        rel: its path relative to the source folder (POSIX), used in every record.
        folder: its top-level folder (`.` for files directly in the source folder).
        repeats: times per epoch the trainer sees it (from an `N_name` folder, else 1).
        class_token: `name` of an `N_name` folder, else "".
        caption_file: the sidecar caption beside it, if any.
    """

    path: Path
    rel: str
    folder: str
    repeats: int
    class_token: str
    caption_file: Path | None


@dataclass(frozen=True)
class Ingested:
    """A source image that decoded, with its store entry.

    Attributes:
        source: where it came from.
        png: the normalised PNG in the item store.
        width: width in pixels.
        height: height in pixels.
        pixel_hash: `loraforge.images.pixel_hash` of the decoded RGB image.
        caption: sidecar caption text, or None.
        reused: True when the store already held it (nothing decoded this run).
        tile: `r<row>c<col>` (1-based) for a precision-tiling sector, else None.
    """

    source: SourceImage
    png: Path
    width: int
    height: int
    pixel_hash: str
    caption: str | None
    reused: bool
    tile: str | None = None


@dataclass(frozen=True)
class SourceScan:
    """What the source folder holds.

    Attributes:
        images: files to try as images, sorted by relative path.
        ignored: relative paths of notes and tool files that are neither images nor captions.
        orphan_captions: relative paths of caption files with no file of the same stem.
        folders: per top-level folder: its repeats and class token.
    """

    images: list[SourceImage]
    ignored: list[str]
    orphan_captions: list[str]
    folders: dict[str, dict[str, Any]]


def folder_convention(folder: str) -> tuple[int, str]:
    """(repeats, class token) of a top-level folder name, by kohya's `N_name` rule.

    Args:
        folder: the folder's name (`.` for the source folder itself).

    Raises:
        ValueError: an `N_name` folder with N = 0 (it would never be trained on).
    """
    m = REPEATS_FOLDER.match(folder)
    if folder == ROOT_FOLDER or not m:
        return 1, ""
    repeats = int(m.group(1))
    if repeats < 1:
        raise ValueError(f"`ingest.source` folder `{folder}`: repeats must be ≥ 1, got {repeats}")
    return repeats, m.group(2)


def scan_source(root: Path) -> SourceScan:
    """Sort the files under `root` into images, captions and ignored files (hidden files are
    skipped, as by `loraforge.fingerprint.hash_tree`, so the stage reads what its cache key covers).

    Args:
        root: the source folder.
    """
    files = sorted(iter_files(root), key=lambda p: p.relative_to(root).as_posix())
    captions = {p for p in files if p.suffix.lower() in CAPTION_SUFFIXES}
    ignored = [p for p in files if p.suffix.lower() in IGNORED_SUFFIXES or p.name.lower() in IGNORED_NAMES]
    skip = captions | set(ignored)
    candidates = [p for p in files if p not in skip]
    stems = {(p.parent, p.stem) for p in candidates}
    folders: dict[str, dict[str, Any]] = {}
    images = []
    for path in candidates:
        rel = path.relative_to(root)
        folder = rel.parts[0] if len(rel.parts) > 1 else ROOT_FOLDER
        repeats, token = folder_convention(folder)
        if folder not in folders:
            folders[folder] = {"repeats": repeats, "class_token": token}
            if folder != ROOT_FOLDER and not token:
                log.info("folder `%s` has no `N_name` prefix: repeats 1, no class token", folder)
        sidecar = next((c for c in _caption_candidates(path) if c in captions), None)
        images.append(SourceImage(path, rel.as_posix(), folder, repeats, token, sidecar))
    orphans = [c for c in captions if (c.parent, c.stem) not in stems]
    return SourceScan(
        images=images,
        ignored=[p.relative_to(root).as_posix() for p in ignored],
        orphan_captions=sorted(c.relative_to(root).as_posix() for c in orphans),
        folders=folders,
    )


def _caption_candidates(path: Path) -> list[Path]:
    # Same stem, any case of the suffix; `.txt` before `.caption`.
    return [path.with_suffix(s) for s in CAPTION_SUFFIXES] + [path.with_suffix(s.upper()) for s in CAPTION_SUFFIXES]


def read_caption(path: Path) -> str | None:
    """The text of a sidecar caption (BOM and surrounding whitespace stripped); None when blank.

    Args:
        path: the `.txt` / `.caption` file.

    Raises:
        ImageRejected: the file is not UTF-8 text (the image is rejected with it, loudly).
    """
    try:
        text = path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError:
        raise ImageRejected(f"caption file {path.name} is not UTF-8 text") from None
    return text or None
