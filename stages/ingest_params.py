"""The `ingest` section of params.yaml: typed, frozen, validated (no torch, no stage code)."""

from __future__ import annotations

from pydantic import Field

from loraforge.pipeline.params import DatasetParams, ModelParams, section


@section
class Params:
    """The `ingest` section of params.yaml.

    Attributes:
        source: folder of source images, relative to the project root.
        max_reject_ratio: stop the run when rejected files / all image files exceeds this.
        background: `#rrggbb` colour that transparent pixels are flattened onto (the alpha channel
            itself becomes the image's mask for `finetune.masked_loss` unless a `<stem>-mask.png`
            beside the image gives one; kohya's `alpha_mask`).
        dedupe: drop exact duplicates (same decoded pixels and size), keeping the first by path.
        clean_adversarial: run the anti-AI-filter cleanup (003 guide) on every image; off by default
            because it slightly softens every image.
        follow_symlinks: use files and folders that symlinks inside the source folder point at
            outside it; off: such links are rejected with the reason (links within the folder are
            always followed).
        max_pixels: images above this many pixels are rejected with the reason before decoding
            (100 MP ≈ 10000 × 10000; Pillow itself refuses files over ~179 MP as decompression bombs).
        dataset: the shared `dataset` section (DSB, tiling, quality gates).
        model: the shared `model` section (only `base`, for the minimum-resolution gate).
    """

    source: str = Field("data/demo", min_length=1)
    max_reject_ratio: float = Field(0.2, ge=0, le=1)
    background: str = Field("#ffffff", pattern=r"^#[0-9a-fA-F]{6}$")
    dedupe: bool = True
    clean_adversarial: bool = False
    follow_symlinks: bool = False
    max_pixels: int = Field(100_000_000, ge=1)
    dataset: DatasetParams = Field(default_factory=DatasetParams)
    model: ModelParams = Field(default_factory=ModelParams)
