"""Text and size conditioning for SD1.5 and SDXL UNets (training and evaluation share it).

SD1.5: the text encoder's last hidden state, (B, 77, 768).
SDXL:  both encoders' penultimate hidden states concatenated, (B, 77, 768 + 1280), the second
       encoder's pooled projection, (B, 1280), and six "time ids" per image: original size
       (h, w), crop top-left (top, left), target size (h, w) — the micro-conditioning.
"""

from __future__ import annotations

from typing import Any

import torch


def tokenize(tokenizer: Any, captions: list[str]) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's window: (B, 77)."""
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_sd15(tokenizer: Any, encoder: Any, captions: list[str]) -> torch.Tensor:
    """SD1.5 prompt embeddings: (B, 77, D)."""
    ids = tokenize(tokenizer, captions).to(encoder.device)
    return encoder(ids)[0]


def encode_sdxl(tokenizers: list[Any], encoders: list[Any], captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL prompt embeddings (B, 77, D1 + D2) and pooled embeddings (B, P) from encoder 2."""
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, encoders):
        ids = tokenize(tokenizer, captions).to(encoder.device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])  # penultimate layer, as SDXL was trained
        pooled = out[0]  # CLIPTextModelWithProjection: text_embeds (B, P); last encoder wins
    return torch.cat(hidden, dim=-1), pooled


def sdxl_time_ids(
    original_sizes: list[list[int]], crops_top_left: list[list[int]], target_size: tuple[int, int]
) -> torch.Tensor:
    """(B, 6) micro-conditioning: original (h, w), crop (top, left), target (h, w) in pixels."""
    rows = [[*orig, *crop, *target_size] for orig, crop in zip(original_sizes, crops_top_left)]
    return torch.tensor(rows, dtype=torch.float32)
