"""Dataset craft applied to ingested images through the item store (000 and 003 guides).

`loraforge.data.measures` holds the pure measurements; this module applies them to `Ingested` images,
in the order the ingest stage runs them, on final pixels:

1. anti-AI-filter cleanup (`clean_one`, 003 guide): a light resample + median pass; PSNR reported.
2. precision tiling (`apply_tiling`, 000 guide): chosen images become rows × cols sectors; sectors
   with blur or clipped exposure are dropped with the reason.
3. quality gates (`quality_gates`): short side below the model's native side is flagged,
   near-duplicates by dHash dropped (the larger kept), blurred images dropped.
4. DSB (`balance`, 000 guide): the dataset's balance and the fewest images to drop to get inside
   the target window.

Cleaned images, sectors and per-image metrics are item-store entries keyed by their input pixels
and settings, so a rerun measures nothing twice.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable

from PIL import Image

from loraforge.data import measures as dataset
from loraforge.errors import InputError
from loraforge.data.images import pixel_hash, save_png
from loraforge.pipeline.params import DatasetParams, TileParams
from loraforge.data.sources import Ingested
from loraforge.store.items import Item, ItemStore

log = logging.getLogger(__name__)

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
        cleaned = dataset.clean_adversarial(original, CLEAN_SCALE, CLEAN_MEDIAN)
        return cleaned, {"psnr": dataset.psnr(original, cleaned)}

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


def tile_spec_for(rel: str, specs: tuple[TileParams, ...]) -> TileParams | None:
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
    boxes = dataset.tile_boxes(item.width, item.height, rows, cols)
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
                **sector_mask(item, box, store),
            )
        )
    return sectors


def sector_mask(item: Ingested, box: tuple[int, int, int, int], store: ItemStore) -> dict[str, Any]:
    """A sector's `mask` and `mask_hash`: the same box cut from the image's mask (cached); `{}`
    for an image without a mask.

    Args:
        item: the image being cut.
        box: the sector's (left, top, right, bottom).
        store: the item store.
    """
    if item.mask is None:
        return {}
    cut: list[Image.Image] = []

    def make(tmp: Path) -> None:
        with Image.open(item.mask) as opened:
            cut.append(opened.convert("L").crop(box))
        save_png(cut[0], tmp)

    path, _ = store.cached("mask-sector", {"mask": item.mask_hash, "box": list(box)}, ".png", make)
    if not cut:
        with Image.open(path) as opened:
            cut.append(opened.convert("L"))
    return {"mask": path, "mask_hash": pixel_hash(cut[0])}


def metrics_entry(item: Ingested, store: ItemStore) -> Item:
    """The store entry of an image's measurements (keyed by its pixels)."""
    return store.item("image-metrics", image=item.pixel_hash)


def image_metrics(item: Ingested, store: ItemStore) -> dict[str, Any]:
    """White share (DSB), sharpness, clipped share and dHash of one image, cached by its pixels.

    Args:
        item: the image.
        store: the item store.
    """
    entry = metrics_entry(item, store)
    path = entry.get(".json")
    if path is not None:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            pass
    with Image.open(item.png) as opened:
        img = opened.convert("L")  # every measure works on grey levels: no 3-channel copy of a big image
    metrics = {
        "white": dataset.dsb_white_share(img),
        "sharpness": dataset.laplacian_variance(img) if min(img.size) >= 3 else 0.0,
        "clipped": dataset.clipped_share(img),
        "dhash": f"{dataset.dhash(img):016x}",
    }
    entry.put_bytes(".json", json.dumps(metrics).encode())
    return metrics


def location(item: Ingested) -> dict[str, Any]:
    """`{"source", "tile"}`: where an image came from, as every drop and duplicate record names it.

    Args:
        item: the image (or precision-tiling sector).
    """
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
            raise InputError(f"`dataset.tile[{i}].source` = {spec.source!r} matches no ingested image")
    out, tiled, dropped = [], [], []
    for item in items:
        spec = tile_spec_for(item.source.rel, ds.tile)
        if spec is None:
            out.append(item)
            continue
        try:
            sectors = tile_one(item, spec.rows, spec.cols, store)
        except ValueError as e:
            raise InputError(f"`dataset.tile` on {item.source.rel}: {e}") from None
        kept = 0
        for sector in sectors:
            m = image_metrics(sector, store)
            reason = dataset.sector_drop_reason(
                m["sharpness"], m["clipped"], ds.tile_min_sharpness, ds.tile_max_clipped
            )
            if reason:
                dropped.append({**location(sector), "reason": reason})
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
    near = dataset.near_duplicates(hashes, [it.width * it.height for it in items], ds.near_duplicate_distance)
    duplicates = [
        {
            **location(items[i]),
            "kept": items[k].source.rel,
            "kept_tile": items[k].tile,
            "distance": dataset.hamming(hashes[i], hashes[k]),
        }
        for i, k in sorted(near.items())
    ]
    blurred = {
        i: f"blur: Laplacian variance {metrics[i]['sharpness']:.1f} < `dataset.min_sharpness` {ds.min_sharpness}"
        for i, it in enumerate(items)
        if i not in near and it.tile is None and metrics[i]["sharpness"] < ds.min_sharpness
    }
    drops = [{**location(items[i]), "reason": r} for i, r in blurred.items()]
    kept = [i for i in range(len(items)) if i not in near and i not in blurred]
    # Flag only what is kept: upscale enlarges those; a dropped image needs no warning.
    low = [
        {**location(items[i]), "width": items[i].width, "height": items[i].height}
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
    now = dataset.dataset_dsb(whites)
    inside = dataset.dsb_inside(now.dominant, ds.dsb_target, ds.dsb_tolerance)
    removal = [] if inside else dataset.fewest_removals(whites, ds.dsb_target, ds.dsb_tolerance)
    report: dict[str, Any] = {
        "white": round(now.white, 4),
        "black": round(now.black, 4),
        "dominant": round(now.dominant, 4),
        "side": now.side,
        "target": ds.dsb_target,
        "tolerance": ds.dsb_tolerance,
        "inside": inside,
        "enforced": ds.dsb_enforce,
        "suggested_removals": None if removal is None else [location(items[i]) for i in removal],
    }
    if removal:
        after = dataset.dataset_dsb([w for i, w in enumerate(whites) if i not in removal])
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


def clean_all(items: Iterable[Ingested], store: ItemStore) -> tuple[list[Ingested], list[dict[str, Any]]]:
    """`clean_one` over the images: the cleaned images, and {source, psnr_db} per image for the report.

    Args:
        items: the images, in manifest order (an iterable, so a progress bar can wrap it).
        store: the item store.
    """
    cleaned = [clean_one(item, store) for item in items]
    return [c for c, _ in cleaned], [{"source": c.source.rel, "psnr_db": round(p, 2)} for c, p in cleaned]


def dsb_drops(items: list[Ingested], drop: list[int], dsb: dict[str, Any]) -> list[dict[str, Any]]:
    """{source, tile, reason} for each image `balance` dropped.

    Args:
        items: the images `balance` saw.
        drop: the indices it dropped.
        dsb: its report (`dominant`, `side`).
    """
    reason = (
        f"DSB: dropped to bring {dsb['dominant']:.1%} {dsb['side']} "
        "inside `dataset.dsb_target` ± `dataset.dsb_tolerance`"
    )
    return [{**location(items[i]), "reason": reason} for i in drop]


def dsb_table(items: list[Ingested], metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per image: where it came from, white and black shares, sharpness and clipped share (rounded).

    Args:
        items: the images.
        metrics: `image_metrics` per image.
    """
    return [
        {
            **location(it),
            "white": round(m["white"], 4),
            "black": round(1 - m["white"], 4),
            "sharpness": round(m["sharpness"], 2),
            "clipped": round(m["clipped"], 4),
        }
        for it, m in zip(items, metrics)
    ]
