"""latents: aspect-ratio buckets, resize-and-crop, VAE-encode every image once.

Each image goes to the bucket (width, height multiple of `bucket_step`, area ≤ resolution²) whose
aspect ratio is closest to its own; it is resized to cover the bucket and centre-cropped. The VAE
posterior mean is stored per image in the item store with the original size and crop box (SDXL's
micro-conditioning needs them). Key: image pixels + bucket/crop/flip + VAE weight hash + format
version, so a changed image re-encodes alone and a changed VAE re-encodes all. Captions are not an
input of this stage: changing the trigger never re-encodes a latent.

`latents.vae_check` (003 guide) decodes every cached latent again and measures what the VAE loses:
PSNR per image, and the worst window of the worst images saved side by side (original |
reconstruction | error) into `reports/vae_check/`, shown on the evaluation page. Results are cached
per latent, so only new or changed images are decoded.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loraforge.buckets import Bucket, BucketGrid
from loraforge.images import read_jsonl, resize_cover_crop, write_jsonl
from loraforge.models import component_hash, load_vae, resolve_device, resolve_model
from loraforge.store import materialize
from loraforge.vae import encode_batch
from loraforge.vaecheck import check as vae_check_image
from loraforge.vaecheck import decode_latent
from stages.latents_params import Params

if TYPE_CHECKING:
    from loraforge.runner import Paths, StageEnv
    from loraforge.store import ItemStore

LATENT = ".safetensors"


def plan_items(
    rows: list[dict[str, Any]], params: Params, grid: BucketGrid, vae_hash: str, store: "ItemStore"
) -> list[dict[str, Any]]:
    """One work item per image (and per flipped copy): its bucket and store entry (`item`, `key`)."""
    items = []
    for row in rows:
        bucket = grid.select(row["width"], row["height"])
        for flip in (False, True) if params.flip else (False,):
            entry = store.item(
                "latent", image=row["pixel_hash"], bucket=bucket, flip=flip, vae=vae_hash, dtype=params.vae_dtype
            )
            items.append({"row": row, "bucket": bucket, "flip": flip, "item": entry, "key": entry.key})
    return items


def run(params: Params, inputs: "Paths", outputs: "Paths", env: "StageEnv") -> dict[str, Any]:
    """Encode missing latents into the store; materialise all of them into `outputs.latents`
    (with the bucket grid, `buckets.json`); with `vae_check`, measure the reconstructions into
    `outputs.vae_check`."""
    info = resolve_model(params.model, env.state_dir)
    resolution = params.resolution or info.native_resolution
    grid = BucketGrid.resolve(resolution, params.bucket_step, params.min_bucket, params.max_bucket)
    rows = read_jsonl(inputs.images / "manifest.jsonl")
    items = plan_items(rows, params, grid, component_hash(info, "vae", env.state_dir), env.store)
    pending = [it for it in items if it["item"].get(LATENT) is None]
    unchecked = [it for it in vae_check_items(items, params, env.store) if it["check"].get(".json") is None]

    if pending or unchecked:
        dtype = getattr(torch, params.vae_dtype)
        vae = load_vae(info, resolve_device(params.model.device), dtype)
        encode_pending(vae, pending, params, inputs, env, dtype, {it["key"] for it in unchecked})
        check_pending(vae, [it for it in unchecked if not it["check"].get(".json")], inputs, env)

    out_rows, bucket_counts = [], defaultdict(int)
    for it in items:
        entry = it["item"].get(LATENT)
        name = f"{it['row']['id']}{'-flip' if it['flip'] else ''}.safetensors"
        materialize(entry, outputs.latents / name)
        meta = read_latent_meta(entry)
        bucket_counts[f"{it['bucket'][0]}x{it['bucket'][1]}"] += 1
        out_rows.append(
            {
                "id": it["row"]["id"],
                "file": name,
                "bucket": list(it["bucket"]),
                "flip": it["flip"],
                "original_size": meta["original_size"],
                "crop_top_left": meta["crop_top_left"],
                "repeats": it["row"].get("repeats", 1),
            }
        )
    write_jsonl(outputs.latents / "manifest.jsonl", out_rows)
    grid.save(outputs.latents)
    env.publish.table(
        "buckets", [{"bucket": b, "images": n} for b, n in sorted(bucket_counts.items())], "Aspect-ratio buckets"
    )
    summary = {
        "items": len(items),
        "computed": len(pending),
        "reused": len(items) - len(pending),
        "resolution": resolution,
        "buckets": dict(sorted(bucket_counts.items())),
    }
    if "vae_check" in outputs:
        summary["vae_check"] = write_vae_check(
            vae_check_items(items, params, env.store), params, outputs.vae_check, env, len(unchecked)
        )
    return summary


def crop_for(item: dict[str, Any], folder: Any) -> tuple[Any, tuple[int, int], tuple[int, int]]:
    """The exact bucket crop that item's latent encodes (Lanczos cover + centre crop, deterministic).

    Args:
        item: a work item from `plan_items`.
        folder: the input images folder.
    """
    with Image.open(folder / item["row"]["file"]) as img:
        return resize_cover_crop(img.convert("RGB"), *item["bucket"])


def encode_pending(
    vae: Any,
    pending: list[dict[str, Any]],
    params: Params,
    inputs: "Paths",
    env: "StageEnv",
    dtype: Any,
    check: set[str],
) -> None:
    """VAE-encode the items missing from the store, batched per bucket, into the store; run the
    VAE check on those in `check` while their crop is at hand.

    Args:
        vae: the training VAE.
        pending: work items whose latent is not cached.
        params: the `latents` section.
        inputs: the stage inputs (`images`).
        env: the stage environment.
        dtype: the VAE's dtype.
        check: latent keys of the items to VAE-check.
    """
    if not pending:
        return
    by_bucket: dict[Bucket, list[dict[str, Any]]] = defaultdict(list)
    for it in pending:
        by_bucket[it["bucket"]].append(it)
    bar = env.bar(total=len(pending), desc="latents", unit="img")
    for bucket, group in sorted(by_bucket.items()):
        for start in range(0, len(group), params.batch_size):
            chunk = group[start : start + params.batch_size]
            crops = []
            for it in chunk:
                crop, it["crop_top_left"], it["original_size"] = crop_for(it, inputs.images)
                crops.append(crop)
            latents = encode_batch(vae, crops, [it["flip"] for it in chunk], dtype)  # (B, 4, h/8, w/8)
            for it, crop, latent in zip(chunk, crops, latents):
                meta = {
                    "bucket": f"{bucket[0]}x{bucket[1]}",
                    "original_size": f"{it['original_size'][0]}x{it['original_size'][1]}",
                    "crop_top_left": f"{it['crop_top_left'][0]}x{it['crop_top_left'][1]}",
                    "flip": str(it["flip"]),
                }
                tensor = latent.contiguous()
                it["item"].put(LATENT, lambda p, t=tensor, m=meta: save_file({"latent": t}, str(p), metadata=m))
                if it["key"] in check:
                    store_check(vae, it, crop, latent, env)
            bar.update(len(chunk))
            env.publish.progress(bar.n / len(pending), "VAE encoding")
    bar.close()


# ---------------------------------------------------------------- the VAE reconstruction check


def vae_check_items(items: list[dict[str, Any]], params: Params, store: "ItemStore") -> list[dict[str, Any]]:
    """The items the check covers (unflipped ones; none when `vae_check` is off), each given its
    `check` entry: keyed by the latent's key + the window size, so a cached result is reused
    exactly when the latent is.

    Args:
        items: the work items from `plan_items`.
        params: the `latents` section.
        store: the item store.
    """
    if not params.vae_check:
        return []
    checked = [it for it in items if not it["flip"]]
    for it in checked:
        it["window"] = params.vae_check_window
        it["check"] = store.item("vae-check", latent=it["key"], window=it["window"])
    return checked


def store_check(vae: Any, item: dict[str, Any], crop: Any, latent: Any, env: "StageEnv") -> None:
    """Decode `latent`, compare it with `crop`, and store the stats (`.json`) and the
    worst-window sheet (`.png`) under the item's check key.

    Args:
        vae: the training VAE.
        item: a work item from `vae_check_items`.
        crop: the image the latent encodes.
        latent: (4, h, w) unscaled posterior mean.
        env: the stage environment.
    """
    stats, sheet = vae_check_image(crop, decode_latent(vae, latent), item["window"])
    item["check"].put(".png", lambda p: sheet.save(p, format="PNG"))
    item["check"].put_bytes(".json", json.dumps(stats).encode())  # after the PNG: marks it complete


def check_pending(vae: Any, unchecked: list[dict[str, Any]], inputs: "Paths", env: "StageEnv") -> None:
    """The VAE check for items whose latent was cached before (encoding checks the rest).

    Args:
        vae: the training VAE.
        unchecked: items whose check is not cached.
        inputs: the stage inputs (`images`).
        env: the stage environment.
    """
    if not unchecked:
        return
    bar = env.bar(total=len(unchecked), desc="VAE check", unit="img")
    for n, it in enumerate(unchecked, 1):
        latent = load_file(str(it["item"].get(LATENT)))["latent"]
        store_check(vae, it, crop_for(it, inputs.images)[0], latent, env)
        bar.update(1)
        env.publish.progress(n / len(unchecked), "VAE reconstruction check")
    bar.close()


def write_vae_check(
    checked: list[dict[str, Any]], params: Params, folder: Any, env: "StageEnv", computed: int
) -> dict[str, Any]:
    """Per-image PSNR, worst first; the worst `vae_check_worst` sheets as `NN-<id>.png` in
    `folder` with `index.json`; a Prefect table. Returns the report's `vae_check` section.

    Args:
        checked: the items from `vae_check_items` (all checked by now).
        params: the `latents` section.
        folder: the `vae_check` output folder (reports/vae_check).
        env: the stage environment.
        computed: how many were decoded this run.
    """
    entries, images = {}, []
    for it in checked:
        entries[it["row"]["id"]] = it["check"]
        stats = json.loads(it["check"].get(".json").read_text())
        images.append({"id": it["row"]["id"], "source": it["row"].get("source", it["row"]["id"]), **stats})
    images.sort(key=lambda r: (r["psnr_db"], r["id"]))
    worst = []
    for rank, row in enumerate(images[: params.vae_check_worst], 1):
        name = f"{rank:02d}-{row['id']}.png"
        materialize(entries[row["id"]].get(".png"), folder / name)
        worst.append({**row, "sheet": f"vae_check/{name}"})
    section = {
        "enabled": params.vae_check,
        "images": len(images),
        "computed": computed,
        "reused": len(images) - computed,
        "window": params.vae_check_window,
        "mean_psnr_db": round(sum(r["psnr_db"] for r in images) / len(images), 2) if images else None,
        "min_psnr_db": images[0]["psnr_db"] if images else None,
        "worst": worst,
        "per_image": images,
    }
    (folder / "index.json").write_text(json.dumps(section, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if images:
        env.publish.table(
            "vae-reconstruction",
            [{k: r[k] for k in ("source", "psnr_db", "worst_window_psnr_db")} for r in images],
            "VAE reconstruction PSNR per image, worst first (003 guide: low = details the model cannot learn)",
        )
    return section


def read_latent_meta(path: Any) -> dict[str, list[int]]:
    """Original size (h, w) and crop top-left (top, left) recorded with a cached latent."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return {k: [int(v) for v in meta[k].split("x")] for k in ("original_size", "crop_top_left")}
