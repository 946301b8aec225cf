"""Duplicate images: exact copies first (same decoded pixels), then the records settled after the
near-duplicate and quality gates, so every record names an image that was finally kept."""

from __future__ import annotations

from typing import Any

from loraforge.data.sources import Ingested


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


def settle_duplicates(
    records: list[dict[str, Any]], kept: list[Ingested], dropped: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Point every duplicate record at an image that was finally kept.

    Exact duplicates are found first, near duplicates and the quality gates after, so the image a
    record names as `kept` may itself have been dropped later (as a near duplicate of a larger
    copy, as blurred, by the DSB). Each record follows its chain to the end: a kept image (its
    `distance` is then the sum along the chain: exact 0 + near d), or a dropped one, in which case
    the duplicate goes to the drops with that reason instead.

    Args:
        records: `{source, tile, kept, kept_tile, distance}` per duplicate, exact and near.
        kept: the images finally kept.
        dropped: `{source, tile, reason}` per image dropped by a gate.

    Returns:
        (records that all name a kept image, drop records for duplicates of dropped images)
    """
    finally_kept = {(k.source.rel, k.tile) for k in kept}
    pointer = {(r["source"], r["tile"]): ((r["kept"], r["kept_tile"]), r["distance"]) for r in records}
    reasons = {(d["source"], d["tile"]): d["reason"] for d in dropped}
    settled, orphaned = [], []
    for record in records:
        (target, distance), seen = pointer[(record["source"], record["tile"])], set()
        while target in pointer and target not in seen:
            seen.add(target)
            target, step = pointer[target]
            distance += step
        if target in finally_kept:
            settled.append({**record, "kept": target[0], "kept_tile": target[1], "distance": distance})
        else:
            why = reasons.get(target, "dropped")
            orphaned.append({**location_of(record), "reason": f"duplicate of {target[0]}, which was dropped: {why}"})
    return settled, orphaned


def location_of(record: dict[str, Any]) -> dict[str, Any]:
    """`{"source", "tile"}` of a record."""
    return {"source": record["source"], "tile": record["tile"]}
