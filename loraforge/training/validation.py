"""The validation loss: the diffusion loss on images that never train, with fixed noise and fixed
timesteps, after every saved epoch, so the epochs (and experiments) compare on the same draws.

The images are held out of the training set (`finetune.validation_split`: the images with the
smallest content hashes, so the choice is stable when images are added) or come from a folder
(`finetune.validation_folder`, VAE-encoded once through the item store like `reg_images`).

Fixed draws: each validation latent is noised at `timesteps` timesteps spread evenly over the
schedule (the middles of `timesteps` equal slices of [0, T)), with noise from a generator seeded by
a constant (`VALIDATION_SEED`, not `finetune.seed`: runs with other seeds see the same draws) and
the latent's key. The loss settings are the training ones (type, Huber c, SNR weighting, target)
without noise augmentation (offset, pyramid, input perturbation) and with every module in eval
mode (no LoRA dropout), under no_grad.

A validation item is a dict: `key` (the image id, `-flip` for a flipped copy, or the folder
image's content hash), `latent` (4, h, w) × scaling_factor, `caption`, `bucket` [w, h],
`original_size` [h, w], `crop_top_left` [top, left]; a held-out image's `mask` (1, h, w) (all
ones without one), which weights its loss as in training when `finetune.masked_loss` is on.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from loraforge.errors import InputError
from loraforge.store.fingerprint import hash_json
from loraforge.training.data import Example, load_batch
from loraforge.training.ema import EMA
from loraforge.training.losses import LossSettings, noised_loss
from loraforge.training.setup import Training
from loraforge.training.text_cache import conditioning

VALIDATION_SEED = 20_261_203  # the draws' constant seed: the same for every epoch, run and experiment


def held_out_count(split: float | int, images: int) -> int:
    """How many images `validation_split` holds out: a share in (0, 1) of the images (rounded,
    at least 1), or a count ≥ 1; 0 = none.

    Args:
        split: `finetune.validation_split`.
        images: distinct training images.
    """
    if not split:
        return 0
    return max(1, round(split * images)) if isinstance(split, float) else int(split)


def split_examples(examples: list[Example], split: float | int) -> tuple[list[Example], list[Example]]:
    """(training examples, held-out examples): the images with the smallest ids (their content
    hashes) are held out with every repeat and flipped copy; a split that leaves no training
    image is refused.

    Args:
        examples: from `data.load_examples` (repeated).
        split: `finetune.validation_split` (see `held_out_count`).
    """
    ids = sorted({e["id"] for e in examples})
    n = held_out_count(split, len(ids))
    if n >= len(ids):
        raise InputError(
            f"`finetune.validation_split` {split} holds out {n} of {len(ids)} images: no training image is left"
        )
    held = set(ids[:n])
    return [e for e in examples if e["id"] not in held], [e for e in examples if e["id"] in held]


def held_out_items(held: list[Example], scaling_factor: float) -> list[dict[str, Any]]:
    """Validation items (see the module doc) from the held-out examples, one per latent file.

    Args:
        held: the held-out examples (`split_examples`; repeats collapse).
        scaling_factor: the VAE's latent scale.
    """
    unique = {str(e["path"]): e for e in held}
    items = []
    for _, e in sorted(unique.items()):
        latents, masks = load_batch([e], scaling_factor, masked=True)  # (1, 4, h, w), (1, 1, h, w)
        items.append({**e, "key": e["path"].stem, "latent": latents[0], "mask": masks[0]})  # type: ignore[index]
    return items


def fixed_timesteps(num_train_timesteps: int, k: int) -> torch.Tensor:
    """(k,) timesteps: the middles of k equal slices of [0, T).

    Args:
        num_train_timesteps: the schedule's T (1000 for SD).
        k: `finetune.validation_timesteps`.
    """
    return torch.tensor([int((i + 0.5) * num_train_timesteps / k) for i in range(k)], dtype=torch.long)


def fixed_noise(key: str, k: int, shape: torch.Size) -> torch.Tensor:
    """(k, C, h, w) Gaussian noise from (`VALIDATION_SEED`, key) alone.

    Args:
        key: the validation item's key.
        k: how many draws (one per timestep).
        shape: (C, h, w) of the latent.
    """
    seed = int(hash_json({"seed": VALIDATION_SEED, "key": key})[:15], 16)
    return torch.randn((k, *shape), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def validation_loss(t: Training, items: list[dict[str, Any]], s: LossSettings, k: int) -> float:
    """The mean loss over the items and their k fixed (noise, timestep) draws, every module in
    eval mode (restored after). Every process must call it (FSDP gathers in the forward); each
    computes all items, so all get the same value.

    Args:
        t: the model (UNet, encoders, noise scheduler, precision).
        items: the validation items.
        s: the training loss settings (noise augmentation does not apply: the noise is fixed).
        k: timesteps per item.
    """
    modules = [t.unet, *t.encoders, *t.trained.values()]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    timesteps = fixed_timesteps(t.noise_scheduler.config.num_train_timesteps, k)  # (k,)
    device = t.accelerator.device
    losses = []
    for item in items:
        latents = item["latent"].unsqueeze(0).expand(k, -1, -1, -1).to(device)  # (k, 4, h, w)
        noise = fixed_noise(item["key"], k, item["latent"].shape)  # (k, 4, h, w)
        cond = conditioning(t.info.arch, t.encode, [item] * k, [item["caption"]] * k, device)
        mask = item["mask"].unsqueeze(0).expand(k, -1, -1, -1) if "mask" in item else None  # (k, 1, h, w)
        with t.precision.autocast():
            loss = noised_loss(t.unet, t.noise_scheduler, latents, cond, noise, noise, timesteps, s, mask)
        losses.append(loss.item())
    for m, mode in zip(modules, modes):
        m.train(mode)
    return sum(losses) / len(losses)


@contextmanager
def ema_weights(ema: EMA) -> Iterator[None]:
    """The EMA's averaged weights in place of the raw ones inside the block (float32 weights
    point at the shadows: no copy), the raw ones back after.

    Args:
        ema: the EMA of the trained components.
    """
    raw = {}
    for name, module in ema.components.items():
        for key, p in module.named_parameters():
            if key in ema.shadow[name]:
                raw[(name, key)] = p.data
                p.data = ema.shadow[name][key].to(p.dtype)
    try:
        yield
    finally:
        for name, module in ema.components.items():
            for key, p in module.named_parameters():
                if (name, key) in raw:
                    p.data = raw[(name, key)]


def validation_row(t: Training, items: list[dict[str, Any]], s: LossSettings, k: int, epoch: int) -> dict[str, Any]:
    """One row of `validation.tsv`: `epoch`, `validation_loss`, and `validation_loss_ema` with the
    EMA on (not under FSDP, whose parameters are shards).

    Args:
        t: the model.
        items: the validation items.
        s: the training loss settings.
        k: timesteps per item.
        epoch: the epoch just saved.
    """
    row: dict[str, Any] = {"epoch": epoch, "validation_loss": validation_loss(t, items, s, k)}
    if t.ema is not None and not t.fsdp:
        with ema_weights(t.ema):
            row["validation_loss_ema"] = validation_loss(t, items, s, k)
    return row
