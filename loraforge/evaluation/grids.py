"""Evaluation grids: an epoch's renders tiled into the weight-sweep, random-prompt and caption
grids, and each fixed prompt across epochs (the 004 guide's side-by-side comparison).

Grids are written to the stage's grids folder and named by what they show; the page links them
by the paths these functions return (relative to the page).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Hashable, Sequence

from PIL import Image, ImageOps

if TYPE_CHECKING:
    from loraforge.evaluation.render import Shots


def open_rgb(path: Path) -> Image.Image:
    """An image file as an RGB PIL image, fully loaded.

    Args:
        path: the file.
    """
    with Image.open(path) as img:
        return img.convert("RGB")


def make_grid(rows: list[list[Image.Image]]) -> Image.Image:
    """Images tiled row by row (each cell the size of the first image; others are resized).

    Args:
        rows: rows of PIL images, all rows the same length.
    """
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * len(rows[0]), h * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            grid.paste(img if img.size == (w, h) else img.resize((w, h)), (c * w, r * h))
    return grid


def sweep_grid(
    fixed: dict[tuple[int, int, float], Path], pairs: list[tuple[int, int]], weights: Sequence[float]
) -> Image.Image:
    """An epoch's weight sweep: rows = (prompt index, seed) pairs, columns = weights.

    Args:
        fixed: the fixed-prompt images by (prompt index, seed, weight).
        pairs: the (prompt index, seed) pairs, in row order.
        weights: the weight sweep, in column order.
    """
    return make_grid([[open_rgb(fixed[(i, s, w)]) for w in weights] for i, s in pairs])


def base_and_lora_grid(images: dict[tuple[Any, float], Path], keys: Sequence[Hashable]) -> Image.Image:
    """Rows = `keys`, columns = weight 0 (the base model) and weight 1.

    Args:
        images: images by (key, weight).
        keys: the row keys, in order.
    """
    return make_grid([[open_rgb(images[(k, w)]) for w in (0.0, 1.0)] for k in keys])


def caption_grid(
    captions: dict[tuple[str, float], Path], ids: list[str], train_images: dict[str, Path], size: int
) -> Image.Image:
    """Training captions prompted 1:1: per row the training image (when known, fitted to
    `size`), then the weight-0 and weight-1 renders of its caption.

    Args:
        captions: the caption renders by (training image id, weight).
        ids: the captioned training images' ids, in row order.
        train_images: training images by id.
        size: the renders' side in pixels.
    """
    rows = [
        [
            *([ImageOps.fit(open_rgb(train_images[i]), (size, size))] if i in train_images else []),
            *(open_rgb(captions[(i, w)]) for w in (0.0, 1.0)),
        ]
        for i in ids
    ]
    return make_grid(rows)


def cross_epoch_grid(per_epoch: list[dict[tuple[int, int], Path]], prompt: int, seeds: Sequence[int]) -> Image.Image:
    """One fixed prompt across epochs: rows = epochs, columns = seeds.

    Args:
        per_epoch: per epoch, in row order, its images by (prompt index, seed) at one weight.
        prompt: the prompt index.
        seeds: the fixed seeds, in column order.
    """
    return make_grid([[open_rgb(shots[(prompt, s)]) for s in seeds] for shots in per_epoch])


def epoch_grids(
    images: dict[str, Any], shots: Shots, name: str, grids: Path, train_images: dict[str, Path], size: int
) -> dict[str, str]:
    """Write the epoch's weight-sweep, random-prompt and caption grids; return their page paths.

    Args:
        images: `render.render_epoch`'s result.
        shots: what was rendered.
        name: the epoch's name (`epoch-0004`).
        grids: the grids folder.
        train_images: training images by id (the first column of the caption grid).
        size: the renders' side in pixels.
    """
    out = {"sweep": f"{name}.png"}
    sweep_grid(images["fixed"], shots.pairs, shots.weights).save(grids / out["sweep"])
    if shots.randoms:
        out["random"] = f"{name}-random.png"
        base_and_lora_grid(images["random"], range(len(shots.randoms))).save(grids / out["random"])
    if shots.captions:
        out["captions"] = f"{name}-captions.png"
        ids = [c["id"] for c in shots.captions]
        caption_grid(images["caption"], ids, train_images, size).save(grids / out["captions"])
    return {k: f"grids/{v}" for k, v in out.items()}


def cross_epoch_grids(shown: dict[str, dict[tuple[int, int], Path]], shots: Shots, grids: Path) -> list[str]:
    """One grid per fixed prompt: rows = epochs, columns = seeds, at `shots.shown_weight` (the 004
    guide's fixed-seed grids; the comparison page shows these side by side); returns their page paths.

    Args:
        shown: per epoch name, the image path per (prompt index, seed) at the shown weight.
        shots: what was rendered.
        grids: the grids folder.
    """
    names = []
    for i in range(len(shots.prompts)):
        name = f"prompt-{i + 1}.png"
        cross_epoch_grid(list(shown.values()), i, shots.seeds).save(grids / name)
        names.append(f"grids/{name}")
    return names
