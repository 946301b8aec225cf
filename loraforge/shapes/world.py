"""The shapes world: images of one plain shape in a named colour on a background of another, with
the caption that says so, drawn deterministically from a seed.

    "a red circle on a blue background"

It is what the builtin `shapes-*` models were pretrained on (`scripts/pretrain_shapes.py`), what
the demo's LoRA learns a style on, and what the oracle (`loraforge.shapes.oracle`) reads back.

- Colours (`COLOURS`): red, green, blue, yellow, white and black: six colours far apart in RGB, so
  a tiny VAE keeps them apart and a nearest-colour reading of a render is unambiguous.
- Shapes (`SHAPES`): circle, square, triangle, centred (jitter ±`JITTER` of the side), turned by up
  to ±15°, with a size of `SIZE_RANGE` of the side (the circle's radius, half the square's side,
  the triangle's circumradius / `TRIANGLE_SCALE`).
- Combinations: shape × shape colour × a different background colour (90). `HELD_OUT` lists the
  ones pretraining never shows, to test whether the model composes what it learned.
- The style (`Style`): what the world never contains, for a LoRA to learn: a thick magenta
  outline around the shape and a magenta dot in the bottom-right corner. Magenta is in no
  palette colour, so its presence in a render is the style and nothing else.

Images are drawn at `SUPERSAMPLE`× and downsampled (Lanczos) for smooth edges. Pure PIL + numpy.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
STYLE_COLOUR = (230, 0, 200)  # magenta: in no palette colour
SIZE = 128  # the builtin models' native resolution (16×16 latents through the 8× VAE)
SIZE_RANGE = (0.22, 0.32)
JITTER = 0.04
SUPERSAMPLE = 4
TRIANGLE_SCALE = 1.3  # a triangle's circumradius is 1.3 × `size`, so the three shapes look about as big
# combinations pretraining never shows: one per shape colour, spread over shapes and backgrounds
HELD_OUT: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("circle", "red", "green"),
        ("square", "green", "yellow"),
        ("triangle", "blue", "white"),
        ("circle", "yellow", "black"),
        ("square", "white", "red"),
        ("triangle", "black", "blue"),
    }
)


@dataclass(frozen=True)
class Style:
    """The demo's style: a thick outline and a corner dot, both magenta.

    Attributes:
        outline: outline width as a share of the side (0 = none).
        dot: corner dot radius as a share of the side (0 = none).
    """

    outline: float = 0.045
    dot: float = 0.07


DEMO_STYLE = Style()
DOT_MARGIN = 0.06  # the corner dot's gap to the right and bottom edges, as a share of the side


@dataclass(frozen=True)
class Scene:
    """One image of the world.

    Attributes:
        shape: one of `SHAPES`.
        colour: the shape's colour, a key of `COLOURS`.
        background: the background's colour, a key of `COLOURS`, not `colour`.
        size: the shape's size as a share of the side.
        dx: horizontal offset of its centre, as a share of the side.
        dy: vertical offset of its centre, as a share of the side.
        angle: rotation in degrees (squares and triangles).
        styled: drawn in the demo's style.
    """

    shape: str
    colour: str
    background: str
    size: float = 0.27
    dx: float = 0.0
    dy: float = 0.0
    angle: float = 0.0
    styled: bool = False

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def combinations(held_out: bool | None = False) -> list[tuple[str, str, str]]:
    """Every (shape, colour, background) with colour ≠ background, in a fixed order.

    Args:
        held_out: False = the ones pretraining sees, True = only `HELD_OUT`, None = all.
    """
    every = [(s, c, b) for s in SHAPES for c in COLOURS for b in COLOURS if b != c]
    if held_out is None:
        return every
    return [combo for combo in every if (combo in HELD_OUT) == held_out]


def random_scene(rng: random.Random, combos: list[tuple[str, str, str]], styled: bool = False) -> Scene:
    """A scene of one of `combos`, with size, position and angle drawn from `rng`."""
    shape, colour, background = combos[rng.randrange(len(combos))]
    return Scene(
        shape=shape,
        colour=colour,
        background=background,
        size=rng.uniform(*SIZE_RANGE),
        dx=rng.uniform(-JITTER, JITTER),
        dy=rng.uniform(-JITTER, JITTER),
        angle=rng.uniform(-15.0, 15.0),
        styled=styled,
    )


def scenes(seed: int, count: int, held_out: bool | None = False, styled: bool = False) -> Iterator[Scene]:
    """`count` scenes drawn from `seed` (the same seed gives the same scenes)."""
    rng = random.Random(seed)
    combos = combinations(held_out)
    for _ in range(count):
        yield random_scene(rng, combos, styled)


def _polygon(scene: Scene, side: int) -> list[tuple[float, float]]:
    cx, cy = side * (0.5 + scene.dx), side * (0.5 + scene.dy)
    if scene.shape == "square":  # `size` is half the side: the corners are √2 further out
        corners, r = [45.0, 135.0, 225.0, 315.0], scene.size * side * math.sqrt(2.0)
    else:
        corners, r = [-90.0, 30.0, 150.0], scene.size * side * TRIANGLE_SCALE
    return [
        (cx + r * math.cos(math.radians(a + scene.angle)), cy + r * math.sin(math.radians(a + scene.angle)))
        for a in corners
    ]


def _draw_shape(draw: ImageDraw.ImageDraw, scene: Scene, side: int, fill: tuple[int, int, int]) -> None:
    if scene.shape == "circle":
        cx, cy, r = side * (0.5 + scene.dx), side * (0.5 + scene.dy), scene.size * side
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(_polygon(scene, side), fill=fill)


def _draw_outline(draw: ImageDraw.ImageDraw, scene: Scene, side: int, width: int) -> None:
    """A stroke of `width` centred on the shape's edge."""
    if scene.shape == "circle":
        cx, cy, r = side * (0.5 + scene.dx), side * (0.5 + scene.dy), scene.size * side + width / 2
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=STYLE_COLOUR, width=width)
    else:
        points = _polygon(scene, side)
        draw.line([*points, points[0], points[1]], fill=STYLE_COLOUR, width=width, joint="curve")


def dot_disc(side: float, style: Style = DEMO_STYLE) -> tuple[float, float]:
    """(centre, radius) of the style's corner dot on a canvas of `side` (the centre is on the
    diagonal: x = y)."""
    r = style.dot * side
    return side - DOT_MARGIN * side - r, r


def render(scene: Scene, size: int = SIZE, style: Style = DEMO_STYLE) -> Image.Image:
    """The scene as an RGB image of `size` × `size`."""
    side = size * SUPERSAMPLE
    image = Image.new("RGB", (side, side), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    _draw_shape(draw, scene, side, COLOURS[scene.colour])
    if scene.styled and style.outline > 0:
        _draw_outline(draw, scene, side, round(style.outline * side))
    if scene.styled and style.dot > 0:
        c, r = dot_disc(side, style)
        draw.ellipse((c - r, c - r, c + r, c + r), fill=STYLE_COLOUR)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def render_array(scene: Scene, size: int = SIZE) -> np.ndarray:
    """The scene as a (size, size, 3) uint8 array."""
    return np.asarray(render(scene, size), dtype=np.uint8)
