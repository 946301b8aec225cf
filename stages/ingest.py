"""Stage `ingest`: decode, normalise and de-duplicate the source images; reject bad files with reasons.

Reads the user's folder (kohya layout: `N_name/` subfolders give N repeats and class token
`name`; `<stem>.txt` / `<stem>.caption` beside an image is its caption) and writes:

    <images>/images/<id>.png   every kept image as 8-bit RGB PNG; id = first 16 hex of its pixel hash
    <images>/manifest.jsonl    one line per kept image, sorted by source path
    <images>/rejects.jsonl     {"source", "reason"} per file that could not be used
    <images>/duplicates.jsonl  {"source", "kept"} per exact duplicate dropped

Output names never come from user file names, so no name can escape the output folder.

Caching: each source file's normalised PNG is an item-store entry keyed by the file's bytes, the
background colour, the Pillow version and `VERSION`, with a small JSON entry beside it holding
width, height and pixel hash (written after the PNG, so it also marks the pair complete). A rerun
over unchanged files only hashes them. Rejected files are not cached: they are few, and a
transient read error must not stick.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL
from pydantic import Field

from loraforge.fingerprint import hash_file, item_key, iter_files
from loraforge.images import ImageRejected, decode_image, parse_color, pixel_hash, save_png, write_jsonl
from loraforge.params import section
from loraforge.runner import Paths, StageEnv
from loraforge.store import ItemStore, materialize

log = logging.getLogger(__name__)

VERSION = 1  # bump when decoding/normalisation changes: every stored image is then redone
KIND = "ingested-image"
CAPTION_SUFFIXES = (".txt", ".caption")  # in order of precedence when both exist
# Notes and tool files that live beside datasets; listed under `ignored` in the report, not rejected.
IGNORED_SUFFIXES = frozenset({".md", ".json", ".jsonl", ".yaml", ".yml", ".toml", ".npz"})
IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini"})
REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")  # kohya: `10_sks dog` → 10 repeats, class token `sks dog`
ROOT_FOLDER = "."
SHOWN_REASONS = 5  # how many reject reasons the stop message quotes


@section
class Params:
    """The `ingest` section of params.yaml.

    Attributes:
        source: folder of source images, relative to the project root.
        max_reject_ratio: stop the run when rejected files / all image files exceeds this.
        background: `#rrggbb` colour that transparent pixels are flattened onto.
        dedupe: drop exact duplicates (same decoded pixels and size), keeping the first by path.
    """

    source: str = Field("data/demo", min_length=1)
    max_reject_ratio: float = Field(0.2, ge=0, le=1)
    background: str = Field("#ffffff", pattern=r"^#[0-9a-fA-F]{6}$")
    dedupe: bool = True


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
    """

    source: SourceImage
    png: Path
    width: int
    height: int
    pixel_hash: str
    caption: str | None
    reused: bool


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


def image_key(source_hash: str, background: str) -> str:
    """Item-store key of one normalised image.

    Args:
        source_hash: `hash_file` of the source file.
        background: the `#rrggbb` flatten colour (lower-case).
    """
    # Pillow's version is an ingredient: a new decoder may produce different pixels.
    return item_key(KIND, VERSION, source=source_hash, background=background, decoder=f"pillow-{PIL.__version__}")


def _stored(store: ItemStore, key: str) -> tuple[Path, dict[str, Any]] | None:
    # The JSON entry is written after the PNG: both present and readable means complete.
    png, meta_path = store.get(KIND, key, ".png"), store.get(KIND, key, ".json")
    if png is None or meta_path is None:
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        return png, {k: meta[k] for k in ("width", "height", "pixel_hash")}
    except (ValueError, KeyError, TypeError):
        return None  # unreadable entry: recompute and overwrite it


def ingest_one(src: SourceImage, store: ItemStore, background: str) -> Ingested:
    """Normalise one source file through the item store.

    Args:
        src: the file to ingest.
        store: the item store.
        background: the `#rrggbb` flatten colour (lower-case).

    Raises:
        ImageRejected: the file (or its caption) cannot be used; the reason says why.
    """
    caption = read_caption(src.caption_file) if src.caption_file else None
    key = image_key(hash_file(src.path), background)
    hit = _stored(store, key)
    if hit is None:
        img = decode_image(src.path, parse_color(background))
        meta = {"width": img.width, "height": img.height, "pixel_hash": pixel_hash(img)}
        png = store.put(KIND, key, ".png", lambda p: save_png(img, p))
        store.put_bytes(KIND, key, ".json", json.dumps(meta).encode())
    else:
        png, meta = hit
    return Ingested(src, png, meta["width"], meta["height"], meta["pixel_hash"], caption, reused=hit is not None)


def split_duplicates(items: list[Ingested], dedupe: bool) -> tuple[list[Ingested], list[dict[str, str]]]:
    """Keep the first image (by source path) of each pixel hash; the others are duplicates.

    Args:
        items: ingested images, sorted by source path.
        dedupe: when False, everything is kept and no duplicates are reported.

    Returns:
        (kept images, one {"source", "kept"} record per dropped duplicate)
    """
    if not dedupe:
        return list(items), []
    first: dict[str, Ingested] = {}
    dropped = []
    for item in items:
        if item.pixel_hash in first:
            dropped.append({"source": item.source.rel, "kept": first[item.pixel_hash].source.rel})
        else:
            first[item.pixel_hash] = item
    return list(first.values()), dropped


def assign_ids(kept: list[Ingested]) -> list[str]:
    """Output id per kept image: the first 16 hex of its pixel hash, `-2`, `-3`... for repeats of
    the same pixels (only possible with `dedupe: false`), so every manifest line has its own file.

    Args:
        kept: the kept images, in manifest order.
    """
    seen: Counter[str] = Counter()
    owners: dict[str, str] = {}
    ids = []
    for item in kept:
        short = item.pixel_hash[:16]
        if owners.setdefault(short, item.pixel_hash) != item.pixel_hash:
            raise RuntimeError(f"pixel-hash prefix collision on {short}: {item.source.rel}")  # ~2^-64
        seen[short] += 1
        ids.append(short if seen[short] == 1 else f"{short}-{seen[short]}")
    return ids


def manifest_row(item: Ingested, image_id: str) -> dict[str, Any]:
    """One manifest.jsonl line (see the module docstring for the layout).

    Args:
        item: the kept image.
        image_id: its output id.
    """
    src = item.source
    return {
        "id": image_id,
        "file": f"images/{image_id}.png",
        "source": src.rel,
        "width": item.width,
        "height": item.height,
        "repeats": src.repeats,
        "class_token": src.class_token,
        "caption": item.caption,
        "caption_source": "sidecar" if item.caption is not None else None,
        "pixel_hash": item.pixel_hash,
    }


def check_reject_ratio(
    source: Path, rejects: list[dict[str, str]], total: int, limit: float, rejects_file: Path
) -> float:
    """The share of rejected files; raises when it exceeds `ingest.max_reject_ratio`.

    Args:
        source: the source folder (named in the error).
        rejects: {"source", "reason"} per rejected file.
        total: number of files tried as images.
        limit: `ingest.max_reject_ratio`.
        rejects_file: where the full list was written (named in the error).
    """
    if total == 0:
        raise ValueError(f"`ingest.source` {source} holds no image files")
    ratio = len(rejects) / total
    if ratio > limit:
        shown = "; ".join(f"{r['source']}: {r['reason']}" for r in rejects[:SHOWN_REASONS])
        more = f" (and {len(rejects) - SHOWN_REASONS} more)" if len(rejects) > SHOWN_REASONS else ""
        raise ValueError(
            f"{source}: {len(rejects)} of {total} files rejected (ratio {ratio:.3f}), more than "
            f"`ingest.max_reject_ratio` = {limit}. First reasons: {shown}{more}. All rejects: {rejects_file}"
        )
    return ratio


def run(params: Params, inputs: Paths, outputs: Paths, env: StageEnv) -> dict[str, Any]:
    """Ingest `inputs.source` into `outputs.images`; returns the stage summary.

    Args:
        params: the `ingest` section.
        inputs: `source`, the folder of source images.
        outputs: `images`, an empty folder to fill.
        env: item store, progress and publishing.
    """
    source, out = Path(inputs.source), Path(outputs.images)
    if not source.is_dir():
        state = "a file" if source.exists() else "missing"
        raise ValueError(f"`ingest.source` must be a folder, got {source} ({state})")
    background = params.background.lower()
    scan = scan_source(source)

    ingested: list[Ingested] = []
    rejects: list[dict[str, str]] = []
    # `disable` only when told to: passing disable=False would override the TQDM_DISABLE variable.
    for src in env.bar(scan.images, desc="ingest", unit="img"):
        try:
            ingested.append(ingest_one(src, env.store, background))
        except ImageRejected as e:
            rejects.append({"source": src.rel, "reason": e.reason})
    kept, duplicates = split_duplicates(ingested, params.dedupe)

    # The lists go to disk and the UI before the ratio check, so a stopped run still explains itself.
    write_jsonl(out / "rejects.jsonl", rejects)
    write_jsonl(out / "duplicates.jsonl", duplicates)
    if rejects:
        env.publish.table("ingest-rejects", rejects, f"{len(rejects)} file(s) of {source.name} rejected")
    ratio = check_reject_ratio(source, rejects, len(scan.images), params.max_reject_ratio, out / "rejects.jsonl")

    rows = []
    for item, image_id in zip(kept, assign_ids(kept)):
        materialize(item.png, out / "images" / f"{image_id}.png")
        rows.append(manifest_row(item, image_id))
    write_jsonl(out / "manifest.jsonl", rows)
    return _summary(scan, ingested, kept, rejects, duplicates, ratio)


def _summary(
    scan: SourceScan,
    ingested: list[Ingested],
    kept: list[Ingested],
    rejects: list[dict[str, str]],
    duplicates: list[dict[str, str]],
    ratio: float,
) -> dict[str, Any]:
    reused = sum(i.reused for i in ingested)
    folders = {
        name: {**info, "images": sum(k.source.folder == name for k in kept)} for name, info in scan.folders.items()
    }
    return {
        "items": len(scan.images),  # files tried as images = computed + reused
        "computed": len(scan.images) - reused,  # decoded this run (rejects included: they are never cached)
        "reused": reused,
        "kept": len(kept),
        "rejects": len(rejects),
        "reject_ratio": round(ratio, 4),
        "duplicates": len(duplicates),
        "captions": sum(k.caption is not None for k in kept),
        "samples_per_epoch": sum(k.source.repeats for k in kept),  # images × repeats
        "folders": folders,
        "rejected": rejects,
        "duplicates_dropped": duplicates,
        "ignored": scan.ignored,
        "orphan_captions": scan.orphan_captions,
    }
