"""Image and text embeddings for the evaluation's similarity metrics (see `loraforge.evaluation.metrics`).

CLIP image (and text) embeddings when `evaluate.clip_model` names a local CLIP model folder,
loaded offline; else the pixel fallback `evalmetrics.pixel_embedding`, which has no text side
(so no CLIP score).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from loraforge.errors import InputError, MissingInput
from loraforge.evaluation.metrics import pixel_embedding, unit
from loraforge.store.fingerprint import hash_tree
from loraforge.models.weights import pretrained_kwargs

PIXELS = "pixels-16x16"  # the fallback's name in the report and its identity in metric keys


def resolve_clip(clip_model: str | None, root: Path) -> Path | None:
    """`evaluate.clip_model` as an absolute folder (relative to the project), or None.

    Args:
        clip_model: the `evaluate.clip_model` setting, or None.
        root: the project root a relative `clip_model` is read from.

    Raises:
        FileNotFoundError: the folder does not exist (names `evaluate.clip_model`).
    """
    if clip_model is None:
        return None
    path = Path(clip_model)
    path = path if path.is_absolute() else root / path
    if not path.is_dir():
        raise MissingInput(f"`evaluate.clip_model` = {clip_model!r}: no folder {path}")
    return path


def _features(out: Any) -> Any:
    """The projected embeddings from `get_*_features` (a tensor, or an output whose pooler holds them).

    Args:
        out: what `CLIPModel.get_image_features` / `get_text_features` returned.
    """
    return out if hasattr(out, "numpy") else out.pooler_output


def _load_clip(clip_dir: Path, allow_pickle: bool) -> tuple[Any, Any, Any]:
    """(model, tokenizer, image processor) of a local CLIP folder, offline, through the project's
    one weights policy (`loraforge.models.weights.pretrained_kwargs`: safetensors unless opted in).

    Args:
        clip_dir: a folder holding a transformers `CLIPModel`, its tokenizer and processor config.
        allow_pickle: `model.allow_pickle`: also load a `pytorch_model.bin` (weights_only).

    Raises:
        MissingInput: the folder holds no `config.json` or no weights (names `evaluate.clip_model`).
        InputError: only pickle weights, and no opt-in.
    """
    if not (clip_dir / "config.json").is_file():
        raise MissingInput(f"`evaluate.clip_model`: {clip_dir} holds no CLIP model (no config.json)")
    kwargs = pretrained_kwargs(clip_dir, allow_pickle)
    # imported here, not at the top: only a configured `clip_model` needs transformers
    import transformers
    from transformers import CLIPModel, CLIPTokenizer

    # the PIL image processor: transformers 5's default one needs torchvision, absent here
    processor = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    return (
        CLIPModel.from_pretrained(clip_dir, **kwargs).eval(),
        CLIPTokenizer.from_pretrained(clip_dir, local_files_only=True),
        processor.from_pretrained(clip_dir, local_files_only=True),
    )


class Embedder:
    """Image (and, with CLIP, text) embeddings: CLIP when `evaluate.clip_model` is set, else
    `evalmetrics.pixel_embedding`.

    Attributes:
        clip_dir: the CLIP model folder, or None.
        method: which embedding, for the report (`pixels-16x16` or `clip:<folder name>`).
        identity: what the embeddings depend on, for metric keys (the CLIP folder's hash).
    """

    def __init__(self, clip_dir: Path | None, allow_pickle: bool = False) -> None:
        """Load the CLIP model from `clip_dir` (offline), or use the pixel fallback when None.

        Args:
            clip_dir: a local CLIP model folder, or None.
            allow_pickle: `model.allow_pickle` (a CLIP folder with only `pytorch_model.bin`).
        """
        self.clip_dir = clip_dir
        self.method = PIXELS if clip_dir is None else f"clip:{clip_dir.name}"
        self.identity = PIXELS if clip_dir is None else hash_tree(clip_dir)
        self._clip = None if clip_dir is None else _load_clip(clip_dir, allow_pickle)

    @property
    def has_text(self) -> bool:
        """Whether text embeddings (hence CLIP score) are available."""
        return self._clip is not None

    def images(self, images: list[Image.Image]) -> np.ndarray:
        """Unit embeddings (N, D) of `images`.

        Args:
            images: PIL images.
        """
        if self._clip is None:
            return np.stack([pixel_embedding(im) for im in images])
        model, _, processor = self._clip
        with torch.no_grad():
            pixels = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
            out = model.get_image_features(pixel_values=pixels)
        return unit(_features(out).float().numpy())

    def texts(self, texts: list[str]) -> np.ndarray:
        """Unit CLIP text embeddings (N, D); only with a CLIP model.

        Args:
            texts: prompts.

        Raises:
            InputError: no CLIP model (`evaluate.clip_model` is not set).
        """
        if self._clip is None:
            raise InputError("text embeddings need `evaluate.clip_model`")
        model, tokenizer, _ = self._clip
        with torch.no_grad():
            tokens = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
            out = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return unit(_features(out).float().numpy())
