"""Stage `ingest`: decode, normalise and de-duplicate the source images; reject bad files with reasons.

Reads the user's folder (kohya layout, `loraforge.data.sources`: `N_name/` subfolders give N repeats and
class token `name`; `<stem>.txt` / `<stem>.caption` beside an image is its caption) and writes:

    <images>/images/<id>.png   every kept image as 8-bit RGB PNG; id = first 16 hex of its pixel hash
    <images>/masks/<id>.png    its mask (8-bit "L", 255 = train) for the masked loss, when it has one:
                               the `<stem>-mask.png` beside it, else its alpha channel (kohya's
                               `alpha_mask`); its manifest row then has `mask`, `mask_hash`, `mask_source`
    <images>/manifest.jsonl    one line per kept image, sorted by source path
    <images>/rejects.jsonl     {"source", "reason"} per file that could not be used
    <images>/duplicates.jsonl  {"source", "tile", "kept", "kept_tile", "distance"} per exact (distance 0)
                               or near duplicate (dHash within `dataset.near_duplicate_distance`) dropped
    <images>/dropped.jsonl     {"source", "tile", "reason"} per image or sector dropped by a quality
                               gate: blurred / over-exposed tile sectors, `dataset.min_sharpness`, DSB

Output names never come from user file names, so no name can escape the output folder.

Dataset craft (the `dataset` section: `loraforge.data.craft` applies `loraforge.data.measures`'s measurements),
in this order, on final pixels:
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

Caching: each source file's normalised PNG is an item-store entry keyed by the file's bytes (and
its mask file's, when it has one), the background colour, the Pillow version and the kind's
version (`loraforge.store.items.KINDS`), with its mask (`.mask.png`) and a small JSON entry beside it
holding width, height, pixel hash and mask hash (written last, so it also marks the entry
complete). A rerun over unchanged files only hashes them. Rejected files are not cached: they
are few, and a transient read error must not stick.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any

import PIL

from loraforge.data.craft import (
    apply_tiling,
    balance,
    clean_all,
    dsb_drops,
    dsb_table,
    image_metrics,
    metrics_entry,
    quality_gates,
)
from loraforge.data.duplicates import settle_duplicates, split_duplicates
from loraforge.errors import InputError, MissingInput
from loraforge.store.fanout import chunked
from loraforge.store.fingerprint import hash_file
from loraforge.data.images import ImageRejected, decode_mask, decode_with_alpha, parse_color, pixel_hash, save_png
from loraforge.data.images import may_have_alpha, write_jsonl
from loraforge.models.loading import native_resolution
from loraforge.pipeline.runner import Paths, StageEnv
from loraforge.data.sources import Ingested, SourceImage, SourceScan, read_caption, scan_source
from loraforge.store.items import Item, ItemStore, materialize
from stages.ingest_params import Params

log = logging.getLogger(__name__)

KIND = "ingested-image"
SHOWN_REASONS = 5  # how many reject reasons the stop message quotes


def image_item(store: ItemStore, source_hash: str, background: str, mask_hash: str | None = None) -> Item:
    """Item-store entry of one normalised image.

    Args:
        store: the item store.
        source_hash: `hash_file` of the source file.
        background: the `#rrggbb` flatten colour (lower-case).
        mask_hash: `hash_file` of its mask file, None without one (the key it had before masks).
    """
    # Pillow's version is an ingredient: a new decoder may produce different pixels.
    mask = {"mask_file": mask_hash} if mask_hash else {}
    return store.item(KIND, source=source_hash, background=background, decoder=f"pillow-{PIL.__version__}", **mask)


def _stored(entry: Item, src: SourceImage) -> tuple[Path, dict[str, Any], Path | None] | None:
    """The entry's (png, meta, mask png) when complete, else None (recompute and overwrite it).

    Args:
        entry: the image's store entry.
        src: its source file (an entry made before masks is kept when the file has no transparency).
    """
    # The JSON entry is written last: present and readable (with its mask if it names one) means complete.
    png, meta_path = entry.get(".png"), entry.get(".json")
    if png is None or meta_path is None:
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        meta = {k: meta[k] for k in ("width", "height", "pixel_hash")} | {"mask_hash": meta.get("mask_hash", "?")}
    except (ValueError, KeyError, TypeError):
        return None  # unreadable entry: recompute and overwrite it
    if meta["mask_hash"] == "?":  # made before masks: still right for a file without transparency
        if src.mask_file or may_have_alpha(src.path):
            return None
        meta["mask_hash"] = None
    mask = entry.get(".mask.png") if meta["mask_hash"] else None
    return None if meta["mask_hash"] and mask is None else (png, meta, mask)


def ingest_one(src: SourceImage, store: ItemStore, background: str, max_pixels: int | None = None) -> Ingested:
    """Normalise one source file through the item store.

    Args:
        src: the file to ingest.
        store: the item store.
        background: the `#rrggbb` flatten colour (lower-case).
        max_pixels: `ingest.max_pixels`.

    Raises:
        ImageRejected: the file (or its caption) cannot be used; the reason says why.
    """
    caption = read_caption(src.caption_file) if src.caption_file else None
    entry = image_item(store, hash_file(src.path), background, hash_file(src.mask_file) if src.mask_file else None)
    hit = _stored(entry, src)
    if hit is None:
        img, mask = decode_with_alpha(src.path, parse_color(background), max_pixels)
        if src.mask_file:  # the mask file wins over the alpha channel
            mask = decode_mask(src.mask_file, img.size, max_pixels)
        meta = {"width": img.width, "height": img.height, "pixel_hash": pixel_hash(img)}
        meta["mask_hash"] = pixel_hash(mask) if mask is not None else None
        png = entry.put(".png", lambda p: save_png(img, p))
        mask_png = entry.put(".mask.png", lambda p: save_png(mask, p)) if mask is not None else None
        entry.put_bytes(".json", json.dumps(meta).encode())
    else:
        png, meta, mask_png = hit
    return Ingested(src, png, meta["width"], meta["height"], meta["pixel_hash"], caption, reused=hit is not None,
                    mask=mask_png, mask_hash=meta["mask_hash"])  # fmt: skip


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
        **mask_fields(item, image_id),
    }


def mask_fields(item: Ingested, image_id: str) -> dict[str, Any]:
    """The manifest fields of an image's mask: `mask` (its file), `mask_hash`, `mask_source` (the
    mask file's source path, or `alpha`); none for an image without a mask (rows as before masks).

    Args:
        item: the kept image.
        image_id: its output id.
    """
    if item.mask is None:
        return {}
    mask_file = item.source.mask_file
    source = (PurePosixPath(item.source.rel).parent / mask_file.name).as_posix() if mask_file else "alpha"
    return {"mask": f"masks/{image_id}.png", "mask_hash": item.mask_hash, "mask_source": source}


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
        raise InputError(f"`ingest.source` {source} holds no image files")
    ratio = len(rejects) / total
    if ratio > limit:
        shown = "; ".join(f"{r['source']}: {r['reason']}" for r in rejects[:SHOWN_REASONS])
        more = f" (and {len(rejects) - SHOWN_REASONS} more)" if len(rejects) > SHOWN_REASONS else ""
        raise InputError(
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
        if source.exists():
            raise InputError(f"`ingest.source` must be a folder, got the file {source}")
        raise MissingInput(f"`ingest.source` folder {source} does not exist")
    background = params.background.lower()
    scan = scan_source(source, params.follow_symlinks)

    ingested: list[Ingested] = []
    rejects: list[dict[str, str]] = list(scan.rejected)  # symlinks out of the folder, broken links...
    for src in env.bar(scan.images, desc="ingest", unit="img"):
        try:
            ingested.append(ingest_one(src, env.store, background, params.max_pixels))
        except ImageRejected as e:
            rejects.append({"source": src.rel, "reason": e.reason})
    rejects.sort(key=lambda r: r["source"])
    kept, duplicates = split_duplicates(ingested, params.dedupe)

    # The lists go to disk and the UI before the ratio check, so a stopped run still explains itself.
    write_jsonl(out / "rejects.jsonl", rejects)
    if rejects:
        env.publish.table("ingest-rejects", rejects, f"{len(rejects)} file(s) of {source.name} rejected")
    tried = len(scan.images) + len(scan.rejected)
    ratio = check_reject_ratio(source, rejects, tried, params.max_reject_ratio, out / "rejects.jsonl")

    craft_report, kept, dropped, near = dataset_craft(kept, params, env)
    exact = [
        {"source": d["source"], "tile": None, "kept": d["kept"], "kept_tile": None, "distance": 0} for d in duplicates
    ]
    duplicates, orphaned = settle_duplicates(exact + near, kept, dropped)
    dropped += orphaned
    write_jsonl(out / "duplicates.jsonl", duplicates)
    write_jsonl(out / "dropped.jsonl", dropped)

    rows = []
    for item, image_id in zip(kept, assign_ids(kept)):
        materialize(item.png, out / "images" / f"{image_id}.png")
        if item.mask is not None:
            materialize(item.mask, out / "masks" / f"{image_id}.png")
        rows.append(manifest_row(item, image_id))
    write_jsonl(out / "manifest.jsonl", rows)
    return {**_summary(scan, ingested, kept, rejects, duplicates, ratio), "dropped": dropped, **craft_report}


def measure(items: list[Ingested], env: StageEnv) -> list[dict[str, Any]]:
    """`image_metrics` of every image: the ones the store lacks in chunks through the fan-out."""
    missing = [item for item in items if not metrics_entry(item, env.store).get(".json")]
    bar = env.tracker(len(missing), "measuring images")
    env.fan_out.map(measure_chunk, env.store, chunked(missing, env.fan_out.chunk_size), bar)
    bar.close()
    return [image_metrics(item, env.store) for item in items]  # all cached now: read back


def measure_chunk(store: ItemStore, items: list[Ingested]) -> int:
    """Measure each image into the store (runs wherever the fan-out puts it)."""
    for item in items:
        image_metrics(item, store)
    return len(items)


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
        items, cleanup = clean_all(env.bar(items, desc="clean", unit="img"), store)
    items, tiled, dropped = apply_tiling(items, ds, store)
    metrics = measure(items, env)
    min_side = ds.min_side or native_resolution(params.model, env.state_dir)
    kept_ix, low, near, blurred = quality_gates(items, metrics, ds, min_side)
    dropped += blurred
    items, metrics = [items[i] for i in kept_ix], [metrics[i] for i in kept_ix]
    if not items:
        raise InputError(f"no image left after the `dataset` gates; see {[d['reason'] for d in dropped][:5]}")
    for row in low:
        log.warning(
            "%s is %dx%d: short side below %d; upscale will enlarge it",
            row["source"],
            row["width"],
            row["height"],
            min_side,
        )

    dsb, drop_ix = balance(items, [m["white"] for m in metrics], ds)
    dropped += dsb_drops(items, drop_ix, dsb)
    per_image = dsb_table(items, metrics)
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
        "masks": sum(k.mask is not None for k in kept),
        "samples_per_epoch": sum(k.source.repeats for k in kept),  # images × repeats
        "folders": folders,
        "rejected": rejects,
        "duplicates_dropped": duplicates,
        "ignored": scan.ignored,
        "orphan_captions": scan.orphan_captions,
        "orphan_masks": scan.orphan_masks,
    }
