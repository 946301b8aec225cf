"""upscale: bring every image's short side up to `upscale.min_side`; never downscale.

Small images train badly (the 001 guide: at least 1024 px for SDXL), so images whose short side
is below `min_side` (default: the model's native resolution) are upscaled with Lanczos or with an
ESRGAN-family network loaded by spandrel. Results are cached per image in the item store.
An image's mask (masked loss) follows it: resized (bilinear) to the upscaled size, also cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import spandrel
import torch
from PIL import Image

from loraforge.errors import InputError, MissingInput
from loraforge.store.fanout import chunked
from loraforge.store.fingerprint import hash_file
from loraforge.data.images import lanczos_upscale, pixel_hash, read_jsonl, save_png, write_jsonl
from loraforge.models.loading import native_resolution, resolve_device
from loraforge.models.safetensors_io import load_tensors, refuse_pickle
from loraforge.store.items import Item, materialize
from stages.upscale_params import Params

if TYPE_CHECKING:
    from loraforge.pipeline.runner import Paths, StageEnv
    from loraforge.store.items import ItemStore


def needs_upscale(width: int, height: int, min_side: int) -> bool:
    """True when the short side is below `min_side`."""
    return min(width, height) < min_side


def upscaler_file(params: Params, inputs: "Paths") -> Path:
    """The upscaler weights file (the runner hands it as `inputs.upscaler` when it exists)."""
    if not params.model_path:
        raise InputError("`upscale.model_path` must name a weights file when `upscale.method` is `model`")
    if "upscaler" not in inputs:
        raise MissingInput(f"`upscale.model_path` = {params.model_path!r}: no such file in the project")
    refuse_pickle(inputs["upscaler"], params.allow_pickle, "upscale.allow_pickle")  # before any work
    return Path(inputs["upscaler"])


def target_size(width: int, height: int, min_side: int) -> tuple[int, int]:
    """The size `lanczos_upscale` gives: short side exactly `min_side`, aspect kept."""
    short = min(width, height)
    if width <= height:
        return min_side, max(min_side, round(height * min_side / short))
    return max(min_side, round(width * min_side / short)), min_side


def model_upscale(image: Image.Image, model: Any, min_side: int, tile: int, overlap: int = 0) -> Image.Image:
    """Run a super-resolution network tile by tile, then Lanczos to the exact target size if
    the network's scale overshoots or undershoots it.

    Each tile is run with `overlap` pixels of its neighbours around it (clipped at the image
    border) and only its own area is kept, so every output pixel saw the same context it would
    have seen in one whole-image pass, up to the overlap: no seams at tile borders.

    Args:
        image: RGB input.
        model: a callable (1, 3, h, w) in [0, 1] -> (1, 3, h·scale, w·scale), with `scale` and `device`.
        min_side: the short side wanted.
        tile: tile side in input pixels.
        overlap: context pixels around each tile.
    """
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]  # (1, 3, H, W)
    x = x.to(model.device)
    s, (height, width) = model.scale, x.shape[2:]
    out = torch.zeros(1, 3, height * s, width * s, device=x.device)
    with torch.inference_mode():
        for top in range(0, height, tile):
            for left in range(0, width, tile):
                bottom, right = min(top + tile, height), min(left + tile, width)
                t0, l0 = max(0, top - overlap), max(0, left - overlap)
                patch = model(x[:, :, t0 : min(height, bottom + overlap), l0 : min(width, right + overlap)])
                keep = patch[:, :, (top - t0) * s : (bottom - t0) * s, (left - l0) * s : (right - l0) * s]
                out[:, :, top * s : bottom * s, left * s : right * s] = keep
    array = (out[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype("uint8")
    big = Image.fromarray(array)
    target = target_size(*image.size, min_side)  # a 4x net on a 100 px image overshoots 128 px
    return big if big.size == target else big.resize(target, Image.Resampling.LANCZOS)


def load_upscaler(path: Path, device: str, allow_pickle: bool) -> Any:
    """A super-resolution network from a weights file: tensors read by loraforge's one loader
    (safetensors; pickle only with `upscale.allow_pickle`), architecture detected by spandrel.

    Args:
        path: the weights file.
        device: where the network runs.
        allow_pickle: `upscale.allow_pickle`.
    """
    state = load_tensors(path, allow_pickle=allow_pickle, opt_in="upscale.allow_pickle")
    try:
        descriptor = spandrel.ModelLoader(device=device).load_from_state_dict(state)
    except spandrel.UnsupportedModelError:
        raise InputError(f"`upscale.model_path` {path}: not an architecture spandrel knows") from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.scale < 2:
        kind = f"{descriptor.architecture.name} ({descriptor.purpose}, scale {descriptor.scale})"
        raise InputError(f"`upscale.model_path` {path} is {kind}, not a super-resolution model")
    if descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise InputError(f"`upscale.model_path` {path}: needs an RGB model, got {descriptor.input_channels} channels")
    return descriptor.to(device).eval()


def run(params: Params, inputs: "Paths", outputs: "Paths", env: "StageEnv") -> dict[str, Any]:
    """Upscale small images from `inputs.images` into `outputs.images` (the missing ones in
    chunks through `env.fan_out`, into the item store)."""
    min_side = params.min_side or native_resolution(params.model, env.state_dir)
    weights = upscaler_file(params, inputs) if params.method == "model" else None
    upscaler = Upscaler(params, weights, str(resolve_device(params.model.device)))
    rows = read_jsonl(inputs.images / "manifest.jsonl")
    small = [r for r in rows if needs_upscale(r["width"], r["height"], min_side)]
    entries = {r["id"]: env.store.item("upscaled", image=r["pixel_hash"], min_side=min_side, **upscaler.identity)
               for r in small}  # fmt: skip
    pending = [{"file": r["file"], "key": entries[r["id"]].key} for r in small if entries[r["id"]].get(".png") is None]
    bar = env.tracker(len(pending), "upscaling")
    env.fan_out.map(upscale_chunk, UpscaleJob(upscaler, min_side, inputs.images, env.store),
                    chunked(pending, env.fan_out.chunk_size), bar)  # fmt: skip
    bar.close()
    out_rows = []
    for row in rows:
        src, dst = inputs.images / row["file"], outputs.images / row["file"]
        if row["id"] not in entries:
            materialize(src, dst)
            out_rows.append({**row, **carry_mask(row, None, inputs.images, outputs.images, env.store),
                             "upscaled_from": None})  # fmt: skip
            continue
        entry = entries[row["id"]].get(".png")
        materialize(entry, dst)
        with Image.open(entry) as img:
            size, digest = img.size, pixel_hash(img.convert("RGB"))  # new pixels: later caches key on this
        out_rows.append({**row, "width": size[0], "height": size[1], "pixel_hash": digest,
                         **carry_mask(row, size, inputs.images, outputs.images, env.store),
                         "upscaled_from": [row["width"], row["height"]]})  # fmt: skip
    write_jsonl(outputs.images / "manifest.jsonl", out_rows)
    counts = {"computed": len(pending), "reused": len(small) - len(pending), "passed_through": len(rows) - len(small)}
    return {"items": len(rows), **counts, "min_side": min_side, "method": params.method}


def carry_mask(
    row: dict[str, Any], size: tuple[int, int] | None, images: Path, out: Path, store: "ItemStore"
) -> dict[str, Any]:
    """Bring a row's mask into the outputs: as it is (`size` None), or resized (bilinear) to its
    image's upscaled `size` through the store. Returns the row's new `mask_hash` (`{}` without a mask).

    Args:
        row: the input manifest row.
        size: the upscaled (width, height), or None when the image passed through.
        images: the input images folder.
        out: the output images folder.
        store: the item store.
    """
    if not row.get("mask"):
        return {}
    if size is None:
        materialize(images / row["mask"], out / row["mask"])
        return {"mask_hash": row["mask_hash"]}

    def make(tmp: Path) -> None:
        with Image.open(images / row["mask"]) as mask:
            save_png(mask.convert("L").resize(size, Image.Resampling.BILINEAR), tmp)

    path, _ = store.cached("upscaled-mask", {"mask": row["mask_hash"], "size": list(size)}, ".png", make)
    materialize(path, out / row["mask"])
    with Image.open(path) as mask:
        return {"mask_hash": pixel_hash(mask.convert("L"))}


class Upscaler:
    """Lanczos, or the network of `upscale.model_path` (loaded on first use, once per process).

    Args:
        params: the `upscale` section.
        weights: the network's weights file (method `model`), else None.
        device: where the network runs.
    """

    def __init__(self, params: Params, weights: Path | None, device: str) -> None:
        self.params, self.weights, self.device, self.net = params, weights, device, None
        if weights is None:  # the store key: what decides the upscaled pixels
            self.identity: dict[str, Any] = {"method": "lanczos", "tile": None}
        else:
            self.identity = {"method": hash_file(weights), "tile": params.tile, "overlap": params.tile_overlap}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "net": None}  # a worker loads the network itself

    def __call__(self, src: Path, min_side: int) -> Image.Image:
        """The upscaled image of the file `src`."""
        with Image.open(src) as opened:
            img = opened.convert("RGB")
        if self.weights is None:
            return lanczos_upscale(img, min_side)
        self.net = self.net or load_upscaler(self.weights, self.device, self.params.allow_pickle)
        return model_upscale(img, self.net, min_side, self.params.tile, self.params.tile_overlap)


@dataclass(frozen=True)
class UpscaleJob:
    """What every chunk of upscaling needs; sent once to each worker.

    Attributes:
        upscaler: Lanczos or the network.
        min_side: the short side wanted.
        images: the input images folder.
        store: the item store the results go to.
    """

    upscaler: Upscaler
    min_side: int
    images: Path
    store: "ItemStore"


def upscale_chunk(job: UpscaleJob, items: list[dict[str, Any]]) -> int:
    """Upscale each item (`file`, `key`) into the store; returns how many."""
    for it in items:
        image = job.upscaler(job.images / it["file"], job.min_side)
        Item(job.store, "upscaled", it["key"]).put(".png", lambda tmp, im=image: save_png(im, tmp))
    return len(items)
