"""evaluate: per-epoch grids, measured signs of over/undertraining, and the epoch to ship.

The 004 guide's comparison method, with the same prompts and seeds for every epoch and every
experiment:

- fixed seeds × a simple and a complex prompt (context absent from the dataset), at every LoRA
  weight of `evaluate.weights` (the weight sweep; 0 = the base model, shared by all epochs);
- `random_prompts` random prompts with recorded seeds (drawn once from `random_seed`), at 0 and 1;
- `caption_prompts` training captions prompted 1:1 (001 guide), at 0 and 1, beside the image
  they caption.

Measured per epoch (see `loraforge.evaluation.epoch_metrics` and `loraforge.evaluation.metrics`): colourfulness,
clipped-pixel share and high-frequency share against weight 0 (overfit, 003 guide); the caption
images' distance to the nearest training image (memorisation); trigger images' similarity to the
training set (likeness); CLIP score when `evaluate.clip_model` is set; the train loss and its
local minima; the validation loss when finetune measured it (`validation.tsv`). `recommend`
turns them into `best.json`, and the chosen LoRA is copied to `models/lora-best.safetensors`.

Every image is an item in the store keyed by model, the LoRA's tensors (not its metadata, which
holds a save date), prompt, seed, weight and sampler settings (see `loraforge.evaluation.render`), and each
epoch's metrics by its images' keys: an unchanged epoch is never regenerated, so adding an epoch
renders only that epoch's images. The page is `loraforge.evaluation.html_report.render_page`; embeddings
(CLIP or the pixel fallback) come from `loraforge.evaluation.embedding`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from PIL import ImageOps

from loraforge.evaluation.embedding import Embedder, resolve_clip
from loraforge.evaluation.epoch_metrics import (
    best_record,
    epoch_row,
    epoch_signs,
    metric_columns,
    metrics_record,
    weight_rows,
)
from loraforge.evaluation.epoch_metrics import validation_losses
from loraforge.evaluation.metrics import Limits, as_array, image_signs, mean_signs, recommend
from loraforge.store.fingerprint import hash_file, hash_json
from loraforge.evaluation.grids import cross_epoch_grids, epoch_grids, open_rgb
from loraforge.evaluation.html_report import read_tsv, render_page, write_tsv_text
from loraforge.data.images import read_jsonl
from loraforge.evaluation.render import Renderer, Shots, caption_shots, random_shots, render_epoch, render_prompts
from stages.evaluate_params import Params

if TYPE_CHECKING:
    import numpy as np

    from loraforge.pipeline.runner import Paths, StageEnv


def limits_of(params: Params) -> Limits:
    """The recommendation rule's thresholds from the params.

    Args:
        params: the `evaluate` section.
    """
    return Limits(
        check_weight=params.check_weight,
        saturation_rise=params.saturation_limit,
        high_freq_rise=params.high_freq_limit,
        clipped_rise=params.clipped_limit,
        memorisation_ratio=params.memorisation_ratio,
        validation_tolerance=params.validation_tolerance,
    )


def shots_of(params: Params, captions: list[dict[str, Any]], trigger: str) -> Shots:
    """What every epoch renders, from the params and the training captions.

    Args:
        params: the `evaluate` section.
        captions: rows of data/captions/manifest.jsonl.
        trigger: the activation token.
    """
    return Shots(
        prompts=render_prompts(params.prompts, trigger),
        seeds=params.seeds,
        weights=params.weights,
        randoms=random_shots(
            params.random_pool, params.random_prompts, params.random_seed, trigger, params.random_template
        ),
        captions=caption_shots(captions, params.caption_prompts),
    )


def epoch_number(lora: Path) -> int:
    """The epoch of `lora-epoch-0007.safetensors` (7).

    Args:
        lora: a per-epoch LoRA file.
    """
    digits = lora.stem.rsplit("-", 1)[-1]
    if not digits.isdigit():
        raise ValueError(f"{lora}: expected a name like lora-epoch-0007.safetensors")
    return int(digits)


# ---------------------------------------------------------------- per-epoch work


@dataclass
class Context:
    """What every epoch's evaluation shares.

    Attributes:
        params: the `evaluate` section.
        renderer: image generation through the item store.
        embedder: CLIP or the pixel fallback.
        shots: what every epoch renders (fixed prompts, random prompts, captions).
        train_images: training images by id (for the caption grid).
        train_emb: unit embeddings of all training images (N, D), or None when not declared.
        train_signs: the training images' mean overfit signs at the render size (the level a
            LoRA may reach without counting as burnt), or None when not declared.
        losses: train loss per epoch number (empty when not declared).
        validation: validation loss per saved epoch (empty when finetune's validation is off).
        progress: called with a number of images done.
    """

    params: Params
    renderer: Renderer
    embedder: Embedder
    shots: Shots
    train_images: dict[str, Path]
    train_emb: np.ndarray | None
    train_signs: dict[str, float] | None
    losses: dict[int, float]
    validation: dict[int, float]
    progress: Callable[[int], None]


def cached_metrics(ctx: Context, env: "StageEnv", images: dict[str, Any], epoch: int, train_id: str) -> dict[str, Any]:
    """The epoch's metrics (its number, loss and `epochmetrics.epoch_signs`), kept in the store under
    the epoch's image keys, the training set and the embedder (so an unchanged epoch's metrics are
    read back, not recomputed).

    Args:
        ctx: the shared context.
        env: the stage environment.
        images: `render.render_epoch`'s result.
        epoch: the epoch number.
        train_id: hash of the training images (or "none").
    """
    item = env.store.item(
        "eval-metrics",
        images=images["keys"],
        train=train_id,
        embedder=ctx.embedder.identity,
        loss=ctx.losses.get(epoch),
        epoch=epoch,
        check_weight=ctx.params.check_weight,
    )
    entry = item.get(".json")
    if entry is not None:
        return json.loads(entry.read_text())
    train = (ctx.train_emb, ctx.train_signs) if ctx.train_emb is not None and ctx.train_signs else None
    signs = epoch_signs(images, ctx.shots, ctx.embedder, train, ctx.params.check_weight)
    metrics = {"epoch": epoch, "loss": ctx.losses.get(epoch), **signs}
    item.put_bytes(".json", json.dumps(metrics).encode())
    return metrics


# ---------------------------------------------------------------- inputs


def read_losses(folder: Path | None) -> dict[int, float]:
    """Train loss per epoch from finetune's `epochs.tsv` (empty when not declared or absent).

    Args:
        folder: `reports/finetune`, or None.
    """
    path = None if folder is None else folder / "epochs.tsv"
    if path is None or not path.is_file():
        return {}
    return {int(r["epoch"]): r["loss"] for r in read_tsv(path.read_text()) if "loss" in r}


def training_images(folder: Path | None) -> dict[str, Path]:
    """Training images by id from `data/upscaled/manifest.jsonl` (empty when not declared).

    Args:
        folder: `data/upscaled`, or None.
    """
    if folder is None:
        return {}
    manifest = folder / "manifest.jsonl"
    if not manifest.is_file():
        raise FileNotFoundError(f"input `training_images`: no manifest.jsonl in {folder}")
    return {r["id"]: folder / r["file"] for r in read_jsonl(manifest)}


def training_signs(train: dict[str, Path], size: int) -> dict[str, float]:
    """The training images' mean overfit signs, each image centre-cropped and resized to the
    renders' size first (the high-frequency share depends on the scale).

    Args:
        train: training images by id (non-empty).
        size: the render side in pixels.
    """
    return mean_signs([image_signs(as_array(ImageOps.fit(open_rgb(p), (size, size)))) for p in train.values()])


def dataset_checks(inputs: "Paths") -> dict[str, dict[str, Any]]:
    """The earlier stages' reports named as inputs `<stage>_report` (for the page), by stage.

    Args:
        inputs: the stage's inputs.
    """
    return {
        name.removesuffix("_report"): json.loads(path.read_text())
        for name, path in inputs.items()
        if name.endswith("_report") and path.is_file()
    }


# ---------------------------------------------------------------- run


def run(params: Params, inputs: "Paths", outputs: "Paths", env: "StageEnv") -> dict[str, Any]:
    """Render and measure every epoch, recommend one, write the grids, page, metrics and best.json.

    Args:
        params: the `evaluate` section.
        inputs: `loras`, `captions`; optionally `training_images` (data/upscaled), `loss`
            (reports/finetune) and `<stage>_report` files for the dataset checks.
        outputs: `grids`, `page`, `metrics`; optionally `best` (best.json), `best_lora`,
            `series` (per-epoch TSV) and `weight_series` (per-epoch-and-weight TSV).
        env: the stage environment.
    """
    loras = sorted(inputs.loras.glob("lora-*.safetensors"))
    if not loras:
        raise FileNotFoundError(f"input `loras`: no lora-*.safetensors in {inputs.loras}")
    ctx, train_id = build_context(params, inputs, env)
    total = ctx.shots.per_epoch
    bar = env.tracker(total * len(loras), "evaluation images")
    ctx.progress = bar
    epochs: dict[str, Any] = {}
    shown: dict[str, dict[tuple[int, int], Path]] = {}
    for lora in loras:
        images = render_epoch(ctx.renderer, ctx.shots, lora, env.fan_out, ctx.progress)
        name = lora.stem.removeprefix("lora-")
        metrics = cached_metrics(ctx, env, images, epoch_number(lora), train_id)
        metrics["validation_loss"] = ctx.validation.get(metrics["epoch"])  # None: not measured
        epochs[name] = {
            "lora": lora,
            "computed": images["computed"],
            "grids": epoch_grids(images, ctx.shots, name, outputs.grids, ctx.train_images, ctx.renderer.size),
            "metrics": metrics,
        }
        shown[name] = {(i, s): images["fixed"][(i, s, ctx.shots.shown_weight)] for i, s in ctx.shots.pairs}
    bar.close()
    cross = cross_epoch_grids(shown, ctx.shots, outputs.grids)
    best = recommend([e["metrics"] for e in epochs.values()], limits_of(params))
    best_name = next(n for n, e in epochs.items() if e["metrics"]["epoch"] == best["epoch"])
    return write_results(params, inputs, outputs, env, ctx, epochs, cross, best, best_name)


def build_context(params: Params, inputs: "Paths", env: "StageEnv") -> tuple[Context, str]:
    """The shared context and the training set's identity hash.

    Args:
        params: the `evaluate` section.
        inputs: the stage's inputs.
        env: the stage environment.
    """
    captions_rows = read_jsonl(inputs.captions / "manifest.jsonl")
    if not captions_rows:
        raise ValueError(f"input `captions`: {inputs.captions / 'manifest.jsonl'} is empty")
    trigger = captions_rows[0]["trigger"]
    train = training_images(inputs.get("training_images"))
    embedder = Embedder(resolve_clip(params.clip_model, env.state_dir.parent), params.model.allow_pickle)
    train_emb = embedder.images([open_rgb(p) for p in train.values()]) if train else None
    train_id = hash_json({i: hash_file(p) for i, p in train.items()}) if train else "none"
    renderer = Renderer(
        params.model,
        env.store,
        env.state_dir,
        size=params.size,
        steps=params.steps,
        guidance_scale=params.guidance_scale,
        negative_prompt=params.negative_prompt,
    )
    ctx = Context(
        params=params,
        renderer=renderer,
        embedder=embedder,
        shots=shots_of(params, captions_rows, trigger),
        train_images=train,
        train_emb=train_emb,
        train_signs=training_signs(train, renderer.size) if train else None,
        losses=read_losses(inputs.get("loss")),
        validation=validation_losses(inputs.get("loss"), inputs.get("extract_report")),  # of the shipped weights
        progress=lambda n: None,
    )
    return ctx, train_id


def write_results(
    params: Params,
    inputs: "Paths",
    outputs: "Paths",
    env: "StageEnv",
    ctx: Context,
    epochs: dict[str, Any],
    cross: list[str],
    best: dict[str, Any],
    best_name: str,
) -> dict[str, Any]:
    """Write metrics.json, the TSV series, best.json, the best LoRA and the page; publish to Prefect;
    return the stage summary.

    Args:
        params: the `evaluate` section.
        inputs: the stage's inputs.
        outputs: the stage's outputs.
        env: the stage environment.
        ctx: the shared context.
        epochs: per epoch name: `lora`, `computed`, `grids`, `metrics`.
        cross: the cross-epoch grid paths.
        best: `recommend`'s result.
        best_name: the recommended epoch's name.
    """
    method = ctx.embedder.method
    rows = {n: epoch_row(e["metrics"]) for n, e in epochs.items()}
    best_json = best_record(best, best_name, epochs[best_name]["lora"].name, method, limits_of(params))
    metrics = metrics_record(rows, best["epoch"], best_name, method)
    outputs.metrics.write_text(json.dumps(metrics, indent=2) + "\n")
    (outputs.get("best") or outputs.page.parent / "best.json").write_text(
        json.dumps(best_json, indent=2, ensure_ascii=False) + "\n"
    )
    if outputs.get("best_lora") is not None:
        shutil.copyfile(epochs[best_name]["lora"], outputs.best_lora)
    if outputs.get("series") is not None:
        outputs.series.write_text(write_tsv_text(list(rows.values())))
    if outputs.get("weight_series") is not None:
        outputs.weight_series.write_text(write_tsv_text(weight_rows(epochs)))
    outputs.page.write_text(page_of(ctx, inputs, epochs, rows, cross, best_json), encoding="utf-8")
    publish(env, rows, best_json, outputs, epochs)
    return {
        "items": ctx.renderer.computed + ctx.renderer.reused,
        "computed": ctx.renderer.computed,
        "reused": ctx.renderer.reused,
        "epochs": list(epochs),
        "best": best_name,
        "similarity": method,
        "per_epoch_computed": {n: e["computed"] for n, e in epochs.items()},
        "epochs_computed": [n for n, e in epochs.items() if e["computed"]],
        "metrics": metrics,
    }


def page_of(
    ctx: Context,
    inputs: "Paths",
    epochs: dict[str, Any],
    rows: dict[str, dict[str, Any]],
    cross: list[str],
    best_json: dict[str, Any],
) -> str:
    """The report page (`htmlreport.render_page`) with the earlier stages' dataset checks.

    Args:
        ctx: the shared context.
        inputs: the stage's inputs (the `<stage>_report` files).
        epochs: per epoch name: `grids`, `metrics`.
        rows: per epoch name, its metrics.json row.
        cross: the cross-epoch grid paths.
        best_json: the best.json content.
    """
    return render_page(
        epochs,
        metric_columns(rows),
        rows,
        cross,
        best_json,
        dataset_checks(inputs),
        shots=ctx.shots,
        with_training_images=bool(ctx.train_images),
        losses=ctx.losses,
        has_text=ctx.embedder.has_text,
    )


def publish(
    env: "StageEnv", rows: dict[str, Any], best: dict[str, Any], outputs: "Paths", epochs: dict[str, Any]
) -> None:
    """Metrics as a Prefect table, the recommendation as markdown with links to the grids.

    Args:
        env: the stage environment (its publisher).
        rows: per-epoch metric rows.
        best: the best.json content.
        outputs: the stage's outputs (for absolute links).
        epochs: per epoch name, with `grids`.
    """
    env.publish.table("metrics", [{"name": n, **r} for n, r in rows.items()], "Evaluation metrics per epoch")
    base = outputs.page.parent
    links = "\n".join(
        f"- {n}: " + ", ".join(f"[{k}]({(base / v).as_uri()})" for k, v in e["grids"].items())
        for n, e in epochs.items()
    )
    text = (
        f"## Recommended: {best['epoch']}\n\n"
        + "\n".join(f"- {r}" for r in best["reasons"])
        + f"\n\nSimilarity: `{best['similarity']}`. [Report]({outputs.page.as_uri()})\n\n### Grids\n{links}\n"
    )
    env.publish.markdown("recommendation", text, "The epoch to ship and why")
