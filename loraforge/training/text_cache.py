"""The text side of a training step: captions -> the UNet's conditioning, with the
text-encoder outputs cached through the item store when the encoders are frozen and the
captions are not randomised (then a caption always encodes to the same tensors).

Key: the caption text, the weight hashes of the tokenizers and encoders, the architecture and a
format version. Entry: `hidden` (77, D) and, for SDXL, `pooled` (P,), as float32 safetensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from loraforge.models.conditioning import encode_sd15, encode_sdxl, sdxl_time_ids
from loraforge.models.loading import ModelInfo, component_hash
from loraforge.store.items import ItemStore

Encode = Callable[[list[str]], tuple[torch.Tensor, "torch.Tensor | None"]]


def make_encode(arch: str, tokenizers: list[Any], encoders: list[Any]) -> Encode:
    """captions -> (hidden (B, 77, D), pooled (B, P) or None) with the live encoders.

    Args:
        arch: `sd15` or `sdxl`.
        tokenizers: one per encoder.
        encoders: the text encoders.
    """
    if arch == "sd15":
        return lambda captions: (encode_sd15(tokenizers[0], encoders[0], captions), None)
    return lambda captions: encode_sdxl(tokenizers, encoders, captions)


class CachedEncode:
    """An `Encode` that reads each caption's outputs from the store, encoding only the misses.

    Args:
        encode: the live encoder function.
        store: the item store.
        model_key: identity of the tokenizers and encoders (their weight hashes) and the arch.
        device: where returned tensors go.
    """

    def __init__(self, encode: Encode, store: ItemStore, model_key: dict[str, Any], device: Any) -> None:
        self.encode, self.store, self.model_key, self.device = encode, store, model_key, device
        self.hits = self.misses = 0

    def one(self, caption: str) -> dict[str, torch.Tensor]:
        """The cached entry of one caption (encoded and stored on a miss)."""

        def encode(tmp: Any) -> None:
            with torch.no_grad():
                hidden, pooled = self.encode([caption])
            entry = {"hidden": hidden[0].float().cpu().contiguous()}
            if pooled is not None:
                entry["pooled"] = pooled[0].float().cpu().contiguous()
            save_file(entry, str(tmp))

        path, made = self.store.cached(
            "text-embedding", {"caption": caption, "model": self.model_key}, ".safetensors", encode
        )
        self.misses += made
        self.hits += not made
        return load_file(str(path))

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        entries = [self.one(c) for c in captions]
        hidden = torch.stack([e["hidden"] for e in entries]).to(self.device)  # (B, 77, D)
        pooled = (
            torch.stack([e["pooled"] for e in entries]).to(self.device) if "pooled" in entries[0] else None
        )  # (B, P)
        return hidden, pooled


def text_encode(
    info: ModelInfo,
    tokenizers: list[Any],
    encoders: list[Any],
    cached: bool,
    store: ItemStore,
    state_dir: Path,
    device: Any,
) -> Encode:
    """The caption encoder for the loop: outputs cached through the item store when `cached`
    (no encoder trains and captions are not randomised), else the live encoders.

    Args:
        info: the resolved model.
        tokenizers: one per encoder.
        encoders: the text encoders.
        cached: whether a caption always encodes to the same tensors.
        store: the item store.
        state_dir: loraforge's private folder (weight-hash cache).
        device: the training device.
    """
    encode = make_encode(info.arch, tokenizers, encoders)
    if not cached:
        return encode
    parts = (
        ("tokenizer", "text_encoder")
        if info.arch == "sd15"
        else ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
    )
    model_key = {"arch": info.arch, **{p: component_hash(info, p, state_dir) for p in parts}}
    return CachedEncode(encode, store, model_key, device)


def conditioning(
    arch: str, encode: Encode, batch: list[dict[str, Any]], captions: list[str], device: Any
) -> dict[str, Any]:
    """Text embeddings (and SDXL's pooled embeddings + time ids) for a batch.

    Args:
        arch: `sd15` or `sdxl`.
        encode: captions -> (hidden, pooled): the live encoders, or their cached outputs.
        batch: the examples (bucket, original size and crop for SDXL's time ids).
        captions: the captions to encode (after augmentation).
        device: the training device.
    """
    hidden, pooled = encode(captions)  # (B, 77, D) [SDXL: D1 + D2], (B, P) or None
    if arch == "sd15":
        return {"hidden": hidden}
    w, h = batch[0]["bucket"]
    time_ids = sdxl_time_ids([e["original_size"] for e in batch], [e["crop_top_left"] for e in batch], (h, w))  # (B, 6)
    return {"hidden": hidden, "added": {"text_embeds": pooled, "time_ids": time_ids.to(device, hidden.dtype)}}
