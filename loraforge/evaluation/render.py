"""Evaluation renders: what every epoch renders (`Shots`, the 004 guide's comparison method), and
the base model's diffusers pipeline with an epoch's LoRA loaded as an adapter, one image per
(LoRA, prompt, seed, weight). The grids they are tiled into are in `loraforge.evaluation.grids`.

Every image is an item in the store (`eval-image`) keyed by the base model's weight hashes, the
LoRA's tensors (`lora_content_hash`, not its metadata, which holds a save date), the prompt, seed,
weight and sampler settings: an unchanged image is never generated again, and weight 0 (the base
model) is shared by every LoRA. The pipeline is loaded only when the store lacks an image.
"""

from __future__ import annotations

import json
import random
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import xxhash
from PIL import Image

from loraforge.store.fanout import FanOut, chunked
from loraforge.store.items import Item
from loraforge.models.loading import component_hash, load_pipeline, resolve_device, resolve_model

if TYPE_CHECKING:
    from loraforge.pipeline.params import ModelParams
    from loraforge.store.items import ItemStore


# ---------------------------------------------------------------- what to render


@dataclass(frozen=True)
class Shots:
    """What every epoch renders: the same prompts and seeds for every epoch and experiment.

    Attributes:
        prompts: the fixed prompts, `{trigger}` filled in; the first is the simple one.
        seeds: the fixed seeds.
        weights: the LoRA-weight sweep of the fixed prompts (0 = the base model).
        randoms: the random prompts with their recorded seeds, rendered at weights 0 and 1.
        captions: training captions prompted 1:1 (`id`, `caption`), at weights 0 and 1 with the first seed.
    """

    prompts: list[str]
    seeds: tuple[int, ...]
    weights: tuple[float, ...]
    randoms: list[tuple[str, int]]
    captions: list[dict[str, Any]]

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """The fixed (prompt index, seed) pairs, prompt-major: the rows of the weight sweep."""
        return [(i, s) for i in range(len(self.prompts)) for s in self.seeds]

    @property
    def shown_weight(self) -> float:
        """The weight of the cross-epoch grids, likeness and CLIP score (see `show_weight`)."""
        return show_weight(self.weights)

    @property
    def per_epoch(self) -> int:
        """How many images one epoch renders."""
        return len(self.prompts) * len(self.seeds) * len(self.weights) + 2 * (len(self.randoms) + len(self.captions))


def render_prompts(prompts: Sequence[str], trigger: str) -> list[str]:
    """Prompts with `{trigger}` filled in.

    Args:
        prompts: templates.
        trigger: the activation token.
    """
    return [p.replace("{trigger}", trigger) for p in prompts]


def random_shots(
    pool: Sequence[str], count: int, seed: int, trigger: str, template: str = "{trigger}, {subject}"
) -> list[tuple[str, int]]:
    """The random prompts and their recorded seeds: drawn from `seed` only, so the same for every
    epoch and experiment with the same params.

    Args:
        pool: subjects to draw from (`evaluate.random_pool`).
        count: how many (`evaluate.random_prompts`).
        seed: seeds the draw (`evaluate.random_seed`).
        trigger: the activation token.
        template: the prompt with `{subject}` and `{trigger}` (`evaluate.random_template`).
    """
    rng = random.Random(seed)
    shots = []
    for _ in range(count):
        prompt = template.replace("{subject}", rng.choice(pool)).replace("{trigger}", trigger)
        shots.append((prompt, rng.randrange(2**31)))
    return shots


def caption_shots(captions: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The first `n` training captions by image id (a stable choice): `{id, caption}` rows.

    Args:
        captions: rows of data/captions/manifest.jsonl.
        n: how many.
    """
    return [{"id": r["id"], "caption": r["caption"]} for r in sorted(captions, key=lambda r: r["id"])[:n]]


def show_weight(weights: Sequence[float]) -> float:
    """The weight shown in the cross-epoch grids and used for likeness: 1 when swept, else the largest.

    Args:
        weights: `evaluate.weights`.
    """
    return 1.0 if 1.0 in weights else max(weights)


# ---------------------------------------------------------------- images in the store


def lora_content_hash(path: Path) -> str:
    """xxh3-128 of a safetensors file's tensors (names, dtypes, shapes, bytes), not its metadata:
    kohya metadata carries a date and run facts that change on every save, not the images.

    Args:
        path: a `.safetensors` file.

    Raises:
        ValueError: the file is not safetensors (names the file).
    """
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
    store: ItemStore,
    model_hash: str,
    lora_hash: str | None,
    prompt: str,
    seed: int,
    weight: float,
    *,
    steps: int,
    guidance_scale: float,
    negative_prompt: str,
    size: int,
) -> Item:
    """Store entry of one evaluation image; weight 0 does not depend on the LoRA.

    Args:
        store: the item store.
        model_hash: hash of the base model's weighted components.
        lora_hash: `lora_content_hash` of the LoRA file.
        prompt: the rendered prompt.
        seed: generator seed.
        weight: LoRA weight.
        steps: sampler steps (`evaluate.steps`).
        guidance_scale: classifier-free guidance (`evaluate.guidance_scale`).
        negative_prompt: the negative prompt (`evaluate.negative_prompt`).
        size: image side in pixels.
    """
    return store.item(
        "eval-image",
        model=model_hash,
        lora=lora_hash if weight else None,
        prompt=prompt,
        seed=seed,
        weight=weight,
        steps=steps,
        guidance=guidance_scale,
        size=size,
        negative=negative_prompt,
    )


class Renderer:
    """Generates (or fetches from the store) one image per (lora, prompt, seed, weight).

    Attributes:
        size: image side in pixels (the model's native resolution unless given).
        model_hash: the base model's identity in every image key.
        computed: images generated so far.
        reused: images found in the store so far.
    """

    def __init__(
        self,
        model: ModelParams,
        store: ItemStore,
        state_dir: Path,
        *,
        size: int | None,
        steps: int,
        guidance_scale: float,
        negative_prompt: str,
    ) -> None:
        """Resolve the base model (loaded lazily, on the first image the store lacks).

        Args:
            model: the `model` section (base model and device).
            store: the item store the images live in.
            state_dir: the project's state folder (built-in models, hash cache).
            size: image side in pixels; None = the model's native resolution.
            steps: sampler steps.
            guidance_scale: classifier-free guidance.
            negative_prompt: used for every image ("" = none).
        """
        info = resolve_model(model, state_dir)
        self.store = store
        self.size = size or info.native_resolution
        self.steps, self.guidance_scale, self.negative_prompt = steps, guidance_scale, negative_prompt
        comps = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if info.arch == "sdxl" else [])
        self.model_hash = "-".join(component_hash(info, c, state_dir) for c in comps)
        self.info, self.device = info, model.device
        self._pipe: Any = None
        self._adapter: str | None = None
        self._lycoris: Any = None  # a DeltaAdapter while a LyCORIS / DoRA file is applied
        self.computed = self.reused = 0

    def __getstate__(self) -> dict[str, Any]:
        return {
            **self.__dict__,
            "_pipe": None,
            "_adapter": None,
            "_lycoris": None,
        }  # a worker loads the pipeline itself

    def item(self, lora_hash: str, prompt: str, seed: int, weight: float) -> Item:
        """The store entry of one image.

        Args:
            lora_hash: the LoRA's content hash.
            prompt: the rendered prompt.
            seed: generator seed.
            weight: LoRA weight (0 = base model).
        """
        return image_item(
            self.store,
            self.model_hash,
            lora_hash,
            prompt,
            seed,
            weight,
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            negative_prompt=self.negative_prompt,
            size=self.size,
        )

    def render(self, shot: dict[str, Any]) -> None:
        """Generate one image (`key`, `lora`, `prompt`, `seed`, `weight`) into the store."""
        lora = Path(shot["lora"]) if shot["weight"] else None
        image = self._generate(lora, shot["prompt"], shot["seed"], shot["weight"])
        Item(self.store, "eval-image", shot["key"]).put(".png", lambda p: image.save(p, format="PNG"))

    def _set_lora(self, pipe: Any, lora: Path | None, weight: float) -> None:
        """Switch the pipeline's adapter to `lora` at `weight` (None: LoRA off, the base model).
        Plain LoRA files load as diffusers adapters; LyCORIS / DoRA files (which diffusers does
        not apply) through `loraforge.lora.lycoris.DeltaAdapter`, with `weight` as its strength.

        Args:
            pipe: the loaded diffusers pipeline.
            lora: the LoRA file, or None.
            weight: the adapter weight.
        """
        if lora is None:
            if self._lycoris is not None:
                self._lycoris.strength = 0.0
            elif self._adapter:
                pipe.disable_lora()
            return
        name = lora.stem.replace("-", "_").replace(".", "_")
        if self._adapter != name:
            self._drop_adapter(pipe)
            self._lycoris = lycoris_adapter(pipe, self.info.arch, lora)
            if self._lycoris is None:
                pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name=name)
            self._adapter = name
        if self._lycoris is not None:
            self._lycoris.strength = weight
            return
        pipe.enable_lora()
        pipe.set_adapters([name], adapter_weights=[weight])

    def _drop_adapter(self, pipe: Any) -> None:
        """Unload the current adapter (diffusers' or the LyCORIS one)."""
        if self._lycoris is not None:
            self._lycoris.remove()
            self._lycoris = None
        elif self._adapter:
            pipe.delete_adapters(self._adapter)
        self._adapter = None

    def _generate(self, lora: Path | None, prompt: str, seed: int, weight: float) -> Image.Image:
        """One image from the pipeline (loaded on first use).

        Args:
            lora: the LoRA file, or None for the base model.
            prompt: the rendered prompt.
            seed: generator seed (for torch's default, CPU, generator).
            weight: LoRA weight.
        """
        if self._pipe is None:
            self._pipe = load_pipeline(self.info, resolve_device(self.device))
        self._set_lora(self._pipe, lora, weight)
        return self._pipe(
            prompt,
            negative_prompt=self.negative_prompt or None,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            width=self.size,
            height=self.size,
            generator=torch.Generator().manual_seed(seed),
        ).images[0]


def lycoris_adapter(pipe: Any, arch: str, lora: Path) -> Any:
    """A `DeltaAdapter` applying a LyCORIS / DoRA file to the pipeline's UNet and text encoders
    (at strength 1), or None when the file is a plain LoRA (diffusers loads those).

    Args:
        pipe: the diffusers pipeline.
        arch: `sd15` or `sdxl`.
        lora: the `.safetensors` file.
    """
    from loraforge.lora.format import load_lora
    from loraforge.lora.lycoris import DeltaAdapter, file_algo, refuse_tucker_lokr

    tensors, _ = load_lora(lora)
    refuse_tucker_lokr(tensors, lora)
    if file_algo(tensors) == "lora":
        return None
    names = ("unet", "text_encoder", "text_encoder_2")
    return DeltaAdapter({n: getattr(pipe, n, None) for n in names}, arch, tensors)


def render_chunk(renderer: Renderer, shots: list[dict[str, Any]]) -> int:
    """Generate each missing image of a chunk into the store (the pipeline loads once per process)."""
    for shot in shots:
        renderer.render(shot)
    return len(shots)


def render_epoch(
    renderer: Renderer, shots: Shots, lora: Path, fan_out: FanOut, progress: Callable[[int], None]
) -> dict[str, Any]:
    """Every image of one epoch: `{"fixed": {(prompt_i, seed, weight): path}, "random": {(j, weight): path},
    "caption": {(image id, weight): path}}` plus the keys of all of them (`keys`) and how many were
    generated (`computed`). The images the store lacks are generated in chunks through `fan_out`.

    Args:
        renderer: the renderer (through the item store).
        shots: what to render.
        lora: the epoch's LoRA file.
        fan_out: where chunks of missing images run.
        progress: called with a number of images done.
    """
    lora_hash, s = lora_content_hash(lora), shots
    plan = [
        ("fixed", (i, sd, w), prompt, sd, w) for i, prompt in enumerate(s.prompts) for sd in s.seeds for w in s.weights
    ]
    plan += [("random", (j, w), prompt, sd, w) for j, (prompt, sd) in enumerate(s.randoms) for w in (0.0, 1.0)]
    plan += [("caption", (c["id"], w), c["caption"], s.seeds[0], w) for c in s.captions for w in (0.0, 1.0)]
    items = [renderer.item(lora_hash, prompt, seed, weight) for _, _, prompt, seed, weight in plan]
    missing: dict[str, dict[str, Any]] = {}
    for item, (_, _, prompt, seed, weight) in zip(items, plan):
        if item.key not in missing and item.get(".png") is None:
            missing[item.key] = {"key": item.key, "lora": str(lora), "prompt": prompt, "seed": seed, "weight": weight}
    progress(len(plan) - len(missing))
    fan_out.map(render_chunk, renderer, chunked(list(missing.values()), fan_out.chunk_size), progress)
    renderer.computed += len(missing)
    renderer.reused += len(plan) - len(missing)
    out: dict[str, Any] = {"fixed": {}, "random": {}, "caption": {}}
    for item, (group, label, *_) in zip(items, plan):
        out[group][label] = item.get(".png")
    return {**out, "keys": [item.key for item in items], "computed": len(missing)}
