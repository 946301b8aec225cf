"""The shapes world's oracle: what an image of that world shows, read off its pixels.

For tests and benchmarks of the builtin `shapes-*` models (the evaluate stage never uses it):

- background colour: the per-channel median of the outer ring of the image (`RING` wide), named
  by the nearest colour of `COLOURS`;
- shape colour: the median of a central disc (radius `CORE` of the side: inside every shape
  whatever its size, position and angle), named likewise, or `magenta` when it is the style's
  colour (a model that paints the whole shape magenta has drawn neither the colour nor the
  outline: outline 0);
- shape: from the pixels nearer the shape colour than the background (`shape_mask`), the ratio of
  their area to the disc through their farthest pixel: 1 for a circle, 2/π ≈ 0.64 for a square,
  ≈ 0.41 for a triangle (rotation-invariant);
- style: `outline`, the share of `RAYS` rays from the shape's centroid whose first pixel past the
  shape colour is magenta within `EDGE_SEARCH` of the side; `dot`, the magenta share of the
  corner dot's disc; `style` their mean (0 = none, 1 = the demo's style in full).

`oracle_accuracy` checks it on the world's own images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from loraforge.shapes.world import COLOURS, DEMO_STYLE, STYLE_COLOUR, Scene, Style, dot_disc, render_array, scenes

RING = 0.05
CORE = 0.07
RAYS = 32
EDGE_SEARCH = 0.08
MAGENTA_DISTANCE = 90.0  # RGB distance under which a pixel counts as the style's magenta
_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _NAMES], dtype=np.float32)  # (6, 3)


@dataclass(frozen=True)
class Reading:
    """What the oracle reads off one image.

    Attributes:
        background: the nearest palette colour of the border.
        colour: the nearest palette colour of the centre; `magenta` when the centre is the
            style's magenta (a shape painted over is neither its colour nor outlined).
        shape: `circle`, `square`, `triangle`, or `none` when no shape stands out.
        outline: share of the shape's edge outlined in magenta, in [0, 1].
        dot: magenta share of the corner dot's place, in [0, 1].
    """

    background: str
    colour: str
    shape: str
    outline: float
    dot: float

    @property
    def style(self) -> float:
        return (self.outline + self.dot) / 2

    def faithful_to(self, scene: Scene) -> bool:
        """Shape colour and background colour as the scene's caption says."""
        return self.colour == scene.colour and self.background == scene.background


def nearest_colour(rgb: np.ndarray) -> str:
    """The palette name nearest to one RGB triple."""
    return _NAMES[int(np.argmin(np.linalg.norm(_PALETTE - rgb.astype(np.float32), axis=1)))]


def magenta_mask(pixels: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels nearer the style's magenta than every palette colour, and near it."""
    flat = pixels.astype(np.float32)
    to_style = np.linalg.norm(flat - np.array(STYLE_COLOUR, dtype=np.float32), axis=-1)
    to_palette = np.linalg.norm(flat[..., None, :] - _PALETTE, axis=-1).min(axis=-1)
    return (to_style < to_palette) & (to_style < MAGENTA_DISTANCE)


def _ring_median(pixels: np.ndarray) -> np.ndarray:
    w = max(1, round(RING * pixels.shape[0]))
    ring = np.concatenate(
        [
            pixels[:w].reshape(-1, 3),
            pixels[-w:].reshape(-1, 3),
            pixels[:, :w].reshape(-1, 3),
            pixels[:, -w:].reshape(-1, 3),
        ]
    )
    return np.median(ring, axis=0)


def _core_median(pixels: np.ndarray) -> np.ndarray:
    side = pixels.shape[0]
    yy, xx = np.mgrid[:side, :side]
    core = (xx - side / 2 + 0.5) ** 2 + (yy - side / 2 + 0.5) ** 2 <= (CORE * side) ** 2
    return np.median(pixels[core], axis=0)


def shape_mask(pixels: np.ndarray, colour: str, background: str) -> np.ndarray:
    """(H, W) bool: pixels nearer `colour` than `background`, magenta ones excluded."""
    flat = pixels.astype(np.float32)
    near_shape = np.linalg.norm(flat - np.array(COLOURS[colour], dtype=np.float32), axis=-1)
    near_background = np.linalg.norm(flat - np.array(COLOURS[background], dtype=np.float32), axis=-1)
    return (near_shape < near_background) & ~magenta_mask(pixels)


def classify_shape(mask: np.ndarray) -> str:
    """`circle`, `square` or `triangle` from the mask's area over the disc through its farthest
    pixel; `none` for a mask of under 2% of the image."""
    ys, xs = np.nonzero(mask)
    if len(xs) < 0.02 * mask.size:
        return "none"
    cy, cx = ys.mean(), xs.mean()
    reach = np.sqrt((ys - cy) ** 2 + (xs - cx) ** 2).max() + 0.5
    fill = len(xs) / (math.pi * reach**2)
    if fill > 0.80:
        return "circle"
    return "square" if fill > 0.52 else "triangle"


def outline_share(mask: np.ndarray, magenta: np.ndarray) -> float:
    """Share of `RAYS` rays from the mask's centroid that meet magenta just past the shape."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return 0.0
    side = mask.shape[0]
    cy, cx = ys.mean(), xs.mean()
    search = max(2, round(EDGE_SEARCH * side))
    hits = 0
    for k in range(RAYS):
        dy, dx = math.sin(2 * math.pi * k / RAYS), math.cos(2 * math.pi * k / RAYS)
        r = 0
        while True:  # walk out to the first pixel outside the shape
            y, x = round(cy + r * dy), round(cx + r * dx)
            if not (0 <= y < side and 0 <= x < side) or not mask[y, x]:
                break
            r += 1
        ahead = [(round(cy + (r + j) * dy), round(cx + (r + j) * dx)) for j in range(search)]
        hits += any(0 <= y < side and 0 <= x < side and magenta[y, x] for y, x in ahead)
    return hits / RAYS


def dot_share(magenta: np.ndarray, style: Style = DEMO_STYLE) -> float:
    """Magenta share of the inner 80% of the corner dot's disc (where `world.render` paints it)."""
    side = magenta.shape[0]
    centre, r = dot_disc(side, style)
    yy, xx = np.mgrid[:side, :side]
    disc = (xx + 0.5 - centre) ** 2 + (yy + 0.5 - centre) ** 2 <= (0.8 * r) ** 2
    return float(magenta[disc].mean())


def read(image: Image.Image | np.ndarray) -> Reading:
    """What `image` (RGB) shows; a non-square image is read in its central square (where the demo
    images centre their scene on a wider field)."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)[..., :3]
    h, w = pixels.shape[:2]
    side = min(h, w)
    pixels = pixels[(h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
    background = nearest_colour(_ring_median(pixels))
    core = _core_median(pixels)
    magenta = magenta_mask(pixels)
    if magenta_mask(core[None, None, :])[0, 0]:  # a magenta shape: no palette colour, and not an outline
        return Reading(background, "magenta", "none", 0.0, dot_share(magenta))
    colour = nearest_colour(core)
    if colour == background:
        return Reading(background, colour, "none", 0.0, dot_share(magenta))
    mask = shape_mask(pixels, colour, background)
    return Reading(background, colour, classify_shape(mask), outline_share(mask, magenta), dot_share(magenta))


def oracle_accuracy(count: int = 300, seed: int = 7) -> dict[str, float]:
    """The oracle on the world's own images, half of them styled: the share read right of each
    attribute, and the mean style score of plain and styled images."""
    plain = list(scenes(seed, count // 2, held_out=None))
    styled = list(scenes(seed + 1, count - count // 2, held_out=None, styled=True))
    readings = [(s, read(render_array(s))) for s in plain + styled]
    return {
        "background": float(np.mean([r.background == s.background for s, r in readings])),
        "colour": float(np.mean([r.colour == s.colour for s, r in readings])),
        "shape": float(np.mean([r.shape == s.shape for s, r in readings])),
        "style_plain": float(np.mean([r.style for s, r in readings if not s.styled])),
        "style_styled": float(np.mean([r.style for s, r in readings if s.styled])),
    }
