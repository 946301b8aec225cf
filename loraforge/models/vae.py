"""VAE encoding of training images: the pixels the UNet learns from, as latents.

The latents stage and prior preservation's regularisation images both encode through here, so a
crop and its latent are made the same way wherever they come from.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def image_to_tensor(image: Any, flip: bool) -> torch.Tensor:
    """PIL RGB image -> (3, H, W) float tensor in [-1, 1], optionally mirrored."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    if flip:
        array = array[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


def encode_batch(vae: Any, images: list[Any], flips: list[bool], dtype: torch.dtype) -> torch.Tensor:
    """VAE posterior means for same-size images: (B, 4, H/8, W/8), unscaled (the trainer applies
    `scaling_factor`). The mean, not a sample, so a cached latent is deterministic.

    Args:
        vae: the diffusers AutoencoderKL.
        images: PIL RGB images of one size.
        flips: mirror each image first.
        dtype: the VAE's dtype.
    """
    batch = torch.stack([image_to_tensor(im, f) for im, f in zip(images, flips)]).to(vae.device, dtype)
    with torch.inference_mode():
        return vae.encode(batch).latent_dist.mean.float().cpu()


def latent_mask(mask: Any, flip: bool, size: tuple[int, int]) -> torch.Tensor:
    """A mask on the latent grid: (1, h, w) float32 in [0, 1], each cell the mean of the mask
    pixels it covers (area average), mirrored like its image with `flip`.

    Args:
        mask: PIL "L" image of the bucket crop's size (255 = train on this pixel).
        flip: mirror it (as `image_to_tensor` mirrors the image).
        size: (h, w) of the latent grid (the crop's size / 8).
    """
    pixels = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]  # (1, 1, H, W)
    grid = F.adaptive_avg_pool2d(pixels, size)[0].clamp(0, 1)  # (1, h, w)
    return torch.flip(grid, dims=[-1]).contiguous() if flip else grid.contiguous()
