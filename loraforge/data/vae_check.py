"""The VAE reconstruction check (003 guide): what the training VAE cannot carry.

The model only ever sees an image through its VAE: details that do not survive
decode(encode(x)) (eyes, small text, fine line work) cannot be learned, however long you train.
Per image we decode the cached latent, measure PSNR against the exact crop that was encoded, find
the window where the reconstruction is worst, and save that window side by side (original |
reconstruction | error) so the user sees which details will be lost before training.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

from loraforge.data.measures import psnr

PANEL_MIN_SIDE = 192  # small crops are enlarged (nearest) so single pixels stay visible
MAX_DB = 100.0  # identical images: reported as 100 dB, not infinity (JSON has no inf)


def window_mse(error: np.ndarray, size: int) -> np.ndarray:
    """Mean of `error` over every `size`×`size` window (valid positions only), by integral image.

    Args:
        error: (H, W) per-pixel squared error.
        size: window side in pixels, at most min(H, W).
    """
    integral = np.pad(error, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    sums = integral[size:, size:] - integral[:-size, size:] - integral[size:, :-size] + integral[:-size, :-size]
    return sums / (size * size)


def worst_window(
    original: Image.Image, reconstruction: Image.Image, size: int
) -> tuple[tuple[int, int, int, int], float]:
    """The window with the largest reconstruction error: its box (left, top, right, bottom) and PSNR.

    Args:
        original: the encoded crop.
        reconstruction: decode(encode(original)), same size.
        size: wanted window side; clipped to the image.
    """
    x = np.asarray(original.convert("RGB"), dtype=np.float64)
    y = np.asarray(reconstruction.convert("RGB"), dtype=np.float64)
    side = max(1, min(size, x.shape[0], x.shape[1]))
    means = window_mse(((x - y) ** 2).mean(axis=2), side)
    top, left = np.unravel_index(int(np.argmax(means)), means.shape)
    mse = float(means[top, left])
    db = MAX_DB if mse == 0 else min(MAX_DB, 10 * math.log10(255.0**2 / mse))
    return (int(left), int(top), int(left) + side, int(top) + side), db


def side_by_side(original: Image.Image, reconstruction: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """Original | reconstruction | error (absolute difference, amplified 4×) of one window,
    enlarged with nearest-neighbour so the lost pixels stay visible.

    Args:
        original: the encoded crop.
        reconstruction: its reconstruction.
        box: the window (left, top, right, bottom).
    """
    a, b = original.convert("RGB").crop(box), reconstruction.convert("RGB").crop(box)
    diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max(axis=2)
    error = Image.fromarray(np.clip(diff * 4, 0, 255).astype(np.uint8)).convert("RGB")
    scale = max(1, math.ceil(PANEL_MIN_SIDE / max(a.size)))
    panels = [p.resize((a.width * scale, a.height * scale), Image.Resampling.NEAREST) for p in (a, b, error)]
    gap = 4
    sheet = Image.new("RGB", (3 * panels[0].width + 2 * gap, panels[0].height), (255, 255, 255))
    for i, panel in enumerate(panels):
        sheet.paste(panel, (i * (panel.width + gap), 0))
    return sheet


def tensor_to_image(sample: Any) -> Image.Image:
    """A decoded (3, H, W) tensor in [-1, 1] as an 8-bit RGB image (rounded like a saved PNG)."""
    array = ((sample.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def decode_latent(vae: Any, latent: Any) -> Image.Image:
    """decode() of one cached (unscaled) posterior mean, as an image.

    Args:
        vae: the training VAE.
        latent: (4, h, w) float tensor, as the latents stage stores it.
    """
    import torch

    with torch.inference_mode():
        sample = vae.decode(latent[None].to(vae.device, vae.dtype)).sample[0]
    return tensor_to_image(sample)


def check(original: Image.Image, reconstruction: Image.Image, window: int) -> tuple[dict[str, Any], Image.Image]:
    """PSNR of the whole image and of its worst window, and the side-by-side sheet of that window.

    Args:
        original: the encoded crop.
        reconstruction: its reconstruction.
        window: worst-window side in pixels.
    """
    box, window_db = worst_window(original, reconstruction, window)
    stats = {
        "psnr_db": round(min(MAX_DB, psnr(original, reconstruction)), 2),
        "worst_window": list(box),
        "worst_window_psnr_db": round(window_db, 2),
    }
    return stats, side_by_side(original, reconstruction, box)
