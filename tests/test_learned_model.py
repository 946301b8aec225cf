"""The shipped learned bases, `builtin:shapes-sdxl` and `builtin:shapes-sd15`: each draws what its
prompts ask for, judged by the shapes world's oracle, on combinations it saw in pretraining and on
ones it never saw."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraforge.models.loading import load_pipeline, resolve_model
from loraforge.pipeline.params import ModelParams
from loraforge.shapes.oracle import read
from loraforge.shapes.world import HELD_OUT, Scene, combinations, scenes
from tests.helpers import one_torch_thread

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def single_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module", params=["sdxl", "sd15"])
def shapes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    import torch

    info = resolve_model(ModelParams(base=f"builtin:shapes-{request.param}"), tmp_path_factory.mktemp("state"))
    pipe = load_pipeline(info, torch.device("cpu"))
    pipe.set_progress_bar_config(disable=True)
    return info, pipe


def render(pipe, prompts: list[str], seed: int = 0, guidance: float = 6.0) -> list:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return pipe(
        prompts, num_inference_steps=20, guidance_scale=guidance, height=128, width=128, generator=generator
    ).images


def accuracy(group: list[Scene], images: list) -> dict[str, float]:
    readings = [read(image) for image in images]
    n = len(group)
    return {
        "colour": sum(r.colour == s.colour for r, s in zip(readings, group)) / n,
        "background": sum(r.background == s.background for r, s in zip(readings, group)) / n,
        "shape": sum(r.shape == s.shape for r, s in zip(readings, group)) / n,
        "style": sum(r.style for r in readings) / n,
    }


def test_it_is_shipped_as_a_small_fp16_diffusers_folder_that_names_its_recipe(shapes):
    from safetensors import safe_open

    info, _ = shapes
    folder = Path(info.path)
    weights = sorted(folder.rglob("*.safetensors"))
    encoders = {"text_encoder", "text_encoder_2"} if info.arch == "sdxl" else {"text_encoder"}
    assert {w.parent.name for w in weights} == {"unet", "vae", *encoders}
    assert sum(w.stat().st_size for w in weights) < 5 * 2**20
    for w in weights:
        with safe_open(str(w), "pt") as f:
            assert f.metadata()["recipe"] == "scripts/pretrain_shapes.py"
            assert str(f.get_tensor(next(iter(f.keys()))).dtype) == "torch.float16"
    assert info.arch in ("sdxl", "sd15") and Path(info.path).name == f"shapes-{info.arch}"
    assert info.native_resolution == 128


# The least share of renders with the right shape colour and background, per model: (seen, held out).
# Measured over all 84 seen combinations at guidance 5 and 7 (20 Euler steps): sdxl 0.99-1.0 each,
# held out 1.0; sd15 (10,000 steps) colour 0.90-0.93, background 0.86-0.88, held out 0.79-0.83.
# The tests render 12 seen and 4 held-out scenes, so their thresholds leave room for that noise.
LEAST = {"sdxl": (0.8, 0.8), "sd15": (0.75, 0.5)}


def test_it_draws_the_colours_and_shapes_its_prompts_name(shapes):
    info, pipe = shapes
    seen = list(scenes(31, 12, held_out=False))
    result = accuracy(seen, render(pipe, [s.caption for s in seen]))
    least = LEAST[info.arch][0]
    assert result["colour"] >= least and result["background"] >= least and result["shape"] >= 0.8, result
    assert result["style"] < 0.1  # the demo's style is not in the world it learned


def test_it_composes_combinations_it_never_saw(shapes):
    info, pipe = shapes
    held = [Scene(*combo) for combo in sorted(HELD_OUT)]
    assert not set(combinations(False)) & HELD_OUT
    result = accuracy(held, render(pipe, [s.caption for s in held], seed=1))
    least = LEAST[info.arch][1]
    assert result["colour"] >= least and result["background"] >= least, result


def test_the_prompt_decides_what_is_drawn_not_the_seed(shapes):
    info, pipe = shapes
    red_on_blue, blue_on_red = Scene("circle", "red", "blue"), Scene("circle", "blue", "red")
    images = render(pipe, [red_on_blue.caption, blue_on_red.caption], seed=5)
    assert read(images[0]).faithful_to(red_on_blue) and read(images[1]).faithful_to(blue_on_red)
