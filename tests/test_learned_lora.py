"""issue 22: a LoRA that learned something. The demo's recipe (params.yaml: the magenta-outline
style of data/demo/, the trigger last, the plain data/demo-reg/ images as prior preservation) on the
learned `builtin:shapes-sdxl`, shortened for CI, judged by the shapes world's oracle: the style
comes with the trigger, prompts without it stay the base model's, and extraction at full rank gives
back the finetuned model's images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from loraforge.pipeline.runner import run_stage
from loraforge.shapes.oracle import read
from loraforge.shapes.world import Scene, scenes
from tests.helpers import REPO, make_project, one_torch_thread

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]

TRIGGER = yaml.safe_load((REPO / "params.yaml").read_text())["caption"]["trigger"]
EPOCHS = 80  # the demo's 160, halved: the style is plain by then (benchmarks/quality.py has the curve)
SEEN = list(scenes(21, 8, held_out=False))  # prompts of combinations the base model was pretrained on
BASE = "loraforge/assets/builtin/shapes-sdxl"


@pytest.fixture(scope="module")
def single_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo project through extract, one saved epoch, extracted at full rank in float32."""
    params = {
        "finetune": {"epochs": EPOCHS, "save_every_n_epochs": EPOCHS},
        "extract": {"dim": 4096, "conv_dim": 4096, "save_dtype": "float32"},
        "evaluate": {"seeds": [1], "weights": [0.0, 1.0], "random_prompts": 0, "caption_prompts": 1, "steps": 15},
    }
    project = make_project(tmp_path_factory.mktemp("learned") / "project", params, git=False, learned=True)
    for stage in ("ingest", "upscale", "caption", "latents", "finetune", "extract"):
        run_stage(project, stage)
    return project


@pytest.fixture(scope="module")
def pipe():
    import torch
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(REPO / BASE, torch_dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def render(pipe, prompts: list[str], weight: float | None = None) -> list:
    import torch

    extra = {} if weight is None else {"cross_attention_kwargs": {"scale": weight}}
    generator = torch.Generator().manual_seed(0)
    return pipe(
        prompts, num_inference_steps=20, guidance_scale=6.0, height=128, width=128, generator=generator, **extra
    ).images


def style(images: list) -> float:
    return float(np.mean([read(image).style for image in images]))


def faithfulness(images: list, group: list[Scene]) -> float:
    return float(np.mean([read(image).faithful_to(scene) for image, scene in zip(images, group)]))


def pixels(images: list) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.float32) for image in images])


def triggered(group: list[Scene]) -> list[str]:
    return [f"{scene.caption}, {TRIGGER}" for scene in group]


@pytest.fixture(scope="module")
def lora(trained: Path, pipe):
    path = trained / "models" / "extracted" / f"lora-epoch-{EPOCHS:04d}.safetensors"
    base_images = {"trigger": render(pipe, triggered(SEEN)), "plain": render(pipe, [s.caption for s in SEEN])}
    pipe.load_lora_weights(str(path))
    yield path, base_images
    pipe.unload_lora_weights()


def test_the_style_comes_with_the_trigger_at_weight_1_and_weight_0_is_the_base_model(lora, pipe):
    _, base = lora
    at_0, at_1 = render(pipe, triggered(SEEN), 0.0), render(pipe, triggered(SEEN), 1.0)
    assert np.array_equal(pixels(at_0), pixels(base["trigger"]))  # weight 0 = the base model, exactly
    assert style(base["plain"]) < 0.05  # the base model never draws the style
    # measured on these prompts: 0.00 -> 0.14 at epoch 80 (0.21 at the demo's 160)
    assert style(at_1) >= style(at_0) + 0.08, (style(at_0), style(at_1))


def test_prompts_without_the_trigger_stay_the_base_models(lora, pipe):
    _, base = lora
    plain = [s.caption for s in SEEN]
    at_1 = render(pipe, plain, 1.0)
    assert style(at_1) <= 0.06, style(at_1)  # measured 0.01; without the reg images about 0.6
    # the colours the prompts ask for (measured: 0.88 with the LoRA, 1.0 without)
    assert faithfulness(at_1, SEEN) >= faithfulness(base["plain"], SEEN) - 0.25


def test_extraction_at_full_rank_gives_the_finetuned_models_images(trained: Path, lora, pipe):
    from safetensors.torch import load_file

    prompts = triggered(SEEN[:4])
    with_lora = pixels(render(pipe, prompts, 1.0))
    pipe.unload_lora_weights()
    original = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    tuned = load_file(trained / "models" / "checkpoints" / f"epoch-{EPOCHS:04d}" / "unet.safetensors")
    assert not pipe.unet.load_state_dict(tuned, strict=False).missing_keys
    try:
        finetuned = pixels(render(pipe, prompts))
    finally:
        pipe.unet.load_state_dict(original)
        pipe.load_lora_weights(str(lora[0]))
    difference = np.abs(with_lora - finetuned)
    assert difference.mean() < 1.0, difference.mean()  # of 255: float rounding, no lost rank
    assert style([*map(_image, finetuned)]) > 0.1  # and the finetune did learn the style


def _image(array: np.ndarray):
    from PIL import Image

    return Image.fromarray(array.astype(np.uint8))


def test_the_evaluation_page_shows_base_renders_that_follow_their_prompts(trained: Path):
    run_stage(trained, "resize")
    run_stage(trained, "evaluate")
    eval_dir = trained / "reports" / "eval"
    best = json.loads((eval_dir / "best.json").read_text())
    assert best["epoch_number"] == EPOCHS  # the one saved epoch
    prompts = [
        ("a red circle on a blue background", Scene("circle", "red", "blue")),
        ("a red circle on a green background", Scene("circle", "red", "green")),
    ]
    found = base_renders(eval_dir)
    for prompt, scene in prompts:
        images = [image for text, image in found if text.startswith(prompt)]
        assert images, f"no weight-0 render of {prompt!r} on the page"
        assert all(read(image).faithful_to(scene) for image in images), prompt


def base_renders(eval_dir: Path) -> list[tuple[str, object]]:
    """(prompt, image) of every weight-0 render in the page's weight-sweep grid: rows are the
    (prompt, seed) pairs prompt-major, the first column is weight 0, cells 128 px."""
    from PIL import Image

    params = yaml.safe_load((eval_dir.parents[1] / "params.yaml").read_text())["evaluate"]
    rows = [p for p in params["prompts"] for _ in params["seeds"]]
    grid = Image.open(eval_dir / "grids" / f"epoch-{EPOCHS:04d}.png").convert("RGB")
    assert grid.size == (128 * len(params["weights"]), 128 * len(rows))
    return [(prompt, grid.crop((0, 128 * r, 128, 128 * (r + 1)))) for r, prompt in enumerate(rows)]
