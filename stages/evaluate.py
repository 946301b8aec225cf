"""evaluate: fixed-seed images per epoch at each LoRA weight; grids, an HTML page, metrics.

The 004 guide's comparison method: the same seeds and prompts for every epoch, a simple and a
complex prompt with the trigger. Weight 0 is the base model (generated once, shared by all
epochs); each other weight applies the epoch's LoRA through diffusers' `load_lora_weights`.
Every image is an item in the store keyed by model, LoRA file hash, prompt, seed, weight and
sampler settings, so an unchanged epoch is never regenerated.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator

from loraforge.fingerprint import hash_file, item_key
from loraforge.images import read_jsonl
from loraforge.params import ModelParams, section

if TYPE_CHECKING:
    from PIL import Image

    from loraforge.runner import Paths, StageEnv

FORMAT_VERSION = 1


@section
class Params:
    """The `evaluate` section.

    Attributes:
        prompts: prompts to render; `{trigger}` becomes the caption trigger. At least a simple one
            and a complex one with context absent from the dataset (004 guide).
        seeds: fixed seeds, the same for every epoch.
        weights: LoRA weights to render (0 = the base model).
        steps: sampler steps.
        guidance_scale: classifier-free guidance.
        size: image side in pixels; null = the model's native resolution.
        negative_prompt: used for every image.
    """

    model: ModelParams
    prompts: tuple[str, ...] = ("{trigger}", "{trigger} riding a bicycle on the moon, detailed")
    seeds: tuple[int, ...] = (1, 2, 3, 4)
    weights: tuple[float, ...] = (0.0, 1.0)
    steps: int = Field(25, ge=1)
    guidance_scale: float = Field(5.0, ge=0)
    size: int | None = Field(None, ge=64)
    negative_prompt: str = ""

    @field_validator("prompts", "seeds", "weights")
    @classmethod
    def _not_empty(cls, value: tuple[Any, ...]) -> tuple[Any, ...]:
        if not value:
            raise ValueError("must list at least one value")
        return value


def render_prompts(prompts: tuple[str, ...], trigger: str) -> list[str]:
    """Prompts with `{trigger}` filled in."""
    return [p.replace("{trigger}", trigger) for p in prompts]


def image_key(model_hash: str, lora_hash: str | None, prompt: str, seed: int, weight: float, params: Params, size: int) -> str:
    """Store key of one evaluation image; weight 0 does not depend on the LoRA."""
    return item_key("eval-image", FORMAT_VERSION, model=model_hash, lora=lora_hash if weight else None, prompt=prompt,
                    seed=seed, weight=weight, steps=params.steps, guidance=params.guidance_scale, size=size,
                    negative=params.negative_prompt)


def mean_abs_difference(a: "Image.Image", b: "Image.Image") -> float:
    """Mean |a − b| over pixels and channels, in [0, 1]: how much the LoRA changed the image."""
    import numpy as np

    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean() / 255.0)


def make_grid(rows: list[list["Image.Image"]]) -> "Image.Image":
    """Images tiled row by row (all the same size)."""
    from PIL import Image as PILImage

    w, h = rows[0][0].size
    grid = PILImage.new("RGB", (w * len(rows[0]), h * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            grid.paste(img, (c * w, r * h))
    return grid


class Renderer:
    """Generates (or fetches from the store) one image per (lora, prompt, seed, weight)."""

    def __init__(self, params: Params, env: "StageEnv") -> None:
        from loraforge.models import component_hash, load_pipeline, resolve_device, resolve_model

        self.params, self.env = params, env
        info = resolve_model(params.model, env.state_dir)
        self.size = params.size or info.native_resolution
        comps = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if info.arch == "sdxl" else [])
        self.model_hash = "-".join(component_hash(info, c, env.state_dir) for c in comps)
        self._load = lambda: load_pipeline(info, resolve_device(params.model.device))
        self._pipe: Any = None
        self._adapter: str | None = None
        self.computed = self.reused = 0

    def image(self, lora: Path | None, lora_hash: str | None, prompt: str, seed: int, weight: float) -> Path:
        key = image_key(self.model_hash, lora_hash, prompt, seed, weight, self.params, self.size)
        entry = self.env.store.get("eval-image", key, ".png")
        if entry is not None:
            self.reused += 1
            return entry
        image = self._generate(lora if weight else None, prompt, seed, weight)
        self.computed += 1
        return self.env.store.put("eval-image", key, ".png", lambda p: image.save(p, format="PNG"))

    def _generate(self, lora: Path | None, prompt: str, seed: int, weight: float) -> "Image.Image":
        import torch

        if self._pipe is None:
            self._pipe = self._load()
        pipe = self._pipe
        if lora is None:
            pipe.disable_lora() if self._adapter else None
        else:
            name = lora.stem.replace("-", "_").replace(".", "_")
            if self._adapter != name:
                if self._adapter:
                    pipe.delete_adapters(self._adapter)
                pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name=name)
                self._adapter = name
            pipe.enable_lora()
            pipe.set_adapters([name], adapter_weights=[weight])
        return pipe(prompt, negative_prompt=self.params.negative_prompt or None, num_inference_steps=self.params.steps,
                    guidance_scale=self.params.guidance_scale, width=self.size, height=self.size,
                    generator=torch.Generator().manual_seed(seed)).images[0]


def run(params: Params, inputs: "Paths", outputs: "Paths", env: "StageEnv") -> dict[str, Any]:
    """Grids per epoch into `outputs.grids`, the page at `outputs.page`, metrics at `outputs.metrics`."""
    from PIL import Image as PILImage

    loras = sorted(inputs.loras.glob("lora-*.safetensors"))
    if not loras:
        raise FileNotFoundError(f"no lora-*.safetensors in {inputs.loras}")
    trigger = read_jsonl(inputs.captions / "manifest.jsonl")[0]["trigger"]
    prompts = render_prompts(params.prompts, trigger)
    renderer = Renderer(params, env)
    total = len(loras) * len(prompts) * len(params.seeds) * len(params.weights)
    bar = env.bar(total=total, desc="evaluate", unit="img")
    epochs: dict[str, Any] = {}
    for lora in loras:
        lora_hash = hash_file(lora)
        rows, effects = [], []
        for prompt in prompts:
            for seed in params.seeds:
                row = []
                for weight in params.weights:
                    with PILImage.open(renderer.image(lora, lora_hash, prompt, seed, weight)) as img:
                        row.append(img.convert("RGB"))
                    bar.update(1)
                    env.publish.progress(bar.n / total, "evaluation images")
                if 0.0 in params.weights:
                    base = row[params.weights.index(0.0)]
                    effects += [mean_abs_difference(base, im) for w, im in zip(params.weights, row) if w == max(params.weights)]
                rows.append(row)
        epoch = lora.stem.removeprefix("lora-")
        grid_name = f"{epoch}.png"
        make_grid(rows).save(outputs.grids / grid_name)
        epochs[epoch] = {"grid": f"grids/{grid_name}", "lora_effect": sum(effects) / len(effects) if effects else None}
    bar.close()
    metrics = {"epochs": {e: {"lora_effect": v["lora_effect"]} for e, v in epochs.items()},
               "final": {"epoch": list(epochs)[-1], "lora_effect": list(epochs.values())[-1]["lora_effect"]}}
    outputs.metrics.write_text(json.dumps(metrics, indent=2) + "\n")
    outputs.page.write_text(render_page(epochs, prompts, params, trigger), encoding="utf-8")
    env.publish.table("metrics", [{"epoch": e, **m} for e, m in metrics["epochs"].items()], "Evaluation metrics per epoch")
    return {"items": total, "computed": renderer.computed, "reused": renderer.reused, "epochs": list(epochs), "metrics": metrics}


def format_metric(value: float | None) -> str:
    """A metric for the page: 4 decimals, or a dash when not measured."""
    return "—" if value is None else f"{value:.4f}"


def render_page(epochs: dict[str, Any], prompts: list[str], params: Params, trigger: str) -> str:
    """A static HTML report: one grid per epoch (rows = prompt × seed, columns = LoRA weight)."""
    e = html.escape
    rows_legend = "".join(f"<li>{e(p)} — seed {s}</li>" for p in prompts for s in params.seeds)
    metric_rows = "".join(f"<tr><td>{e(name)}</td><td>{format_metric(v['lora_effect'])}</td></tr>" for name, v in epochs.items())
    sections = "".join(
        f'<section><h2>{e(name)}</h2><img src="{e(v["grid"])}" alt="grid for {e(name)}"></section>' for name, v in epochs.items()
    )
    weights = ", ".join(f"{w:g}" for w in params.weights)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>loraforge evaluation</title>
<style>body{{font-family:sans-serif;margin:2em}}img{{image-rendering:pixelated;max-width:100%}}td,th{{padding:.2em 1em}}</style>
</head><body>
<h1>loraforge evaluation</h1>
<p>Trigger <code>{e(trigger)}</code>. Columns: LoRA weight {e(weights)} (0 = base model). Rows, top to bottom:</p>
<ol>{rows_legend}</ol>
<table><tr><th>epoch</th><th>LoRA effect (mean |Δ pixel| at the highest weight vs 0)</th></tr>{metric_rows}</table>
{sections}
</body></html>
"""
