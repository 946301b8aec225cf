"""Aspect-ratio buckets (kohya's scheme): every image trains at the bucket closest to its shape.

A bucket is (width, height) in pixels, both multiples of `step`, with area ≤ resolution². The
latents stage assigns each image its bucket; prior preservation's regularisation images go
through the same `BucketGrid`, which the latents stage records beside its latents
(`buckets.json`), so both always agree.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from loraforge.errors import MissingInput

Bucket = tuple[int, int]  # (width, height) in pixels
GRID_FILE = "buckets.json"


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


@dataclass(frozen=True)
class BucketGrid:
    """The bucket settings of a run, resolved (no nulls left).

    Attributes:
        resolution: bucket area = resolution² (the model's native side by default).
        step: sides are multiples of this.
        min_side: the smallest side a bucket may have.
        max_side: the largest side a bucket may have.
    """

    resolution: int
    step: int
    min_side: int
    max_side: int

    @classmethod
    def resolve(cls, resolution: int, step: int, min_side: int | None, max_side: int | None) -> BucketGrid:
        """Fill the defaults: min side = max(step, resolution / 2), max side = 2 × resolution."""
        return cls(resolution, step, min_side or max(step, resolution // 2), max_side or 2 * resolution)

    def buckets(self) -> list[Bucket]:
        """All buckets of the grid, sorted by aspect ratio."""
        return make_buckets(self.resolution, self.step, self.min_side, self.max_side)

    def select(self, width: int, height: int) -> Bucket:
        """The bucket of a `width`×`height` image."""
        return select_bucket(width, height, self.buckets(), self.resolution, self.step)

    def save(self, folder: Path) -> None:
        """Write `<folder>/buckets.json`."""
        (Path(folder) / GRID_FILE).write_text(json.dumps(asdict(self), sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> BucketGrid:
        """Read `<folder>/buckets.json` (written by the latents stage)."""
        path = Path(folder) / GRID_FILE
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise MissingInput(f"{path} not found: rerun the latents stage (`dvc repro latents`)") from None
