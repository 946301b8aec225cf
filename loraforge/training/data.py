"""Training data: examples (a cached latent joined with its caption), the epoch's batches, each
process's share of them, the steps plan, latent loading overlapped with compute, and the captions
a step trains with.

An example is a row of the latents manifest plus `path` (its safetensors file) and `caption`:
`id`, `bucket` [w, h], `original_size` [h, w], `crop_top_left` [top, left], `repeats`, and
`masked: true` when its entry holds a mask. The order of
an epoch depends only on (seed, epoch), so a resumed run sees the batches the uninterrupted one saw.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file

from loraforge.data.images import read_jsonl
from loraforge.training.captions import CaptionSettings, split_at_separator, train_caption
from loraforge.errors import Diverged, InputError

Example = dict[str, Any]


def load_examples(latents_dir: Path, captions_dir: Path, repeats: int, separator: str = "") -> list[Example]:
    """One example per latent (flipped copies included), joined with its caption, repeated. A
    caption written with the separator is read as its plain text, its kept tags in `keep`.

    Args:
        latents_dir: the latents stage's folder (manifest.jsonl + one safetensors per latent).
        captions_dir: the caption stage's folder (manifest.jsonl).
        repeats: `finetune.repeats`, multiplied with each image's folder repeats.
        separator: `finetune.keep_tokens_separator` ("" = none).
    """
    captions = {
        row["id"]: split_at_separator(row["caption"], separator) for row in read_jsonl(captions_dir / "manifest.jsonl")
    }
    examples = []
    for row in read_jsonl(latents_dir / "manifest.jsonl"):
        if row["id"] not in captions:
            raise InputError(f"latent {row['file']} has no caption in {captions_dir / 'manifest.jsonl'}")
        caption, keep = captions[row["id"]]
        example = {**row, "path": latents_dir / row["file"], "caption": caption, "keep": keep}
        examples += [example] * (row.get("repeats", 1) * repeats)
    if not examples:
        raise InputError(f"no training examples in {latents_dir}")
    return examples


def epoch_batches(examples: list[Example], batch_size: int, seed: int, epoch: int) -> list[list[Example]]:
    """Shuffled batches for one epoch; a batch holds one bucket only (latents must stack).

    Args:
        examples: from `load_examples`.
        batch_size: images per batch.
        seed: `finetune.seed`.
        epoch: 1-based epoch: the order depends only on (seed, epoch), which makes resume exact.
    """
    order = list(range(len(examples)))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    by_bucket: dict[tuple[int, int], list[Example]] = defaultdict(list)
    for i in order:
        by_bucket[tuple(examples[i]["bucket"])].append(examples[i])
    batches = [group[s : s + batch_size] for group in by_bucket.values() for s in range(0, len(group), batch_size)]
    random.Random(seed * 100_003 + epoch + 1).shuffle(batches)
    return batches


def shard(batches: list[Any], rank: int, world: int) -> list[Any]:
    """Process `rank`'s share of the epoch's batches: every `world`-th one, the list first padded
    by wrapping around so each process steps the same number of times (DDP all-reduces in step).

    Args:
        batches: the epoch's batches.
        rank: this process's index.
        world: the number of processes.
    """
    padded = batches + batches[: (-len(batches)) % world] if batches else batches
    return padded[rank::world]


def plan(
    examples: list[Example], batch_size: int, epochs: int, gradient_accumulation: int, processes: int, seed: int
) -> dict[str, Any]:
    """The steps arithmetic (000 guide): steps ≈ images × repeats / batch × epochs, and the exact
    count given that a batch never mixes buckets, per process.

    Args:
        examples: from `load_examples`.
        batch_size: `finetune.batch_size`.
        epochs: `finetune.epochs`.
        gradient_accumulation: `finetune.gradient_accumulation`.
        processes: training processes (`finetune.num_processes`): each steps through its share.
        seed: `finetune.seed`.
    """
    batches = math.ceil(len(epoch_batches(examples, batch_size, seed, 0)) / processes)  # per process
    images = len({e["id"] for e in examples})
    return {
        "images": images,
        "masked_images": len({e["id"] for e in examples if e.get("masked")}),  # with a mask (latents manifest)
        "examples_per_epoch": len(examples),
        "formula_steps": math.ceil(len(examples) / batch_size) * epochs,
        "steps_per_epoch": batches,
        "steps": batches * epochs,
        # the last, partial accumulation group of an epoch still steps (as kohya's loop does)
        "optimizer_steps": math.ceil(batches / gradient_accumulation) * epochs,
    }


def load_latents(batch: list[Example], scaling_factor: float) -> torch.Tensor:
    """(B, 4, H/8, W/8) latents scaled for the UNet; a non-finite latent stops the run, naming its file.

    Args:
        batch: examples of one bucket.
        scaling_factor: the VAE's latent scale.
    """
    return load_batch(batch, scaling_factor, masked=False)[0]


def load_batch(batch: list[Example], scaling_factor: float, masked: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The batch's latents (B, 4, H/8, W/8), scaled for the UNet, and with `masked` its masks
    (B, 1, H/8, W/8) in [0, 1] (an image without a mask: all ones), else None. Each file is read once.

    Args:
        batch: examples of one bucket.
        scaling_factor: the VAE's latent scale.
        masked: `finetune.masked_loss`.
    """
    entries = [load_file(str(e["path"])) for e in batch]
    for e, entry in zip(batch, entries):
        if not torch.isfinite(entry["latent"]).all():
            raise Diverged(
                f"latent {e['path']} has NaN/inf values: it was encoded by a VAE in half precision "
                "(SDXL's VAE overflows in fp16: encode latents with the VAE in float32, 'no half VAE')"
            )
    latents = torch.stack([entry["latent"] for entry in entries]) * scaling_factor
    if not masked:
        return latents, None
    ones = torch.ones(1, *latents.shape[2:])  # (1, H/8, W/8)
    return latents, torch.stack([entry.get("mask", ones) for entry in entries])


def prefetch(batches: list[list[Example]], load: Callable[[list[Example]], Any]) -> Iterator[tuple[list[Example], Any]]:
    """Yield (batch, load(batch)), reading the next batch in a background thread while this one
    trains (data loading overlapped with compute; safetensors reads release the GIL).

    Args:
        batches: the epoch's batches.
        load: batch -> tensors (`load_batch`).
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        future = pool.submit(load, batches[0]) if batches else None
        for i, batch in enumerate(batches):
            data = future.result()  # re-raises a loading error (e.g. a NaN latent) here
            if i + 1 < len(batches):
                future = pool.submit(load, batches[i + 1])
            yield batch, data


def batch_captions(batch: list[Example], settings: CaptionSettings, seed: int, step: int, epoch: int) -> list[str]:
    """The captions this step trains with (shuffled / dropped per `caption_*` and `keep_tokens`).

    Args:
        batch: examples of the step.
        settings: the caption augmentation.
        seed: `finetune.seed`.
        step: this process's draw of the global step (with the seed and the index in the batch: the random source).
        epoch: 1-based epoch.
    """
    return [
        train_caption(e["caption"], settings, random.Random(f"{seed}/{step}/{i}"), epoch, e.get("keep"))
        for i, e in enumerate(batch)
    ]
