"""latents: aspect-ratio buckets, resize-and-crop, VAE-encode every image once.

Each image goes to the bucket (width, height multiple of `bucket_step`, area ≤ resolution²) whose
aspect ratio is closest to its own; it is resized to cover the bucket and centre-cropped. The VAE
posterior mean is stored per image in the item store with the original size and crop box (SDXL's
micro-conditioning needs them). Key: image pixels + bucket/crop/flip + VAE weight hash + format
version, so a changed image re-encodes alone and a changed VAE re-encodes all. Captions are not an
input of this stage: changing the trigger never re-encodes a latent.
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

if TYPE_CHECKING:
    from loraforge.runner import Paths, StageEnv

FORMAT_VERSION = 1
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
    """

    model: ModelParams
    resolution: int | None = Field(None, ge=64)
    bucket_step: int = Field(64, ge=8)
    min_bucket: int | None = Field(None, ge=8)
    max_bucket: int | None = Field(None, ge=8)
    flip: bool = False
    batch_size: int = Field(4, ge=1)
    vae_dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    @model_validator(mode="after")
    def _step_multiple_of_8(self) -> "Params":
        if self.bucket_step % 8:
            raise ValueError(f"`latents.bucket_step` must be a multiple of 8 (the VAE's scale), got {self.bucket_step}")
        if self.min_bucket and self.max_bucket and self.min_bucket > self.max_bucket:
            raise ValueError(f"`latents.min_bucket` ({self.min_bucket}) must not exceed `latents.max_bucket` ({self.max_bucket})")
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


def plan_items(rows: list[dict[str, Any]], params: Params, resolution: int, buckets: list[Bucket], vae_hash: str) -> list[dict[str, Any]]:
    """One work item per image (and per flipped copy): its bucket and store key."""
    items = []
    for row in rows:
        bucket = select_bucket(row["width"], row["height"], buckets, resolution, params.bucket_step)
        for flip in (False, True) if params.flip else (False,):
            key = item_key("latent", FORMAT_VERSION, image=row["pixel_hash"], bucket=bucket, flip=flip, vae=vae_hash, dtype=params.vae_dtype)
            items.append({"row": row, "bucket": bucket, "flip": flip, "key": key})
    return items


def run(params: Params, inputs: "Paths", outputs: "Paths", env: "StageEnv") -> dict[str, Any]:
    """Encode missing latents into the store; materialise all of them into `outputs.latents`."""
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from loraforge.models import component_hash, load_vae, resolve_device, resolve_model

    info = resolve_model(params.model, env.state_dir)
    resolution = params.resolution or info.native_resolution
    min_side = params.min_bucket or max(params.bucket_step, resolution // 2)
    buckets = make_buckets(resolution, params.bucket_step, min_side, params.max_bucket or 2 * resolution)
    rows = read_jsonl(inputs.images / "manifest.jsonl")
    items = plan_items(rows, params, resolution, buckets, component_hash(info, "vae", env.state_dir))
    pending = [it for it in items if env.store.get("latent", it["key"], ".safetensors") is None]

    if pending:
        dtype = getattr(torch, params.vae_dtype)
        vae = load_vae(info, resolve_device(params.model.device), dtype)
        by_bucket: dict[Bucket, list[dict[str, Any]]] = defaultdict(list)
        for it in pending:
            by_bucket[it["bucket"]].append(it)
        bar = env.bar(total=len(pending), desc="latents", unit="img")
        for bucket, group in sorted(by_bucket.items()):
            for start in range(0, len(group), params.batch_size):
                chunk = group[start : start + params.batch_size]
                crops = []
                for it in chunk:
                    with Image.open(inputs.images / it["row"]["file"]) as img:
                        crop, top_left, original = resize_cover_crop(img.convert("RGB"), *bucket)
                    it["crop_top_left"], it["original_size"] = top_left, original
                    crops.append(crop)
                latents = encode_batch(vae, crops, [it["flip"] for it in chunk], dtype)  # (B, 4, h/8, w/8)
                for it, latent in zip(chunk, latents):
                    meta = {"bucket": f"{bucket[0]}x{bucket[1]}", "original_size": f"{it['original_size'][0]}x{it['original_size'][1]}",
                            "crop_top_left": f"{it['crop_top_left'][0]}x{it['crop_top_left'][1]}", "flip": str(it["flip"])}
                    env.store.put("latent", it["key"], ".safetensors",
                                  lambda p, t=latent.contiguous(), m=meta: save_file({"latent": t}, str(p), metadata=m))
                bar.update(len(chunk))
                env.publish.progress(bar.n / len(pending), "VAE encoding")
        bar.close()

    out_rows, bucket_counts = [], defaultdict(int)
    for it in items:
        entry = env.store.get("latent", it["key"], ".safetensors")
        name = f"{it['row']['id']}{'-flip' if it['flip'] else ''}.safetensors"
        materialize(entry, outputs.latents / name)
        meta = read_latent_meta(entry)
        bucket_counts[f"{it['bucket'][0]}x{it['bucket'][1]}"] += 1
        out_rows.append({"id": it["row"]["id"], "file": name, "bucket": list(it["bucket"]), "flip": it["flip"],
                         "original_size": meta["original_size"], "crop_top_left": meta["crop_top_left"],
                         "repeats": it["row"].get("repeats", 1)})
    write_jsonl(outputs.latents / "manifest.jsonl", out_rows)
    env.publish.table("buckets", [{"bucket": b, "images": n} for b, n in sorted(bucket_counts.items())], "Aspect-ratio buckets")
    return {"items": len(items), "computed": len(pending), "reused": len(items) - len(pending),
            "resolution": resolution, "buckets": dict(sorted(bucket_counts.items()))}


def read_latent_meta(path: Any) -> dict[str, list[int]]:
    """Original size (h, w) and crop top-left (top, left) recorded with a cached latent."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return {k: [int(v) for v in meta[k].split("x")] for k in ("original_size", "crop_top_left")}
