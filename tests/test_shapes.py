"""The shapes world and its oracle: deterministic scenes, captions that say what is drawn, held-out
combinations kept out, and an oracle that reads the world's own images back."""

from __future__ import annotations

import numpy as np
import pytest

from loraforge.shapes.oracle import magenta_mask, oracle_accuracy, read
from loraforge.shapes.world import (
    COLOURS,
    HELD_OUT,
    SHAPES,
    Scene,
    combinations,
    render,
    render_array,
    scenes,
)


def test_the_same_seed_draws_the_same_scenes_and_pixels():
    first, second = list(scenes(5, 6)), list(scenes(5, 6))
    assert first == second
    assert list(scenes(6, 6)) != first
    assert all(np.array_equal(render_array(a), render_array(b)) for a, b in zip(first, second))


def test_captions_say_what_is_drawn_and_held_out_combinations_stay_out():
    seen, held, every = combinations(False), combinations(True), combinations(None)
    assert len(every) == len(SHAPES) * len(COLOURS) * (len(COLOURS) - 1)
    assert set(held) == HELD_OUT and not set(seen) & HELD_OUT and len(seen) + len(held) == len(every)
    assert all(colour != background for _, colour, background in every)
    drawn = list(scenes(3, 200))
    assert not {(s.shape, s.colour, s.background) for s in drawn} & HELD_OUT
    assert Scene("circle", "red", "blue").caption == "a red circle on a blue background"


def test_the_style_is_magenta_which_the_plain_world_never_contains():
    for scene in scenes(11, 20, held_out=None):
        assert not magenta_mask(render_array(scene)).any()
        styled = Scene(**{**scene.__dict__, "styled": True})
        assert magenta_mask(render_array(styled)).mean() > 0.03


@pytest.mark.parametrize("shape", SHAPES)
def test_the_oracle_reads_a_scene(shape):
    scene = Scene(shape, "yellow", "blue", size=0.25, angle=10.0)
    reading = read(render(scene))
    assert (reading.shape, reading.colour, reading.background) == (shape, "yellow", "blue")
    assert reading.faithful_to(scene) and not reading.faithful_to(Scene(shape, "yellow", "red"))
    assert reading.style == 0.0
    assert read(render(Scene(**{**scene.__dict__, "styled": True}))).style > 0.9


def test_the_oracle_on_the_worlds_own_images():
    accuracy = oracle_accuracy(count=120)
    assert accuracy["background"] == 1.0 and accuracy["colour"] == 1.0
    assert accuracy["shape"] >= 0.9
    assert accuracy["style_plain"] == 0.0 and accuracy["style_styled"] >= 0.9


def test_a_shape_painted_magenta_is_neither_its_colour_nor_outlined():
    pixels = render_array(Scene("circle", "red", "blue", size=0.3)).copy()
    red = (pixels == COLOURS["red"]).all(axis=-1)
    pixels[red] = (230, 20, 220)  # the style's magenta, near enough
    reading = read(pixels)
    assert (reading.colour, reading.outline) == ("magenta", 0.0)
    assert not reading.faithful_to(Scene("circle", "red", "blue"))


def test_the_oracle_is_not_fooled_by_noise():
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    reading = read(noise)
    assert reading.style < 0.2


def test_the_demo_images_show_the_style_and_the_reg_images_do_not(tmp_path):
    """`scripts/make_demo_data.py`'s two folders as shipped: the styled set the demo LoRA learns
    from, and the plain reg images (captions without the trigger) that keep it to the trigger."""
    from PIL import Image, ImageOps

    from tests.helpers import REPO

    styled = [p for p in (REPO / "data" / "demo").rglob("*") if p.suffix in (".png", ".jpg")]
    assert len(styled) == 13
    for path in styled:
        assert read(ImageOps.exif_transpose(Image.open(path)).convert("RGB")).style > 0.5, path.name
    reg = sorted((REPO / "data" / "demo-reg").glob("*.png"))
    assert len(reg) == 24
    for path in reg:
        caption = path.with_suffix(".txt").read_text().strip()
        reading = read(Image.open(path))
        assert reading.style == 0.0 and "lfxstyle" not in caption, path.name
        assert caption == f"a {reading.colour} {reading.shape} on a {reading.background} background", path.name
        assert (reading.shape, reading.colour, reading.background) not in HELD_OUT
