"""The `upscale` section of params.yaml: typed, frozen, validated (no torch, no stage code)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from loraforge.pipeline.params import ModelParams, section


@section
class Params:
    """The `upscale` section.

    Attributes:
        min_side: images with a shorter side are upscaled; null = the model's native resolution.
        method: `lanczos`, or `model` for an ESRGAN-family network (`model_path`) via spandrel.
        model_path: weights file for `method: model`, relative to the project: any single-image
            super-resolution architecture spandrel reads (ESRGAN, RealESRGAN, SwinIR, SPAN...);
            .safetensors, or .pth only with `allow_pickle`. Its content is part of the cache key.
        allow_pickle: allow a pickle `.pth` upscaler file (read with torch.load(weights_only=True)).
        tile: tile size in pixels for `method: model`, bounding memory on large images.
        tile_overlap: pixels of context added around each tile and cropped off after (the
            network's receptive field: without it, tile borders show seams).
    """

    model: ModelParams
    min_side: int | None = Field(None, ge=8)
    method: Literal["lanczos", "model"] = "lanczos"
    model_path: str | None = None
    allow_pickle: bool = False
    tile: int = Field(256, ge=32)
    tile_overlap: int = Field(16, ge=0, le=256)
