"""evaluate: per-epoch grids, measured signs of over/undertraining, and the epoch to ship.

The 004 guide's comparison method, with the same prompts and seeds for every epoch and every
experiment:

- fixed seeds × a simple and a complex prompt (context absent from the dataset), at every LoRA
  weight of `evaluate.weights` (the weight sweep; 0 = the base model, shared by all epochs);
- `random_prompts` random prompts with recorded seeds (drawn once from `random_seed`), at 0 and 1;
- `caption_prompts` training captions prompted 1:1 (001 guide), at 0 and 1, beside the image
  they caption.

Measured per epoch (see `loraforge.evalmetrics`): colourfulness, clipped-pixel share and
high-frequency share against weight 0 (overfit, 003 guide); the caption images' distance to the
nearest training image (memorisation); trigger images' similarity to the training set
(likeness); CLIP score when `evaluate.clip_model` is set; the train loss and its local minima.
`recommend` turns them into `best.json`, and the chosen LoRA is copied to `models/lora-best.safetensors`.

Every image is an item in the store keyed by model, the LoRA's tensors (not its metadata, which
holds a save date), prompt, seed, weight and sampler settings, and each epoch's metrics by its images' keys: an unchanged epoch is never
regenerated, so adding an epoch renders only that epoch's images.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from loraforge.evalmetrics import Limits, recommend
from loraforge.fingerprint import hash_file, hash_json, hash_tree
from loraforge.images import read_jsonl
from stages.evaluate_params import Params

if TYPE_CHECKING:
    from loraforge.store import Item, ItemStore
    import numpy as np
    from PIL import Image

    from loraforge.runner import Paths, StageEnv


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
    )


# ---------------------------------------------------------------- what to render


def render_prompts(prompts: tuple[str, ...], trigger: str) -> list[str]:
    """Prompts with `{trigger}` filled in.

    Args:
        prompts: templates.
        trigger: the activation token.
    """
    return [p.replace("{trigger}", trigger) for p in prompts]


def random_shots(params: Params, trigger: str) -> list[tuple[str, int]]:
    """The random prompts and their recorded seeds: drawn from `random_seed` only, so the same
    for every epoch and experiment with the same params.

    Args:
        params: the `evaluate` section.
        trigger: the activation token.
    """
    rng = random.Random(params.random_seed)
    return [
        (f"{trigger}, {rng.choice(params.random_pool)}", rng.randrange(2**31)) for _ in range(params.random_prompts)
    ]


def caption_shots(captions: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The first `n` training captions by image id (a stable choice): `{id, caption}` rows.

    Args:
        captions: rows of data/captions/manifest.jsonl.
        n: how many.
    """
    return [{"id": r["id"], "caption": r["caption"]} for r in sorted(captions, key=lambda r: r["id"])[:n]]


def show_weight(weights: tuple[float, ...]) -> float:
    """The weight shown in the cross-epoch grids and used for likeness: 1 when swept, else the largest.

    Args:
        weights: `evaluate.weights`.
    """
    return 1.0 if 1.0 in weights else max(weights)


def epoch_number(lora: Path) -> int:
    """The epoch of `lora-epoch-0007.safetensors` (7).

    Args:
        lora: a per-epoch LoRA file.
    """
    digits = lora.stem.rsplit("-", 1)[-1]
    if not digits.isdigit():
        raise ValueError(f"{lora}: expected a name like lora-epoch-0007.safetensors")
    return int(digits)


def lora_content_hash(path: Path) -> str:
    """xxh3-128 of a safetensors file's tensors (names, dtypes, shapes, bytes), not its metadata:
    kohya metadata carries a date and run facts that change on every save, not the images.

    Args:
        path: a `.safetensors` file.

    Raises:
        ValueError: the file is not safetensors (names the file).
    """
    import struct

    import xxhash

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError, MemoryError, OverflowError):
            raise ValueError(f"{path}: not a safetensors file (bad header)") from None
        header.pop("__metadata__", None)
        h = xxhash.xxh3_128(json.dumps(header, sort_keys=True).encode())
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def image_item(
    store: "ItemStore",
    model_hash: str,
    lora_hash: str | None,
    prompt: str,
    seed: int,
    weight: float,
    params: Params,
    size: int,
) -> "Item":
    """Store entry of one evaluation image; weight 0 does not depend on the LoRA.

    Args:
        store: the item store.
        model_hash: hash of the base model's weighted components.
        lora_hash: `lora_content_hash` of the LoRA file.
        prompt: the rendered prompt.
        seed: generator seed.
        weight: LoRA weight.
        params: sampler settings come from here.
        size: image side in pixels.
    """
    return store.item(
        "eval-image",
        model=model_hash,
        lora=lora_hash if weight else None,
        prompt=prompt,
        seed=seed,
        weight=weight,
        steps=params.steps,
        guidance=params.guidance_scale,
        size=size,
        negative=params.negative_prompt,
    )


def make_grid(rows: list[list["Image.Image"]]) -> "Image.Image":
    """Images tiled row by row (each cell the size of the first image; others are resized).

    Args:
        rows: rows of PIL images, all rows the same length.
    """
    from PIL import Image as PILImage

    w, h = rows[0][0].size
    grid = PILImage.new("RGB", (w * len(rows[0]), h * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            grid.paste(img if img.size == (w, h) else img.resize((w, h)), (c * w, r * h))
    return grid


# ---------------------------------------------------------------- generation


class Renderer:
    """Generates (or fetches from the store) one image per (lora, prompt, seed, weight)."""

    def __init__(self, params: Params, env: "StageEnv") -> None:
        """Resolve the base model (loaded lazily, on the first image the store lacks).

        Args:
            params: the `evaluate` section.
            env: the stage environment (item store, state folder).
        """
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

    def image(self, lora: Path, lora_hash: str, prompt: str, seed: int, weight: float) -> tuple[Path, str]:
        """The image's store path and key, generating it when the store lacks it.

        Args:
            lora: the epoch's LoRA file.
            lora_hash: its content hash.
            prompt: the rendered prompt.
            seed: generator seed.
            weight: LoRA weight (0 = base model).
        """
        item = image_item(self.env.store, self.model_hash, lora_hash, prompt, seed, weight, self.params, self.size)
        key, entry = item.key, item.get(".png")
        if entry is not None:
            self.reused += 1
            return entry, key
        image = self._generate(lora if weight else None, prompt, seed, weight)
        self.computed += 1
        return item.put(".png", lambda p: image.save(p, format="PNG")), key

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
        return pipe(
            prompt,
            negative_prompt=self.params.negative_prompt or None,
            num_inference_steps=self.params.steps,
            guidance_scale=self.params.guidance_scale,
            width=self.size,
            height=self.size,
            generator=torch.Generator().manual_seed(seed),
        ).images[0]


# ---------------------------------------------------------------- embeddings


class Embedder:
    """Image (and, with CLIP, text) embeddings: CLIP when `evaluate.clip_model` is set, else
    `evalmetrics.pixel_embedding`. `method` says which, for the report."""

    def __init__(self, clip_dir: Path | None) -> None:
        """Load the CLIP model from `clip_dir` (offline), or use the pixel fallback when None.

        Args:
            clip_dir: a local CLIP model folder, or None.
        """
        self.clip_dir = clip_dir
        self.method = "pixels-16x16" if clip_dir is None else f"clip:{clip_dir.name}"
        self.identity = "pixels-16x16" if clip_dir is None else hash_tree(clip_dir)
        self._clip: Any = None
        if clip_dir is not None:
            if not (clip_dir / "config.json").is_file():
                raise FileNotFoundError(f"`evaluate.clip_model`: {clip_dir} holds no CLIP model (no config.json)")
            import transformers
            from transformers import CLIPModel, CLIPTokenizer

            # the PIL image processor: transformers 5's default one needs torchvision, absent here
            processor = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
            self._clip = (
                CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval(),
                CLIPTokenizer.from_pretrained(clip_dir, local_files_only=True),
                processor.from_pretrained(clip_dir, local_files_only=True),
            )

    @property
    def has_text(self) -> bool:
        """Whether text embeddings (hence CLIP score) are available."""
        return self._clip is not None

    def images(self, images: list["Image.Image"]) -> "np.ndarray":
        """Unit embeddings (N, D) of `images`.

        Args:
            images: PIL images.
        """
        import numpy as np

        from loraforge.evalmetrics import pixel_embedding, unit

        if self._clip is None:
            return np.stack([pixel_embedding(im) for im in images])
        import torch

        model, _, processor = self._clip
        with torch.no_grad():
            pixels = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
            out = model.get_image_features(pixel_values=pixels)
        return unit(_features(out).float().numpy())

    def texts(self, texts: list[str]) -> "np.ndarray":
        """Unit CLIP text embeddings (N, D); only with a CLIP model.

        Args:
            texts: prompts.
        """
        import torch

        from loraforge.evalmetrics import unit

        if self._clip is None:
            raise RuntimeError("text embeddings need `evaluate.clip_model`")
        model, tokenizer, _ = self._clip
        with torch.no_grad():
            tokens = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
            out = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return unit(_features(out).float().numpy())


def _features(out: Any) -> Any:
    """The projected embeddings from `get_*_features` (a tensor, or an output whose pooler holds them)."""
    return out if hasattr(out, "numpy") else out.pooler_output


def resolve_clip(params: Params, env: "StageEnv") -> Path | None:
    """`evaluate.clip_model` as an absolute folder (relative to the project), or None.

    Args:
        params: the `evaluate` section.
        env: the stage environment (its state folder sits in the project root).
    """
    if params.clip_model is None:
        return None
    path = Path(params.clip_model)
    path = path if path.is_absolute() else env.state_dir.parent / path
    if not path.is_dir():
        raise FileNotFoundError(f"`evaluate.clip_model` = {params.clip_model!r}: no folder {path}")
    return path


# ---------------------------------------------------------------- per-epoch work


@dataclass
class Context:
    """What every epoch's evaluation shares.

    Attributes:
        params: the `evaluate` section.
        renderer: image generation through the item store.
        embedder: CLIP or the pixel fallback.
        prompts: the rendered fixed prompts.
        randoms: the random prompts with their seeds.
        captions: the training captions prompted 1:1 (`id`, `caption`).
        train_images: training images by id (for the caption grid).
        train_emb: unit embeddings of all training images (N, D), or None when not declared.
        losses: train loss per epoch number (empty when not declared).
        progress: called after each image.
    """

    params: Params
    renderer: Renderer
    embedder: Embedder
    prompts: list[str]
    randoms: list[tuple[str, int]]
    captions: list[dict[str, Any]]
    train_images: dict[str, Path]
    train_emb: "np.ndarray | None"
    losses: dict[int, float]
    progress: Callable[[], None]


def open_rgb(path: Path) -> "Image.Image":
    """An image file as an RGB PIL image, fully loaded.

    Args:
        path: the file.
    """
    from PIL import Image as PILImage

    with PILImage.open(path) as img:
        return img.convert("RGB")


def render_epoch(ctx: Context, lora: Path, lora_hash: str) -> dict[str, Any]:
    """Every image of one epoch: `{"fixed": {(prompt_i, seed, weight): path}, "random": ..., "caption": ...}`
    plus the keys of all of them (`keys`) and how many were generated (`computed`).

    Args:
        ctx: the shared context.
        lora: the epoch's LoRA file.
        lora_hash: its content hash.
    """
    before = ctx.renderer.computed
    keys: list[str] = []

    def shot(prompt: str, seed: int, weight: float) -> Path:
        path, key = ctx.renderer.image(lora, lora_hash, prompt, seed, weight)
        keys.append(key)
        ctx.progress()
        return path

    p = ctx.params
    fixed = {(i, s, w): shot(prompt, s, w) for i, prompt in enumerate(ctx.prompts) for s in p.seeds for w in p.weights}
    randoms = {(j, w): shot(prompt, s, w) for j, (prompt, s) in enumerate(ctx.randoms) for w in (0.0, 1.0)}
    captions = {(c["id"], w): shot(c["caption"], p.seeds[0], w) for c in ctx.captions for w in (0.0, 1.0)}
    return {
        "fixed": fixed,
        "random": randoms,
        "caption": captions,
        "keys": keys,
        "computed": ctx.renderer.computed - before,
    }


def epoch_grids(ctx: Context, shots: dict[str, Any], name: str, grids: Path) -> dict[str, str]:
    """Write the epoch's weight-sweep, random-prompt and caption grids; return their page paths.

    Args:
        ctx: the shared context.
        shots: `render_epoch`'s result.
        name: the epoch's name (`epoch-0004`).
        grids: the grids folder.
    """
    p = ctx.params
    out = {"sweep": f"{name}.png"}
    sweep = [[open_rgb(shots["fixed"][(i, s, w)]) for w in p.weights] for i in range(len(ctx.prompts)) for s in p.seeds]
    make_grid(sweep).save(grids / out["sweep"])
    if ctx.randoms:
        out["random"] = f"{name}-random.png"
        make_grid([[open_rgb(shots["random"][(j, w)]) for w in (0.0, 1.0)] for j in range(len(ctx.randoms))]).save(
            grids / out["random"]
        )
    if ctx.captions:
        out["captions"] = f"{name}-captions.png"
        from PIL import ImageOps

        size = (ctx.renderer.size, ctx.renderer.size)
        rows = [
            [
                *([ImageOps.fit(open_rgb(ctx.train_images[c["id"]]), size)] if c["id"] in ctx.train_images else []),
                *(open_rgb(shots["caption"][(c["id"], w)]) for w in (0.0, 1.0)),
            ]
            for c in ctx.captions
        ]
        make_grid(rows).save(grids / out["captions"])
    return {k: f"grids/{v}" for k, v in out.items()}


def epoch_metrics(ctx: Context, shots: dict[str, Any], epoch: int) -> dict[str, Any]:
    """The measured signs of one epoch (see the module docstring); None where not measurable.

    Args:
        ctx: the shared context.
        shots: `render_epoch`'s result.
        epoch: the epoch number.
    """
    import numpy as np

    from loraforge.evalmetrics import as_array, image_signs, mean_abs_difference, mean_signs, rises

    p, fixed = ctx.params, shots["fixed"]
    arrays = {k: as_array(open_rgb(v)) for k, v in fixed.items()}
    per_weight = {w: mean_signs([image_signs(a) for (i, s, ww), a in arrays.items() if ww == w]) for w in p.weights}
    top = max(p.weights)
    m: dict[str, Any] = {
        "epoch": epoch,
        "loss": ctx.losses.get(epoch),
        "per_weight": {f"{w:g}": v for w, v in per_weight.items()},
    }
    if 0.0 in p.weights and top > 0:
        m["lora_effect"] = float(
            np.mean(
                [
                    mean_abs_difference(arrays[(i, s, 0.0)], arrays[(i, s, top)])
                    for i in range(len(ctx.prompts))
                    for s in p.seeds
                ]
            )
        )
    if 0.0 in p.weights and p.check_weight in p.weights:
        m.update(rises(per_weight[p.check_weight], per_weight[0.0]))
    m.update(similarity_metrics(ctx, shots))
    return m


def similarity_metrics(ctx: Context, shots: dict[str, Any]) -> dict[str, Any]:
    """Memorisation, likeness and CLIP score of one epoch (each with its base-model value).

    Args:
        ctx: the shared context.
        shots: `render_epoch`'s result.
    """
    import numpy as np

    from loraforge.evalmetrics import centroid_similarity, nearest_distance

    out: dict[str, Any] = {}
    w_show = show_weight(ctx.params.weights)
    if ctx.train_emb is not None and ctx.captions:
        for suffix, w in (("", 1.0), ("_base", 0.0)):
            emb = ctx.embedder.images([open_rgb(shots["caption"][(c["id"], w)]) for c in ctx.captions])
            out[f"memorisation{suffix}"] = float(np.mean([nearest_distance(e, ctx.train_emb) for e in emb]))
    if ctx.train_emb is not None:
        for suffix, w in (("", w_show), ("_base", 0.0)):
            if w in ctx.params.weights:
                emb = ctx.embedder.images([open_rgb(shots["fixed"][(0, s, w)]) for s in ctx.params.seeds])
                out[f"likeness{suffix}"] = centroid_similarity(emb, ctx.train_emb)
    if ctx.embedder.has_text:
        texts = ctx.embedder.texts(ctx.prompts)
        for suffix, w in (("", w_show), ("_base", 0.0)):
            if w in ctx.params.weights:
                pairs = [(i, s) for i in range(len(ctx.prompts)) for s in ctx.params.seeds]
                emb = ctx.embedder.images([open_rgb(shots["fixed"][(i, s, w)]) for i, s in pairs])
                out[f"clip_score{suffix}"] = float(
                    np.mean([100 * max(float(e @ texts[i]), 0.0) for e, (i, _) in zip(emb, pairs)])
                )
    return out


def cached_metrics(ctx: Context, env: "StageEnv", shots: dict[str, Any], epoch: int, train_id: str) -> dict[str, Any]:
    """`epoch_metrics`, kept in the store under the epoch's image keys, the training set and
    the embedder (so an unchanged epoch's metrics are read back, not recomputed).

    Args:
        ctx: the shared context.
        env: the stage environment.
        shots: `render_epoch`'s result.
        epoch: the epoch number.
        train_id: hash of the training images (or "none").
    """
    item = env.store.item(
        "eval-metrics",
        images=shots["keys"],
        train=train_id,
        embedder=ctx.embedder.identity,
        loss=ctx.losses.get(epoch),
        epoch=epoch,
        check_weight=ctx.params.check_weight,
    )
    entry = item.get(".json")
    if entry is not None:
        return json.loads(entry.read_text())
    metrics = epoch_metrics(ctx, shots, epoch)
    item.put_bytes(".json", json.dumps(metrics).encode())
    return metrics


# ---------------------------------------------------------------- inputs


def read_losses(folder: Path | None) -> dict[int, float]:
    """Train loss per epoch from finetune's `epochs.tsv` (empty when not declared or absent).

    Args:
        folder: `reports/finetune`, or None.
    """
    from loraforge.htmlreport import read_tsv

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
    ctx, train_id, total = build_context(params, inputs, env)
    bar = env.bar(total=total * len(loras), desc="evaluate", unit="img")
    done = {"n": 0}

    def progress() -> None:
        done["n"] += 1
        bar.update(1)
        env.publish.progress(done["n"] / (total * len(loras)), "evaluation images")

    ctx.progress = progress
    epochs: dict[str, Any] = {}
    weight1: dict[str, dict[tuple[int, int], Path]] = {}
    for lora in loras:
        shots = render_epoch(ctx, lora, lora_content_hash(lora))
        name = lora.stem.removeprefix("lora-")
        metrics = cached_metrics(ctx, env, shots, epoch_number(lora), train_id)
        epochs[name] = {
            "lora": lora,
            "computed": shots["computed"],
            "grids": epoch_grids(ctx, shots, name, outputs.grids),
            "metrics": metrics,
        }
        weight1[name] = {
            (i, s): shots["fixed"][(i, s, show_weight(params.weights))]
            for i in range(len(ctx.prompts))
            for s in params.seeds
        }
    bar.close()
    cross = cross_epoch_grids(weight1, ctx, outputs.grids)
    best = recommend([e["metrics"] for e in epochs.values()], limits_of(params))
    best_name = next(n for n, e in epochs.items() if e["metrics"]["epoch"] == best["epoch"])
    return write_results(params, inputs, outputs, env, ctx, epochs, cross, best, best_name)


def build_context(params: Params, inputs: "Paths", env: "StageEnv") -> tuple[Context, str, int]:
    """The shared context, the training set's identity hash and the image count per epoch.

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
    embedder = Embedder(resolve_clip(params, env))
    train_emb = embedder.images([open_rgb(p) for p in train.values()]) if train else None
    train_id = hash_json({i: hash_file(p) for i, p in train.items()}) if train else "none"
    ctx = Context(
        params=params,
        renderer=Renderer(params, env),
        embedder=embedder,
        prompts=render_prompts(params.prompts, trigger),
        randoms=random_shots(params, trigger),
        captions=caption_shots(captions_rows, params.caption_prompts),
        train_images=train,
        train_emb=train_emb,
        losses=read_losses(inputs.get("loss")),
        progress=lambda: None,
    )
    total = len(ctx.prompts) * len(params.seeds) * len(params.weights) + 2 * (len(ctx.randoms) + len(ctx.captions))
    return ctx, train_id, total


def cross_epoch_grids(weight1: dict[str, dict[tuple[int, int], Path]], ctx: Context, grids: Path) -> list[str]:
    """One grid per fixed prompt: rows = epochs, columns = seeds, at `show_weight` (the 004 guide's
    fixed-seed grids; the comparison page shows these side by side).

    Args:
        weight1: per epoch name, the image path per (prompt index, seed).
        ctx: the shared context.
        grids: the grids folder.
    """
    names = []
    for i in range(len(ctx.prompts)):
        name = f"prompt-{i + 1}.png"
        make_grid([[open_rgb(shots[(i, s)]) for s in ctx.params.seeds] for shots in weight1.values()]).save(
            grids / name
        )
        names.append(f"grids/{name}")
    return names


SERIES_KEYS = (
    "loss",
    "lora_effect",
    "saturation_rise",
    "high_freq_rise",
    "clipped_rise",
    "memorisation",
    "memorisation_base",
    "likeness",
    "likeness_base",
    "clip_score",
    "clip_score_base",
)


def epoch_row(m: dict[str, Any]) -> dict[str, Any]:
    """The flat per-epoch row of metrics.json / epochs.tsv (only what was measured).

    Args:
        m: one epoch's metrics.
    """
    return {"epoch": m["epoch"], **{k: m[k] for k in SERIES_KEYS if m.get(k) is not None}}


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
    from loraforge.htmlreport import write_tsv_text

    rows = {n: epoch_row(e["metrics"]) for n, e in epochs.items()}
    best_json = {
        "epoch": best_name,
        "epoch_number": best["epoch"],
        "lora": epochs[best_name]["lora"].name,
        "reasons": best["reasons"],
        "fallback": best["fallback"],
        "memorising_from": best["memorising_from"],
        "overfit": {str(k): v for k, v in best["overfit"].items()},
        "loss_minima": best["loss_minima"],
        "similarity": ctx.embedder.method,
        "limits": asdict(limits_of(params)),
    }
    metrics = {
        "best_epoch": best["epoch"],
        "similarity": ctx.embedder.method,
        "epochs": rows,
        "best": rows[best_name],
        "final": {"epoch": list(rows)[-1], **rows[list(rows)[-1]]},
    }
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
    outputs.page.write_text(render_page(ctx, epochs, cross, best_json, dataset_checks(inputs)), encoding="utf-8")
    publish(env, rows, best_json, outputs, epochs)
    return {
        "items": ctx.renderer.computed + ctx.renderer.reused,
        "computed": ctx.renderer.computed,
        "reused": ctx.renderer.reused,
        "epochs": list(epochs),
        "best": best_name,
        "similarity": ctx.embedder.method,
        "per_epoch_computed": {n: e["computed"] for n, e in epochs.items()},
        "epochs_computed": [n for n, e in epochs.items() if e["computed"]],
        "metrics": metrics,
    }


def weight_rows(epochs: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows (epoch, weight, colourfulness, clipped, high_freq) for the weight-sweep plot.

    Args:
        epochs: per epoch name, with `metrics.per_weight`.
    """
    return [
        {"epoch": e["metrics"]["epoch"], "weight": float(w), **signs}
        for e in epochs.values()
        for w, signs in e["metrics"]["per_weight"].items()
    ]


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


# ---------------------------------------------------------------- the page


def render_page(
    ctx: Context, epochs: dict[str, Any], cross: list[str], best: dict[str, Any], checks: dict[str, dict[str, Any]]
) -> str:
    """The static report: recommendation, metrics table, loss curve, grids, dataset checks.

    Args:
        ctx: the shared context.
        epochs: per epoch name: `grids`, `metrics`.
        cross: the cross-epoch grid paths (one per fixed prompt).
        best: the best.json content.
        checks: earlier stages' reports by stage name.
    """
    from loraforge.htmlreport import esc, figure, line_chart, page, table

    p = ctx.params
    names = list(epochs)
    cols = ["epoch", *[k for k in SERIES_KEYS if any(k in epoch_row(e["metrics"]) for e in epochs.values())]]
    metric_rows = [[n, *[epoch_row(e["metrics"]).get(k) for k in cols[1:]]] for n, e in epochs.items()]
    loss = line_chart({"train loss": sorted(ctx.losses.items())}, "Train loss per epoch", "epoch", "loss")
    sat = line_chart(
        {n: [(float(w), s["colourfulness"]) for w, s in e["metrics"]["per_weight"].items()] for n, e in epochs.items()},
        "Colourfulness vs LoRA weight",
        "weight",
        "colourfulness",
    )
    body = [
        f"<h2>Recommendation: {esc(best['epoch'])}</h2><ul>{''.join(f'<li>{esc(r)}</li>' for r in best['reasons'])}</ul>",
        f"<p>Similarity measured with <code>{esc(best['similarity'])}</code>"
        + ("" if ctx.embedder.has_text else " (no CLIP model: pixel-thumbnail fallback, no CLIP score)")
        + ". "
        f"Best LoRA: <code>{esc(best['lora'])}</code>.</p>",
        "<h2>Metrics per epoch</h2>" + table(cols, metric_rows, highlight=names.index(best["epoch"])),
        f'<div class="row">{loss}{sat}</div>',
        f"<h2>Fixed seeds across epochs (weight {show_weight(p.weights):g})</h2><p>Rows: {esc(', '.join(names))}; "
        f"columns: seeds {esc(', '.join(map(str, p.seeds)))}.</p>"
        + '<div class="row">'
        + "".join(figure(src, f"prompt {i + 1}: {ctx.prompts[i]}") for i, src in enumerate(cross))
        + "</div>",
        f"<h2>Weight sweep per epoch</h2><p>Columns: LoRA weight {esc(', '.join(f'{w:g}' for w in p.weights))} "
        f"(0 = base model); rows: each prompt × seed.</p>"
        + '<div class="row">'
        + "".join(figure(e["grids"]["sweep"], n) for n, e in epochs.items())
        + "</div>",
        random_section(ctx, epochs),
        caption_section(ctx, epochs),
        vae_section(checks.get("latents", {})),
        checks_section(checks),
    ]
    return page("loraforge evaluation", "\n".join(body))


def random_section(ctx: Context, epochs: dict[str, Any]) -> str:
    """The random-prompt grids with their recorded prompts and seeds.

    Args:
        ctx: the shared context.
        epochs: per epoch name, with `grids`.
    """
    from loraforge.htmlreport import esc, figure

    if not ctx.randoms:
        return ""
    legend = "".join(f"<li>{esc(prompt)} — seed {seed}</li>" for prompt, seed in ctx.randoms)
    figs = "".join(figure(e["grids"]["random"], n) for n, e in epochs.items())
    return f'<h2>Random prompts (columns: weight 0, 1)</h2><ol>{legend}</ol><div class="row">{figs}</div>'


def caption_section(ctx: Context, epochs: dict[str, Any]) -> str:
    """The training captions prompted 1:1 beside their training image (memorisation).

    Args:
        ctx: the shared context.
        epochs: per epoch name, with `grids`.
    """
    from loraforge.htmlreport import esc, figure

    if not ctx.captions:
        return ""
    legend = "".join(f"<li>{esc(c['caption'])}</li>" for c in ctx.captions)
    figs = "".join(figure(e["grids"]["captions"], n) for n, e in epochs.items())
    first = "training image, " if ctx.train_images else ""
    return (
        f"<h2>Training captions prompted 1:1 (columns: {first}weight 0, weight 1)</h2>"
        f"<p>Near-copies of the training image mean overtraining (001 guide).</p><ol>{legend}</ol>"
        f'<div class="row">{figs}</div>'
    )


def vae_section(latents_report: dict[str, Any]) -> str:
    """What the VAE loses (003 guide): the worst reconstructions, original | reconstruction |
    error, with their PSNR. Empty when `latents.vae_check` is off.

    Args:
        latents_report: `reports/latents.json` (its `vae_check` section; sheets live in reports/vae_check).
    """
    from loraforge.htmlreport import esc, figure

    check = latents_report.get("vae_check") or {}
    if not check.get("worst"):
        return ""
    figs = "".join(
        figure(
            f"../{w['sheet']}", f"{w['source']}: {w['psnr_db']:g} dB (worst window {w['worst_window_psnr_db']:g} dB)"
        )
        for w in check["worst"]
    )
    return (
        f"<h2>What the VAE loses</h2><p>decode(encode(image)) with the training VAE: mean PSNR "
        f"{esc(check['mean_psnr_db'])} dB over {esc(check['images'])} images. Worst windows, enlarged: original | "
        f"reconstruction | error ×4. Details lost here cannot be learned (003 guide).</p>"
        f'<div class="row">{figs}</div>'
    )


def checks_section(checks: dict[str, dict[str, Any]]) -> str:
    """The dataset checks from earlier stages: each report's scalar facts and any rejects.

    Args:
        checks: earlier stages' reports by stage name.
    """
    from loraforge.htmlreport import esc, table

    if not checks:
        return ""
    parts = ["<h2>Dataset checks</h2>"]
    for stage, report in checks.items():
        facts = [
            [k, v]
            for k, v in report.items()
            if isinstance(v, (int, float, str, bool)) and k not in ("stage", "seconds")
        ]
        parts.append(f"<h3>{esc(stage)}</h3>" + table(["fact", "value"], facts))
        for key in ("rejected", "duplicates_dropped", "over_limit", "warnings"):
            if report.get(key):
                parts.append(
                    f"<p>{esc(key)}:</p><pre>{esc(json.dumps(report[key], indent=1, ensure_ascii=False))}</pre>"
                )
    return "\n".join(parts)
