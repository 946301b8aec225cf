"""The user's source folder, read the kohya way: which files are images, their captions, repeats.

kohya's layout: `N_name/` subfolders give N repeats and class token `name` (`10_sks dog` → 10
repeats, class token `sks dog`); `<stem>.txt` / `<stem>.caption` beside an image is its caption.
Notes and tool files (`.md`, `.json`, `thumbs.db`...) are listed as ignored, never rejected.
A `<stem>-mask.png` (or OneTrainer's `<stem>-masklabel.png`) beside an image is that image's
mask for the masked loss, never an image itself; one with no image of its stem is listed as an
orphan mask (and ignored).

Also `Ingested`: a source image once decoded into the item store, which the ingest stage and
dataset craft (`loraforge.data.craft`) pass around.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraforge.errors import InputError
from loraforge.data.images import ImageRejected

log = logging.getLogger(__name__)
CAPTION_SUFFIXES = (".txt", ".caption")  # in order of precedence when both exist
MASK_SUFFIXES = ("-mask.png", "-masklabel.png")  # `<stem>-mask.png`; OneTrainer: `<stem>-masklabel.png`
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
        mask_file: the `<stem>-mask.png` beside it, if any.
    """

    path: Path
    rel: str
    folder: str
    repeats: int
    class_token: str
    caption_file: Path | None
    mask_file: Path | None = None


@dataclass(frozen=True)
class Ingested:
    """A source image that decoded, with its store entry.

    Attributes:
        source: where it came from.
        png: the normalised PNG in the item store.
        width: width in pixels.
        height: height in pixels.
        pixel_hash: `loraforge.data.images.pixel_hash` of the decoded RGB image.
        caption: sidecar caption text, or None.
        reused: True when the store already held it (nothing decoded this run).
        tile: `r<row>c<col>` (1-based) for a precision-tiling sector, else None.
        mask: its mask in the item store ("L" PNG of the same size; from the alpha channel or the
            mask file), else None.
        mask_hash: `pixel_hash` of the mask, else None.
    """

    source: SourceImage
    png: Path
    width: int
    height: int
    pixel_hash: str
    caption: str | None
    reused: bool
    tile: str | None = None
    mask: Path | None = None
    mask_hash: str | None = None


@dataclass(frozen=True)
class SourceScan:
    """What the source folder holds. Every entry under it is in exactly one of `images`,
    `rejected` or `ignored` (or is the sidecar caption or mask of an image).

    Attributes:
        images: files to try as images, sorted by relative path.
        ignored: relative paths of notes, tool files, hidden entries and orphan captions.
        orphan_captions: the caption files among `ignored` with no file of the same stem.
        orphan_masks: the mask files among `ignored` with no image of their stem.
        folders: per top-level folder: its repeats and class token.
        rejected: `{"source", "reason"}` per entry refused before decoding (a symlink leading out
            of the source folder, a broken link, a link loop, a socket or device).
    """

    images: list[SourceImage]
    ignored: list[str]
    orphan_captions: list[str]
    folders: dict[str, dict[str, Any]]
    rejected: list[dict[str, str]] = field(default_factory=list)
    orphan_masks: list[str] = field(default_factory=list)


def folder_convention(folder: str) -> tuple[int, str]:
    """(repeats, class token) of a top-level folder name, by kohya's `N_name` rule.

    Args:
        folder: the folder's name (`.` for the source folder itself).

    Raises:
        InputError: an `N_name` folder with N = 0 (it would never be trained on).
    """
    m = REPEATS_FOLDER.match(folder)
    if folder == ROOT_FOLDER or not m:
        return 1, ""
    repeats = int(m.group(1))
    if repeats < 1:
        raise InputError(f"`ingest.source` folder `{folder}`: repeats must be ≥ 1, got {repeats}")
    return repeats, m.group(2)


def walk_source(root: Path, follow_symlinks: bool) -> tuple[list[tuple[Path, str]], list[str], list[dict[str, str]]]:
    """Every entry under `root`: (files as (path, relative name), hidden entries, refusals).

    Symlinks are resolved. One whose target lies inside `root` is followed (a linked folder is
    read as if it were there); one leading out of it is refused with the reason unless
    `follow_symlinks`; a broken link or a folder link back into its own path (a loop) is refused.
    Hidden entries (`.DS_Store`, `.git`) are listed, not read.

    Args:
        root: the source folder.
        follow_symlinks: `ingest.follow_symlinks`.
    """
    top = root.resolve()
    files: list[tuple[Path, str]] = []
    hidden: list[str] = []
    refused: list[dict[str, str]] = []
    stack: list[tuple[Path, str, tuple[Path, ...]]] = [(root, "", (top,))]
    while stack:
        folder, prefix, real_path = stack.pop()
        for entry in sorted(os.scandir(folder), key=lambda e: e.name, reverse=True):
            rel, path = f"{prefix}{entry.name}", Path(entry.path)
            if entry.name.startswith("."):
                hidden.append(rel)
                continue
            reason, real = _link_problem(path, top, real_path, follow_symlinks) if entry.is_symlink() else (None, None)
            if reason:
                refused.append({"source": rel, "reason": reason})
            elif path.is_dir():
                stack.append((path, f"{rel}/", (*real_path, real or path.resolve())))
            elif path.is_file():
                files.append((path, rel))
            else:
                refused.append({"source": rel, "reason": "not a regular file (socket, device or pipe)"})
    return sorted(files, key=lambda f: f[1]), sorted(hidden), sorted(refused, key=lambda r: r["source"])


def _link_problem(
    link: Path, top: Path, real_path: tuple[Path, ...], follow_symlinks: bool
) -> tuple[str | None, Path | None]:
    """Why a symlink is refused (None when it is followed), and its resolved target."""
    target = link.resolve()
    if not target.exists():
        return f"broken symlink (to {os.readlink(link)})", target
    if target.is_dir() and target in real_path:
        return f"symlinked folder loops back to {target}", target
    if target != top and top not in target.parents and not follow_symlinks:
        return f"symlink to {target}, outside the source folder (set `ingest.follow_symlinks: true` to use it)", target
    return None, target


def scan_source(root: Path, follow_symlinks: bool = False) -> SourceScan:
    """Sort every entry under `root` into images, captions, ignored and refused entries.

    Args:
        root: the source folder.
        follow_symlinks: `ingest.follow_symlinks` (see `walk_source`).
    """
    walked, hidden, refused = walk_source(root, follow_symlinks)
    files = [path for path, _ in walked]
    rels = {path: rel for path, rel in walked}
    captions = {p for p in files if p.suffix.lower() in CAPTION_SUFFIXES}
    ignored = [p for p in files if p.suffix.lower() in IGNORED_SUFFIXES or p.name.lower() in IGNORED_NAMES]
    masks = {p for p in files if mask_stem(p.name) is not None and p not in set(ignored)}
    candidates = [p for p in files if p not in captions and p not in set(ignored) and p not in masks]
    stems = {(p.parent, p.stem) for p in candidates}
    mask_of = {(m.parent, mask_stem(m.name)): m for m in sorted(masks, reverse=True)}  # `-mask` wins
    folders: dict[str, dict[str, Any]] = {}
    images = []
    for path in candidates:
        parts = rels[path].split("/")
        folder = parts[0] if len(parts) > 1 else ROOT_FOLDER
        repeats, token = folder_convention(folder)
        if folder not in folders:
            folders[folder] = {"repeats": repeats, "class_token": token}
            if folder != ROOT_FOLDER and not token:
                log.info("folder `%s` has no `N_name` prefix: repeats 1, no class token", folder)
        sidecar = next((c for c in _caption_candidates(path) if c in captions), None)
        mask = mask_of.get((path.parent, path.stem))
        images.append(SourceImage(path, rels[path], folder, repeats, token, sidecar, mask))
    orphans = sorted(rels[c] for c in captions if (c.parent, c.stem) not in stems)
    lone = sorted(rels[m] for m in masks if (m.parent, mask_stem(m.name)) not in stems)
    lone += sorted(rels[m] for m in masks if m not in mask_of.values() and rels[m] not in lone)  # both kinds
    for rel in lone:
        log.warning("%s: a mask file whose image is not there (or is not the mask used); ignored", rel)
    return SourceScan(
        images=images,
        ignored=sorted([rels[p] for p in ignored] + hidden + orphans + lone),
        orphan_captions=orphans,
        folders=folders,
        rejected=refused,
        orphan_masks=lone,
    )


def mask_stem(name: str) -> str | None:
    """The image stem a mask file name belongs to (`cat-mask.png` -> `cat`), None for other names.

    Args:
        name: a file name.
    """
    lower = name.lower()
    suffix = next((s for s in MASK_SUFFIXES if lower.endswith(s)), None)
    return name[: -len(suffix)] if suffix and len(name) > len(suffix) else None


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
