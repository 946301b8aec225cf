"""latents: aspect-ratio buckets, resize-and-crop, VAE-encode every image once.

Each image goes to the bucket (width, height multiple of `bucket_step`, area ≤ resolution²) whose
aspect ratio is closest to its own; it is resized to cover the bucket and centre-cropped. The VAE
posterior mean is stored per image in the item store with the original size and crop box (SDXL's
micro-conditioning needs them). Key: image pixels + bucket/crop/flip + VAE weight hash + format
version, so a changed image re-encodes alone and a changed VAE re-encodes all. Captions are not an
input of this stage: changing the trigger never re-encodes a latent.

Masks (masked loss): an image whose ingest row carries a `mask` (its alpha channel or
`<stem>-mask.png`) gets the same cover-resize and centre crop applied to the mask (BOX filter),
area-averaged down to the latent grid (h/8, w/8), mirrored with the flip, and stored as a `mask`
tensor (1, h/8, w/8) in [0, 1] beside `latent` in the same entry; the mask's hash joins that
entry's key (a changed mask re-encodes that image only), and its manifest row says `masked: true`.
An image without a mask has no mask tensor and the key it always had.

`latents.vae_check` (003 guide) decodes every cached latent again and measures what the VAE loses:
PSNR per image, and the worst window of the worst images saved side by side (original |
reconstruction | error) into `reports/vae_check/`, shown on the evaluation page. Results are cached
per latent, so only new or changed images are decoded.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from loraforge.data.buckets import Bucket, BucketGrid
from loraforge.data.images import read_jsonl, resize_cover_crop, write_jsonl
from loraforge.models.loading import component_hash, load_vae, resolve_device, resolve_model
from loraforge.store.fanout import chunked
from loraforge.models.loading import ModelInfo
from loraforge.models.safetensors_io import save_tensors
from loraforge.store.items import Item, materialize
from loraforge.models.vae import encode_batch, latent_mask
from loraforge.data.vae_check import check as vae_check_image
from loraforge.data.vae_check import decode_latent
from stages.latents_params import Params

if TYPE_CHECKING:
    from loraforge.pipeline.runner import Paths, StageEnv
    from loraforge.store.items import ItemStore

LATENT = ".safetensors"


def plan_items(
    rows: list[dict[str, Any]], params: Params, grid: BucketGrid, vae_hash: str, store: "ItemStore"
) -> list[dict[str, Any]]:
    """One work item per image (and per flipped copy): its bucket and store entry (`item`, `key`)."""
    items = []
    for row in rows:
        bucket = grid.select(row["width"], row["height"])
        mask = {"mask": row["mask_hash"]} if row.get("mask") else {}  # no mask: the key it always had
        for flip in (False, True) if params.flip else (False,):
            entry = store.item(
                "latent",
                image=row["pixel_hash"],
                bucket=bucket,
                flip=flip,
                vae=vae_hash,
                dtype=params.vae_dtype,
                **mask,
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
    checked = vae_check_items(items, params, env.store)
    pending = [it for it in items if it["item"].get(LATENT) is None]
    unchecked = [it for it in checked if it["check"].get(".json") is None]
    job = VaeJob(info, str(resolve_device(params.model.device)), params.vae_dtype, inputs.images, env.store)
    encode_and_check(job, pending, unchecked, params.batch_size, env)

    out_rows, bucket_counts = [], defaultdict(int)
    for it in items:
        entry = it["item"].get(LATENT)
        if entry is None:
            raise RuntimeError(f"latent of {it['row']['file']} missing from the store after encoding")
        name = f"{it['row']['id']}{'-flip' if it['flip'] else ''}.safetensors"
        materialize(entry, outputs.latents / name)
        meta = read_latent_meta(entry)
        bucket_counts[f"{it['bucket'][0]}x{it['bucket'][1]}"] += 1
        masked = {"masked": True} if it["row"].get("mask") else {}  # absent without a mask: manifests as before
        out_rows.append({"id": it["row"]["id"], "file": name, "bucket": list(it["bucket"]), "flip": it["flip"],
                         "original_size": meta["original_size"], "crop_top_left": meta["crop_top_left"],
                         "repeats": it["row"].get("repeats", 1), **masked})  # fmt: skip
    write_jsonl(outputs.latents / "manifest.jsonl", out_rows)
    grid.save(outputs.latents)
    env.publish.table(
        "buckets", [{"bucket": b, "images": n} for b, n in sorted(bucket_counts.items())], "Aspect-ratio buckets"
    )
    summary = {"items": len(items), "computed": len(pending), "reused": len(items) - len(pending),
               "resolution": resolution, "buckets": dict(sorted(bucket_counts.items()))}  # fmt: skip
    if "vae_check" in outputs:
        summary["vae_check"] = write_vae_check(checked, params, outputs.vae_check, env, len(unchecked))
    return summary


@dataclass(frozen=True)
class VaeJob:
    """What every chunk of VAE work needs; sent once to each worker.

    Attributes:
        info: the resolved base model (its VAE is loaded once per process).
        device: where the VAE runs.
        dtype: `latents.vae_dtype`.
        images: the input images folder.
        store: the item store the results go to.
    """

    info: ModelInfo
    device: str
    dtype: str
    images: Path
    store: "ItemStore"


_VAES: dict[tuple[str, str, str, str], Any] = {}  # per process: a worker loads the VAE once, not per chunk


def job_vae(job: VaeJob) -> Any:
    """The job's VAE, loaded on first use in this process."""
    key = (str(job.info.path), str(job.info.vae_path), job.device, job.dtype)
    if key not in _VAES:
        _VAES.clear()
        _VAES[key] = load_vae(job.info, torch.device(job.device), getattr(torch, job.dtype))
    return _VAES[key]


def work_item(it: dict[str, Any]) -> dict[str, Any]:
    """The plain, picklable part of a work item that a chunk needs (no store objects)."""
    check = it.get("check")
    return {"file": it["row"]["file"], "mask": it["row"].get("mask"), "bucket": it["bucket"], "flip": it["flip"],
            "key": it["key"], "check": check.key if check is not None else None,
            "window": it.get("window")}  # fmt: skip


def encode_and_check(
    job: VaeJob, pending: list[dict[str, Any]], unchecked: list[dict[str, Any]], batch_size: int, env: "StageEnv"
) -> None:
    """Encode `pending` (batched per bucket) and VAE-check `unchecked`, in chunks through
    `env.fan_out`; everything lands in the item store.

    Args:
        job: the shared job.
        pending: work items whose latent is not cached.
        unchecked: work items whose VAE check is not cached.
        batch_size: `latents.batch_size`.
        env: the stage environment (fan-out, progress).
    """
    to_check = {it["key"] for it in unchecked}
    by_bucket: dict[Bucket, list[dict[str, Any]]] = defaultdict(list)
    for it in pending:
        by_bucket[it["bucket"]].append(work_item(it) if it["key"] in to_check else {**work_item(it), "check": None})
    # batches are fixed before chunking, so where a chunk runs never changes what a batch holds
    batches = [g[i : i + batch_size] for _, g in sorted(by_bucket.items()) for i in range(0, len(g), batch_size)]
    per_chunk = max(1, env.fan_out.chunk_size // batch_size)
    encoded = {it["key"] for it in pending}
    check_only = [work_item(it) for it in unchecked if it["key"] not in encoded]
    total = len(pending) + len(check_only)
    bar = env.tracker(total, "VAE encoding")
    env.fan_out.map(encode_chunk, job, chunked(batches, per_chunk), bar)
    env.fan_out.map(check_chunk, job, chunked(check_only, env.fan_out.chunk_size), bar)
    bar.close()


def encode_chunk(job: VaeJob, batches: list[list[dict[str, Any]]]) -> int:
    """VAE-encode each batch (one bucket each) into the store; check the items that ask for it
    while their crop is at hand. Returns the number of images encoded."""
    vae, dtype, done = job_vae(job), getattr(torch, job.dtype), 0
    for batch in batches:
        crops, boxes = [], []
        for it in batch:
            crop, top_left, original = crop_for(it, job.images)
            crops.append(crop)
            boxes.append((top_left, original))
        latents = encode_batch(vae, crops, [it["flip"] for it in batch], dtype)  # (B, 4, h/8, w/8)
        for it, crop, (top_left, original), latent in zip(batch, crops, boxes, latents):
            w, h = it["bucket"]
            meta = {"bucket": f"{w}x{h}", "original_size": f"{original[0]}x{original[1]}",
                    "crop_top_left": f"{top_left[0]}x{top_left[1]}", "flip": str(it["flip"])}  # fmt: skip
            tensors = {"latent": latent.contiguous(), **mask_for(it, job.images, latent.shape[-2:])}
            Item(job.store, "latent", it["key"]).put(LATENT, lambda p, t=tensors, m=meta: save_tensors(t, p, m))
            if it["check"]:
                store_check(vae, it, crop, latent, job.store)
        done += len(batch)
    return done


def check_chunk(job: VaeJob, items: list[dict[str, Any]]) -> int:
    """The VAE check of items whose latent was cached by an earlier run. Returns the count."""
    vae = job_vae(job)
    for it in items:
        latent = load_file(str(Item(job.store, "latent", it["key"]).get(LATENT)))["latent"]
        store_check(vae, it, crop_for(it, job.images)[0], latent, job.store)
    return len(items)


def crop_for(item: dict[str, Any], folder: Path) -> tuple[Any, tuple[int, int], tuple[int, int]]:
    """The exact bucket crop that item's latent encodes (Lanczos cover + centre crop, deterministic).

    Args:
        item: a work item (`file`, `bucket`).
        folder: the input images folder.
    """
    with Image.open(folder / item["file"]) as img:
        return resize_cover_crop(img.convert("RGB"), *item["bucket"])


def mask_for(item: dict[str, Any], folder: Path, size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """`{"mask": (1, h, w)}` for an item with a mask: the bucket crop of the mask on the latent
    grid (`loraforge.models.vae.latent_mask`); `{}` without one.

    Args:
        item: a work item (`mask`, `bucket`, `flip`).
        folder: the input images folder.
        size: (h, w) of the latent.
    """
    if not item.get("mask"):
        return {}
    with Image.open(folder / item["mask"]) as img:
        crop = resize_cover_crop(img.convert("L"), *item["bucket"], resample=Image.Resampling.BOX)[0]
    return {"mask": latent_mask(crop, item["flip"], tuple(size))}


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


def store_check(vae: Any, item: dict[str, Any], crop: Any, latent: Any, store: "ItemStore") -> None:
    """Decode `latent`, compare it with `crop`, and store the stats (`.json`) and the
    worst-window sheet (`.png`) under the item's check key.

    Args:
        vae: the training VAE.
        item: a work item (`check`: the check entry's key, `window`).
        crop: the image the latent encodes.
        latent: (4, h, w) unscaled posterior mean.
        store: the item store.
    """
    stats, sheet = vae_check_image(crop, decode_latent(vae, latent), item["window"])
    entry = Item(store, "vae-check", item["check"])
    entry.put(".png", lambda p: sheet.save(p, format="PNG"))
    entry.put_bytes(".json", json.dumps(stats).encode())  # after the PNG: marks it complete


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
