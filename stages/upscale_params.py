"""The `upscale` section of params.yaml: typed, frozen, validated (no torch, no stage code)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from loraforge.params import ModelParams, section


@section
class Params:
    """The `upscale` section.

    Attributes:
        min_side: images with a shorter side are upscaled; null = the model's native resolution.
        method: `lanczos`, or `model` for an ESRGAN-family network (`model_path`) via spandrel.
        model_path: local weights file for `method: model` (.safetensors; .pth only with `allow_pickle`).
        allow_pickle: allow a pickle `.pth` upscaler file (loaded by spandrel with torch.load).
        tile: tile size in pixels for `method: model`, bounding memory on large images.
    """

    model: ModelParams
    min_side: int | None = Field(None, ge=8)
    method: Literal["lanczos", "model"] = "lanczos"
    model_path: str | None = None
    allow_pickle: bool = False
    tile: int = Field(256, ge=32)
