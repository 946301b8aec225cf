"""Stage `ingest`: decode, normalise and de-duplicate the source images; reject bad files with reasons.

Reads the user's folder (kohya layout: `N_name/` subfolders give N repeats and class token
`name`; `<stem>.txt` / `<stem>.caption` beside an image is its caption) and writes:

    <images>/images/<id>.png   every kept image as 8-bit RGB PNG; id = first 16 hex of its pixel hash
    <images>/manifest.jsonl    one line per kept image, sorted by source path
    <images>/rejects.jsonl     {"source", "reason"} per file that could not be used
    <images>/duplicates.jsonl  {"source", "tile", "kept", "kept_tile", "distance"} per exact (distance 0)
                               or near duplicate (dHash within `dataset.near_duplicate_distance`) dropped
    <images>/dropped.jsonl     {"source", "tile", "reason"} per image or sector dropped by a quality
                               gate: blurred / over-exposed tile sectors, `dataset.min_sharpness`, DSB

Output names never come from user file names, so no name can escape the output folder.

Dataset craft (the `dataset` section, `loraforge.dataset`), in this order, on final pixels:
1. `ingest.clean_adversarial` (003 guide): a light resample + median pass per image; PSNR reported.
2. `dataset.tile` (000 guide's precision method): chosen images become rows × cols sectors; sectors
   with blur or clipped exposure are dropped with the reason.
3. Quality gates: short side below the model's native side is flagged (upscale enlarges it),
   near-duplicates by dHash (the larger kept), blur score (dropped below `dataset.min_sharpness`).
4. DSB (000 guide): white share per image, the dataset's balance, the fewest images to drop to get
   inside `dsb_target ± dsb_tolerance`; dropped only with `dataset.dsb_enforce`. Measured here,
   before upscale: Lanczos enlarging keeps the tone histogram, and dropping must precede latents.
Cleaned images, sectors and per-image metrics are item-store entries keyed by their input pixels
and settings, so a rerun measures nothing twice.

Caching: each source file's normalised PNG is an item-store entry keyed by the file's bytes, the
background colour, the Pillow version and the kind's version (`loraforge.store.KINDS`), with a small JSON entry beside it holding
width, height and pixel hash (written after the PNG, so it also marks the pair complete). A rerun
over unchanged files only hashes them. Rejected files are not cached: they are few, and a
transient read error must not stick.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import PIL
from PIL import Image

from loraforge import dataset as craft
from loraforge.fingerprint import hash_file, iter_files
from loraforge.images import ImageRejected, decode_image, parse_color, pixel_hash, save_png, write_jsonl
from loraforge.params import DatasetParams, ModelParams
from loraforge.runner import Paths, StageEnv
from loraforge.store import Item, ItemStore, materialize
from stages.ingest_params import Params

log = logging.getLogger(__name__)

KIND = "ingested-image"
CAPTION_SUFFIXES = (".txt", ".caption")  # in order of precedence when both exist
# Notes and tool files that live beside datasets; listed under `ignored` in the report, not rejected.
IGNORED_SUFFIXES = frozenset({".md", ".json", ".jsonl", ".yaml", ".yml", ".toml", ".npz"})
IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini"})
REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")  # kohya: `10_sks dog` → 10 repeats, class token `sks dog`
ROOT_FOLDER = "."
SHOWN_REASONS = 5  # how many reject reasons the stop message quotes


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


def image_item(store: ItemStore, source_hash: str, background: str) -> Item:
    """Item-store entry of one normalised image.

    Args:
        store: the item store.
        source_hash: `hash_file` of the source file.
        background: the `#rrggbb` flatten colour (lower-case).
    """
    # Pillow's version is an ingredient: a new decoder may produce different pixels.
    return store.item(KIND, source=source_hash, background=background, decoder=f"pillow-{PIL.__version__}")


def _stored(entry: Item) -> tuple[Path, dict[str, Any]] | None:
    # The JSON entry is written after the PNG: both present and readable means complete.
    png, meta_path = entry.get(".png"), entry.get(".json")
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
    entry = image_item(store, hash_file(src.path), background)
    hit = _stored(entry)
    if hit is None:
        img = decode_image(src.path, parse_color(background))
        meta = {"width": img.width, "height": img.height, "pixel_hash": pixel_hash(img)}
        png = entry.put(".png", lambda p: save_png(img, p))
        entry.put_bytes(".json", json.dumps(meta).encode())
    else:
        png, meta = hit
    return Ingested(src, png, meta["width"], meta["height"], meta["pixel_hash"], caption, reused=hit is not None)


CLEAN_SCALE, CLEAN_MEDIAN = 0.5, 3  # `clean_adversarial`'s resample factor and median size (003 guide)


def _derived(entry: Item, make: Callable[[], tuple[Image.Image, dict[str, Any]]]) -> tuple[Path, dict[str, Any], bool]:
    """A derived image (cleaned, sector) through the item store: (png, meta, reused).

    Args:
        entry: its store entry (keyed by the input pixel hash and the settings).
        make: builds (image, extra meta) when the entry is missing; width, height and pixel hash
            are added to the meta here.
    """
    png, meta_path = entry.get(".png"), entry.get(".json")
    if png is not None and meta_path is not None:
        try:
            return png, json.loads(meta_path.read_text(encoding="utf-8")), True
        except ValueError:
            pass  # unreadable entry: recompute and overwrite it
    img, extra = make()
    meta = {"width": img.width, "height": img.height, "pixel_hash": pixel_hash(img), **extra}
    png = entry.put(".png", lambda p: save_png(img, p))
    entry.put_bytes(".json", json.dumps(meta).encode())  # after the PNG: marks the pair complete
    return png, meta, False


def clean_one(item: Ingested, store: ItemStore) -> tuple[Ingested, float]:
    """The anti-AI-filter cleanup of one image (cached): the cleaned item and its PSNR (dB) vs the original.

    Args:
        item: the ingested image.
        store: the item store.
    """

    def make() -> tuple[Image.Image, dict[str, Any]]:
        with Image.open(item.png) as opened:
            original = opened.convert("RGB")
        cleaned = craft.clean_adversarial(original, CLEAN_SCALE, CLEAN_MEDIAN)
        return cleaned, {"psnr": craft.psnr(original, cleaned)}

    entry = store.item("cleaned-image", image=item.pixel_hash, scale=CLEAN_SCALE, median=CLEAN_MEDIAN)
    png, meta, reused = _derived(entry, make)
    cleaned = dataclasses.replace(
        item,
        png=png,
        width=meta["width"],
        height=meta["height"],
        pixel_hash=meta["pixel_hash"],
        reused=item.reused and reused,
    )
    return cleaned, meta["psnr"]


def tile_spec_for(rel: str, specs: tuple[Any, ...]) -> Any | None:
    """The first `dataset.tile` entry whose `source` (path or glob) matches `rel`, else None.

    Args:
        rel: the image's path relative to the source folder.
        specs: `dataset.tile`.
    """
    return next((t for t in specs if t.source == rel or fnmatch.fnmatchcase(rel, t.source)), None)


def tile_one(item: Ingested, rows: int, cols: int, store: ItemStore) -> list[Ingested]:
    """The rows × cols sectors of one image, each a cached item (tile `r<row>c<col>`, 1-based).

    Args:
        item: the image to cut.
        rows: sectors down.
        cols: sectors across.
        store: the item store.
    """
    boxes = craft.tile_boxes(item.width, item.height, rows, cols)
    source: list[Image.Image] = []  # opened once, only if a sector is missing from the store

    def sector(box: tuple[int, int, int, int]) -> Callable[[], tuple[Image.Image, dict[str, Any]]]:
        def make() -> tuple[Image.Image, dict[str, Any]]:
            if not source:
                with Image.open(item.png) as opened:
                    source.append(opened.convert("RGB"))
            return source[0].crop(box), {"box": list(box)}

        return make

    sectors = []
    for index, box in enumerate(boxes):
        entry = store.item("tile-sector", image=item.pixel_hash, rows=rows, cols=cols, index=index)
        png, meta, reused = _derived(entry, sector(box))
        name = f"r{index // cols + 1}c{index % cols + 1}"
        sectors.append(
            dataclasses.replace(
                item,
                png=png,
                width=meta["width"],
                height=meta["height"],
                pixel_hash=meta["pixel_hash"],
                reused=item.reused and reused,
                tile=name,
            )
        )
    return sectors


def image_metrics(item: Ingested, store: ItemStore) -> dict[str, Any]:
    """White share (DSB), sharpness, clipped share and dHash of one image, cached by its pixels.

    Args:
        item: the image.
        store: the item store.
    """
    entry = store.item("image-metrics", image=item.pixel_hash)
    path = entry.get(".json")
    if path is not None:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            pass
    with Image.open(item.png) as opened:
        img = opened.convert("RGB")
    metrics = {
        "white": craft.dsb_white_share(img),
        "sharpness": craft.laplacian_variance(img) if min(img.size) >= 3 else 0.0,
        "clipped": craft.clipped_share(img),
        "dhash": f"{craft.dhash(img):016x}",
    }
    entry.put_bytes(".json", json.dumps(metrics).encode())
    return metrics


def native_resolution(model: ModelParams, state_dir: Path) -> int:
    """The model's native resolution (resolving it is cheap: upscale resolves it next anyway)."""
    from loraforge.models import resolve_model

    return resolve_model(model, state_dir).native_resolution


def _where(item: Ingested) -> dict[str, Any]:
    return {"source": item.source.rel, "tile": item.tile}


def apply_tiling(
    items: list[Ingested], ds: DatasetParams, store: ItemStore
) -> tuple[list[Ingested], list[dict[str, Any]], list[dict[str, Any]]]:
    """Replace the images `dataset.tile` names by their kept sectors.

    Args:
        items: the images so far, in manifest order.
        ds: the `dataset` section.
        store: the item store.

    Returns:
        (items with sectors in place of tiled images, per tiled image {source, rows, cols, kept,
        dropped}, {source, tile, reason} per dropped sector)

    Raises:
        ValueError: a `dataset.tile` entry matches no image, or asks for more sectors than pixels.
    """
    for i, spec in enumerate(ds.tile):
        if not any(tile_spec_for(it.source.rel, (spec,)) for it in items):
            raise ValueError(f"`dataset.tile[{i}].source` = {spec.source!r} matches no ingested image")
    out, tiled, dropped = [], [], []
    for item in items:
        spec = tile_spec_for(item.source.rel, ds.tile)
        if spec is None:
            out.append(item)
            continue
        try:
            sectors = tile_one(item, spec.rows, spec.cols, store)
        except ValueError as e:
            raise ValueError(f"`dataset.tile` on {item.source.rel}: {e}") from None
        kept = 0
        for sector in sectors:
            m = image_metrics(sector, store)
            reason = craft.sector_drop_reason(m["sharpness"], m["clipped"], ds.tile_min_sharpness, ds.tile_max_clipped)
            if reason:
                dropped.append({**_where(sector), "reason": reason})
            else:
                out.append(sector)
                kept += 1
        tiled.append(
            {
                "source": item.source.rel,
                "rows": spec.rows,
                "cols": spec.cols,
                "kept": kept,
                "dropped": len(sectors) - kept,
            }
        )
    return out, tiled, dropped


def quality_gates(
    items: list[Ingested], metrics: list[dict[str, Any]], ds: DatasetParams, min_side: int
) -> tuple[list[int], list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Minimum resolution (flag), near-duplicates and blur (drop) over the images so far.

    Args:
        items: the images, in manifest order.
        metrics: `image_metrics` per image.
        ds: the `dataset` section.
        min_side: the short side below which an image is flagged for upscaling.

    Returns:
        (indices kept, low-resolution flags {source, tile, width, height} of kept images, near-duplicate records,
        blur drops {source, tile, reason})
    """
    hashes = [int(m["dhash"], 16) for m in metrics]
    near = craft.near_duplicates(hashes, [it.width * it.height for it in items], ds.near_duplicate_distance)
    duplicates = [
        {
            **_where(items[i]),
            "kept": items[k].source.rel,
            "kept_tile": items[k].tile,
            "distance": craft.hamming(hashes[i], hashes[k]),
        }
        for i, k in sorted(near.items())
    ]
    blurred = {
        i: f"blur: Laplacian variance {metrics[i]['sharpness']:.1f} < `dataset.min_sharpness` {ds.min_sharpness}"
        for i, it in enumerate(items)
        if i not in near and it.tile is None and metrics[i]["sharpness"] < ds.min_sharpness
    }
    drops = [{**_where(items[i]), "reason": r} for i, r in blurred.items()]
    kept = [i for i in range(len(items)) if i not in near and i not in blurred]
    # Flag only what is kept: upscale enlarges those; a dropped image needs no warning.
    low = [
        {**_where(items[i]), "width": items[i].width, "height": items[i].height}
        for i in kept
        if min(items[i].width, items[i].height) < min_side
    ]
    return kept, low, duplicates, drops


def balance(items: list[Ingested], whites: list[float], ds: DatasetParams) -> tuple[dict[str, Any], list[int]]:
    """The DSB report and the indices to drop for it (empty unless `dataset.dsb_enforce`).

    Args:
        items: the kept images.
        whites: their white shares.
        ds: the `dataset` section.
    """
    now = craft.dataset_dsb(whites)
    inside = craft.dsb_inside(now.dominant, ds.dsb_target, ds.dsb_tolerance)
    removal = [] if inside else craft.fewest_removals(whites, ds.dsb_target, ds.dsb_tolerance)
    report: dict[str, Any] = {
        "white": round(now.white, 4),
        "black": round(now.black, 4),
        "dominant": round(now.dominant, 4),
        "side": now.side,
        "target": ds.dsb_target,
        "tolerance": ds.dsb_tolerance,
        "inside": inside,
        "enforced": ds.dsb_enforce,
        "suggested_removals": None if removal is None else [_where(items[i]) for i in removal],
    }
    if removal:
        after = craft.dataset_dsb([w for i, w in enumerate(whites) if i not in removal])
        report["after_removals"] = {
            "white": round(after.white, 4),
            "black": round(after.black, 4),
            "dominant": round(after.dominant, 4),
            "side": after.side,
        }
    if removal is None:
        log.warning(
            "DSB %.1f%% %s: no removal brings it inside %.0f%% ± %.0f%%",
            100 * now.dominant,
            now.side,
            100 * ds.dsb_target,
            100 * ds.dsb_tolerance,
        )
    return report, (removal or []) if ds.dsb_enforce else []


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
        "tile": item.tile,
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
        params: the `ingest` section (with the shared `dataset` and `model` sections).
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
    if rejects:
        env.publish.table("ingest-rejects", rejects, f"{len(rejects)} file(s) of {source.name} rejected")
    ratio = check_reject_ratio(source, rejects, len(scan.images), params.max_reject_ratio, out / "rejects.jsonl")

    craft_report, kept, dropped, near = dataset_craft(kept, params, env)
    duplicates = [
        {"source": d["source"], "tile": None, "kept": d["kept"], "kept_tile": None, "distance": 0} for d in duplicates
    ] + near
    write_jsonl(out / "duplicates.jsonl", duplicates)
    write_jsonl(out / "dropped.jsonl", dropped)

    rows = []
    for item, image_id in zip(kept, assign_ids(kept)):
        materialize(item.png, out / "images" / f"{image_id}.png")
        rows.append(manifest_row(item, image_id))
    write_jsonl(out / "manifest.jsonl", rows)
    return {**_summary(scan, ingested, kept, rejects, duplicates, ratio), "dropped": dropped, **craft_report}


def dataset_craft(
    items: list[Ingested], params: Params, env: StageEnv
) -> tuple[dict[str, Any], list[Ingested], list[dict[str, Any]], list[dict[str, Any]]]:
    """Cleanup, tiling, quality gates and DSB over the de-duplicated images (see the module docstring).

    Args:
        items: the exact-de-duplicated images, in manifest order.
        params: the `ingest` section.
        env: item store and publishing.

    Returns:
        (report sections, images kept, {source, tile, reason} per dropped image, near-duplicate records)
    """
    ds, store = params.dataset, env.store
    cleanup = []
    if params.clean_adversarial:
        cleaned = [clean_one(item, store) for item in env.bar(items, desc="clean", unit="img")]
        items = [c for c, _ in cleaned]
        cleanup = [{"source": c.source.rel, "psnr_db": round(p, 2)} for c, p in cleaned]
    items, tiled, dropped = apply_tiling(items, ds, store)
    metrics = [image_metrics(item, store) for item in env.bar(items, desc="measure", unit="img")]
    min_side = ds.min_side or native_resolution(params.model, env.state_dir)
    kept_ix, low, near, blurred = quality_gates(items, metrics, ds, min_side)
    dropped += blurred
    items, metrics = [items[i] for i in kept_ix], [metrics[i] for i in kept_ix]
    if not items:
        raise ValueError(f"no image left after the `dataset` gates; see {[d['reason'] for d in dropped][:5]}")
    for row in low:
        log.warning(
            "%s is %dx%d: short side below %d; upscale will enlarge it",
            row["source"],
            row["width"],
            row["height"],
            min_side,
        )

    dsb, drop_ix = balance(items, [m["white"] for m in metrics], ds)
    dropped += [
        {
            **_where(items[i]),
            "reason": f"DSB: dropped to bring {dsb['dominant']:.1%} {dsb['side']} inside `dataset.dsb_target` ± `dataset.dsb_tolerance`",
        }
        for i in drop_ix
    ]
    per_image = [
        {
            **_where(it),
            "white": round(m["white"], 4),
            "black": round(1 - m["white"], 4),
            "sharpness": round(m["sharpness"], 2),
            "clipped": round(m["clipped"], 4),
        }
        for it, m in zip(items, metrics)
    ]
    env.publish.table("dsb", per_image, f"DSB {dsb['white']:.0%}W | {dsb['black']:.0%}B (inside: {dsb['inside']})")
    drop = set(drop_ix)
    keep = [it for i, it in enumerate(items) if i not in drop]
    report = {
        "dsb": {**dsb, "images": per_image},
        "quality": {"min_side": min_side, "low_resolution": low, "near_duplicates": len(near), "blurred": len(blurred)},
        "tiling": tiled,
        "cleanup": cleanup,
    }
    return report, keep, dropped, near


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
        "kept": len(kept),  # images written (precision-tiling sectors count one each)
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
