"""The `latents` section of params.yaml: typed, frozen, validated (no torch, no stage code)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from loraforge.pipeline.params import ModelParams, section


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
