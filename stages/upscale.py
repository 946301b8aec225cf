"""upscale: bring every image's short side up to `upscale.min_side`; never downscale.

Small images train badly (the 001 guide: at least 1024 px for SDXL), so images whose short side
is below `min_side` (default: the model's native resolution) are upscaled with Lanczos or with an
ESRGAN-family network loaded by spandrel. Results are cached per image in the item store.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge.fingerprint import hash_file
from loraforge.images import lanczos_upscale, pixel_hash, read_jsonl, save_png, write_jsonl
from loraforge.store import materialize
from stages.upscale_params import Params

if TYPE_CHECKING:
    from PIL import Image

    from loraforge.runner import Paths, StageEnv

PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


def needs_upscale(width: int, height: int, min_side: int) -> bool:
    """True when the short side is below `min_side`."""
    return min(width, height) < min_side


def check_upscaler_path(params: Params) -> Path:
    """The upscaler weights file, refusing a missing file or an unopted-in pickle."""
    if not params.model_path:
        raise ValueError("`upscale.model_path` must name a weights file when `upscale.method` is `model`")
    path = Path(params.model_path)
    if not path.is_file():
        raise FileNotFoundError(f"`upscale.model_path`: no file at {path}")
    if path.suffix.lower() in PICKLE_SUFFIXES and not params.allow_pickle:
        raise ValueError(
            f"`upscale.model_path` {path} is a pickle file; "
            "convert it to .safetensors or set `upscale.allow_pickle: true`"
        )
    return path


def model_upscale(image: "Image.Image", model: Any, min_side: int, tile: int) -> "Image.Image":
    """Run a spandrel model tile by tile (tiles overlap-free; ESRGAN nets are local), then Lanczos
    to the exact target if the network's scale overshoots or undershoots."""
    import numpy as np
    import torch
    from PIL import Image as PILImage

    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]  # (1, 3, H, W)
    x = x.to(model.device)
    scale = model.scale
    out = torch.zeros(1, 3, x.shape[2] * scale, x.shape[3] * scale, device=x.device)
    with torch.inference_mode():
        for top in range(0, x.shape[2], tile):
            for left in range(0, x.shape[3], tile):
                patch = x[:, :, top : top + tile, left : left + tile]
                out[
                    :, :, top * scale : (top + patch.shape[2]) * scale, left * scale : (left + patch.shape[3]) * scale
                ] = model(patch)
    array = (out[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype("uint8")
    big = PILImage.fromarray(array)
    # The exact size `lanczos_upscale` would give: a 4x net on a 100 px image overshoots 128 px.
    w, h = image.size
    short = min(w, h)
    target = (
        (min_side, max(min_side, round(h * min_side / short)))
        if w <= h
        else (max(min_side, round(w * min_side / short)), min_side)
    )
    return big if big.size == target else big.resize(target, PILImage.Resampling.LANCZOS)


def load_upscaler(path: Path, device: str) -> Any:
    """An ESRGAN-family network from a local file, via spandrel."""
    try:
        import spandrel
    except ImportError as e:
        raise ImportError(
            "`upscale.method: model` needs spandrel: `pip install 'loraforge[upscale]'` (it needs a torchvision "
            f"built for your torch). Import failed: {e}"
        ) from e
    descriptor = spandrel.ModelLoader(device=device).load_from_file(str(path))
    return descriptor.eval()


def upscaled_row(row: dict[str, Any], png: Path) -> dict[str, Any]:
    """The manifest row of an upscaled image: its new size and pixel hash, and the size it came from.

    Args:
        row: the image's row in the input manifest.
        png: the upscaled image.
    """
    from PIL import Image as PILImage

    with PILImage.open(png) as img:
        width, height = img.size
        digest = pixel_hash(img.convert("RGB"))  # new pixels: later stages key their caches on this
    return {
        **row,
        "width": width,
        "height": height,
        "pixel_hash": digest,
        "upscaled_from": [row["width"], row["height"]],
    }


def run(params: Params, inputs: "Paths", outputs: "Paths", env: "StageEnv") -> dict[str, Any]:
    """Upscale small images from `inputs.images` into `outputs.images`."""
    from PIL import Image as PILImage

    from loraforge.models import resolve_device, resolve_model

    min_side = params.min_side or resolve_model(params.model, env.state_dir).native_resolution
    upscaler, upscaler_id = None, "lanczos"
    if params.method == "model":
        weights = check_upscaler_path(params)
        upscaler_id = hash_file(weights)
    rows = read_jsonl(inputs.images / "manifest.jsonl")
    computed = reused = passed = 0
    out_rows = []
    for row in env.bar(rows, desc="upscale", unit="img"):
        src = inputs.images / row["file"]
        dst = outputs.images / row["file"]
        if not needs_upscale(row["width"], row["height"], min_side):
            materialize(src, dst)
            passed += 1
            out_rows.append({**row, "upscaled_from": None})
            continue
        item = env.store.item(
            "upscaled",
            image=row["pixel_hash"],
            min_side=min_side,
            method=upscaler_id,
            tile=params.tile if params.method == "model" else None,
        )
        entry = item.get(".png")
        if entry is None:
            with PILImage.open(src) as img:
                img = img.convert("RGB")
                if params.method == "model":
                    upscaler = upscaler or load_upscaler(weights, str(resolve_device(params.model.device)))
                    big = model_upscale(img, upscaler, min_side, params.tile)
                else:
                    big = lanczos_upscale(img, min_side)
            entry = item.put(".png", lambda p, im=big: save_png(im, p))
            computed += 1
        else:
            reused += 1
        materialize(entry, dst)
        out_rows.append(upscaled_row(row, entry))
    write_jsonl(outputs.images / "manifest.jsonl", out_rows)
    return {
        "items": len(rows),
        "computed": computed,
        "reused": reused,
        "passed_through": passed,
        "min_side": min_side,
        "method": params.method,
    }
