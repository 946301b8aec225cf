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

import math
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from loraforge.fingerprint import item_key
from loraforge.images import read_jsonl, resize_cover_crop, write_jsonl
from loraforge.params import ModelParams, section
from loraforge.store import materialize
from loraforge.vaecheck import check as vae_check_image
from loraforge.vaecheck import decode_latent

if TYPE_CHECKING:
    from loraforge.runner import Paths, StageEnv

FORMAT_VERSION = 1
VAE_CHECK_VERSION = 1
Bucket = tuple[int, int]  # (width, height) in pixels


@section
class Params:
    """The `latents` section.

    Attributes:
        resolution: bucket area is resolution²; null = the model's native resolution.
        bucket_step: bucket sides are multiples of this (64 for real models; at least 8).
        min_bucket: smallest bucket side; null = max(bucket_step, resolution / 2).
        max_bucket: largest bucket side; null = 2 × resolution.
        flip: also cache a horizontally flipped copy of every image (doubles the latents).
        batch_size: images per VAE call (same bucket).
        vae_dtype: keep float32 for SDXL's VAE ("no half VAE" in the 001 guide): fp16 overflows to NaN.
        vae_check: decode every latent again and report what the VAE loses (PSNR per image,
            worst windows side by side; 003 guide). One extra VAE decode per new image.
        vae_check_worst: how many of the worst-reconstructed images to show.
        vae_check_window: side, in pixels, of the worst window shown per image.
    """

    model: ModelParams
    resolution: int | None = Field(None, ge=64)
    bucket_step: int = Field(64, ge=8)
    min_bucket: int | None = Field(None, ge=8)
    max_bucket: int | None = Field(None, ge=8)
    flip: bool = False
    batch_size: int = Field(4, ge=1)
    vae_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    vae_check: bool = False
    vae_check_worst: int = Field(4, ge=1)
    vae_check_window: int = Field(64, ge=8)

    @model_validator(mode="after")
    def _step_multiple_of_8(self) -> "Params":
        if self.bucket_step % 8:
            raise ValueError(f"`latents.bucket_step` must be a multiple of 8 (the VAE's scale), got {self.bucket_step}")
        if self.min_bucket and self.max_bucket and self.min_bucket > self.max_bucket:
            raise ValueError(
                f"`latents.min_bucket` ({self.min_bucket}) must not exceed `latents.max_bucket` ({self.max_bucket})"
            )
        return self


def make_buckets(resolution: int, step: int, min_side: int, max_side: int) -> list[Bucket]:
    """Every (w, h) with sides multiples of `step` in [min_side, max_side] and the largest height
    that keeps w·h ≤ resolution² (kohya's scheme), both orientations, sorted by aspect ratio."""
    area = resolution * resolution
    min_side, max_side = -(-min_side // step) * step, max_side // step * step  # limits on the step grid
    buckets: set[Bucket] = set()
    width = min_side
    while width <= max_side:
        height = min(max_side, (area // width) // step * step)
        if height >= min_side:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets, key=lambda b: b[0] / b[1])


def select_bucket(width: int, height: int, buckets: list[Bucket], resolution: int, step: int) -> Bucket:
    """The bucket for a `width`×`height` image: closest aspect ratio (in log space). An image
    smaller than the bucket area gets its own step-aligned size instead, so it is never upscaled."""
    if width * height < resolution * resolution:
        return (max(step, width // step * step), max(step, height // step * step))
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def image_to_tensor(image: Any, flip: bool) -> Any:
    """PIL RGB image -> (3, H, W) float tensor in [-1, 1], optionally mirrored."""
    import numpy as np
    import torch

    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    if flip:
        array = array[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


def encode_batch(vae: Any, images: list[Any], flips: list[bool], dtype: Any) -> Any:
    """VAE posterior means for same-size images: (B, 4, H/8, W/8), unscaled (the trainer applies
    `scaling_factor`). The mean, not a sample, so a cached latent is deterministic."""
    import torch

    batch = torch.stack([image_to_tensor(im, f) for im, f in zip(images, flips)]).to(vae.device, dtype)
    with torch.inference_mode():
        return vae.encode(batch).latent_dist.mean.float().cpu()


def plan_items(
    rows: list[dict[str, Any]], params: Params, resolution: int, buckets: list[Bucket], vae_hash: str
) -> list[dict[str, Any]]:
    """One work item per image (and per flipped copy): its bucket and store key."""
    items = []
    for row in rows:
        bucket = select_bucket(row["width"], row["height"], buckets, resolution, params.bucket_step)
        for flip in (False, True) if params.flip else (False,):
            key = item_key(
                "latent",
                FORMAT_VERSION,
                image=row["pixel_hash"],
                bucket=bucket,
                flip=flip,
                vae=vae_hash,
                dtype=params.vae_dtype,
            )
            items.append({"row": row, "bucket": bucket, "flip": flip, "key": key})
    return items


def run(params: Params, inputs: "Paths", outputs: "Paths", env: "StageEnv") -> dict[str, Any]:
    """Encode missing latents into the store; materialise all of them into `outputs.latents`;
    with `vae_check`, measure the reconstructions into `outputs.vae_check`."""
    import torch

    from loraforge.models import component_hash, load_vae, resolve_device, resolve_model

    info = resolve_model(params.model, env.state_dir)
    resolution = params.resolution or info.native_resolution
    min_side = params.min_bucket or max(params.bucket_step, resolution // 2)
    buckets = make_buckets(resolution, params.bucket_step, min_side, params.max_bucket or 2 * resolution)
    rows = read_jsonl(inputs.images / "manifest.jsonl")
    items = plan_items(rows, params, resolution, buckets, component_hash(info, "vae", env.state_dir))
    pending = [it for it in items if env.store.get("latent", it["key"], ".safetensors") is None]
    unchecked = [
        it for it in vae_check_items(items, params) if env.store.get("vae-check", it["check_key"], ".json") is None
    ]

    if pending or unchecked:
        dtype = getattr(torch, params.vae_dtype)
        vae = load_vae(info, resolve_device(params.model.device), dtype)
        encode_pending(vae, pending, params, inputs, env, dtype, {it["key"] for it in unchecked})
        check_pending(
            vae, [it for it in unchecked if not env.store.get("vae-check", it["check_key"], ".json")], inputs, env
        )

    out_rows, bucket_counts = [], defaultdict(int)
    for it in items:
        entry = env.store.get("latent", it["key"], ".safetensors")
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
            vae_check_items(items, params), params, outputs.vae_check, env, len(unchecked)
        )
    return summary


def crop_for(item: dict[str, Any], folder: Any) -> tuple[Any, tuple[int, int], tuple[int, int]]:
    """The exact bucket crop that item's latent encodes (Lanczos cover + centre crop, deterministic).

    Args:
        item: a work item from `plan_items`.
        folder: the input images folder.
    """
    from PIL import Image

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
    from safetensors.torch import save_file

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
                env.store.put(
                    "latent",
                    it["key"],
                    ".safetensors",
                    lambda p, t=latent.contiguous(), m=meta: save_file({"latent": t}, str(p), metadata=m),
                )
                if it["key"] in check:
                    store_check(vae, it, crop, latent, env)
            bar.update(len(chunk))
            env.publish.progress(bar.n / len(pending), "VAE encoding")
    bar.close()


# ---------------------------------------------------------------- the VAE reconstruction check


def vae_check_items(items: list[dict[str, Any]], params: Params) -> list[dict[str, Any]]:
    """The items the check covers (unflipped ones; none when `vae_check` is off), each given its
    `check_key`: the latent's key + the window size, so a cached result is reused exactly when
    the latent is.

    Args:
        items: the work items from `plan_items`.
        params: the `latents` section.
    """
    if not params.vae_check:
        return []
    checked = [it for it in items if not it["flip"]]
    for it in checked:
        it["window"] = params.vae_check_window
        it["check_key"] = item_key("vae-check", VAE_CHECK_VERSION, latent=it["key"], window=it["window"])
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
    import json

    stats, sheet = vae_check_image(crop, decode_latent(vae, latent), item["window"])
    env.store.put("vae-check", item["check_key"], ".png", lambda p: sheet.save(p, format="PNG"))
    env.store.put_bytes(
        "vae-check", item["check_key"], ".json", json.dumps(stats).encode()
    )  # after the PNG: marks it complete


def check_pending(vae: Any, unchecked: list[dict[str, Any]], inputs: "Paths", env: "StageEnv") -> None:
    """The VAE check for items whose latent was cached before (encoding checks the rest).

    Args:
        vae: the training VAE.
        unchecked: items whose check is not cached.
        inputs: the stage inputs (`images`).
        env: the stage environment.
    """
    from safetensors.torch import load_file

    if not unchecked:
        return
    bar = env.bar(total=len(unchecked), desc="VAE check", unit="img")
    for n, it in enumerate(unchecked, 1):
        latent = load_file(str(env.store.get("latent", it["key"], ".safetensors")))["latent"]
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
    import json

    keys, images = {}, []
    for it in checked:
        keys[it["row"]["id"]] = it["check_key"]
        stats = json.loads(env.store.get("vae-check", it["check_key"], ".json").read_text())
        images.append({"id": it["row"]["id"], "source": it["row"].get("source", it["row"]["id"]), **stats})
    images.sort(key=lambda r: (r["psnr_db"], r["id"]))
    worst = []
    for rank, row in enumerate(images[: params.vae_check_worst], 1):
        name = f"{rank:02d}-{row['id']}.png"
        materialize(env.store.get("vae-check", keys[row["id"]], ".png"), folder / name)
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
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return {k: [int(v) for v in meta[k].split("x")] for k in ("original_size", "crop_top_left")}
