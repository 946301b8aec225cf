"""BLIP captions for the caption stage (`BlipForConditionalGeneration` + `BlipProcessor`).

The model loads from a local folder written by `save_pretrained` (config.json, safetensors
weights, processor and tokenizer files; `loraforge.captioning.captioners.locate_model`), e.g.
`Salesforce/blip-image-captioning-large`. Beam search or nucleus sampling (seeded per image, so a
caption never depends on its batch), lengths in new tokens, an optional text prompt that
conditions the caption and is cut from it. `run(images)` returns each caption as UTF-8 bytes,
which the stage caches; `caption(raw)` decodes one.

transformers is imported when the model loads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from loraforge.models.loading import quiet_hf_loading, resolve_device
from loraforge.models.weights import pretrained_kwargs

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True)
class BlipSettings:
    """How BLIP writes a caption.

    Attributes:
        decoding: `beam` (deterministic beam search; 1 beam = greedy) or `nucleus` (top-p sampling).
        num_beams: beams for `beam`.
        top_p: probability mass kept for `nucleus`.
        min_length: fewest new tokens (after the prompt).
        max_length: most new tokens (after the prompt).
        prompt: text the caption continues (`a picture of`); it conditions the caption and is cut from it.
        seed: torch seed for `nucleus`, set per image.
    """

    decoding: Literal["beam", "nucleus"] = "beam"
    num_beams: int = 3
    top_p: float = 0.9
    min_length: int = 5
    max_length: int = 75
    prompt: str = ""
    seed: int = 42

    def identity(self) -> dict[str, Any]:
        """The settings that change a caption (for cache keys): beam or sampling settings, not both."""
        drop = ("top_p", "seed") if self.decoding == "beam" else ("num_beams",)
        return {k: v for k, v in asdict(self).items() if k not in drop}

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `generate`: lengths in new tokens, beam or nucleus decoding."""
        kwargs: dict[str, Any] = {"min_new_tokens": self.min_length, "max_new_tokens": self.max_length}
        if self.decoding == "beam":
            return {**kwargs, "do_sample": False, "num_beams": self.num_beams}
        return {**kwargs, "do_sample": True, "top_p": self.top_p, "top_k": 0, "num_beams": 1}


class BlipCaptioner:
    """BLIP conditional captioning (`BlipForConditionalGeneration` + `BlipProcessor`), loaded on first use.

    Args:
        folder: a local BLIP folder (`locate_model`).
        settings: decoding settings.
        device: `auto` (CUDA when available), `cpu` or `cuda` (`model.device`).
    """

    suffix = ".txt"

    def __init__(self, folder: Path, settings: BlipSettings, device: str = "auto") -> None:
        self.folder, self.settings, self.device = Path(folder), settings, device
        self._model: Any = None
        self._processor: Any = None

    def identity(self) -> dict[str, Any]:
        """What besides the model files changes the raw output."""
        return self.settings.identity()

    def load(self) -> None:
        """Load processor and model (safetensors only, local files only) onto the device."""
        from transformers import BlipForConditionalGeneration, BlipProcessor

        quiet_hf_loading()
        self._processor = BlipProcessor.from_pretrained(self.folder, local_files_only=True)
        kwargs = pretrained_kwargs(self.folder, allow_pickle=False, opt_in="model.allow_pickle")  # safetensors only
        model = BlipForConditionalGeneration.from_pretrained(self.folder, **kwargs)
        self._model = model.to(resolve_device(self.device)).eval()

    def generate_ids(self, images: list[Image.Image]) -> list[list[int]]:
        """New token ids per image: prompt cut, stopped before the end token (and the padding after it).

        Beam search runs the batch at once; nucleus sampling runs image by image, each from
        `settings.seed`, so a sampled caption does not depend on the images beside it.

        Args:
            images: RGB images.
        """
        if self._model is None:
            self.load()
        if self.settings.decoding == "beam":
            return self._generate(images)
        out = []
        devices = [self._model.device] if self._model.device.type == "cuda" else []
        for image in images:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.settings.seed)
                out += self._generate([image])
        return out

    def _generate(self, images: list[Image.Image]) -> list[list[int]]:
        """One `generate` call on a batch; returns the new ids per image."""
        text = [self.settings.prompt] * len(images) if self.settings.prompt else None
        inputs = self._processor(images=[im.convert("RGB") for im in images], text=text, return_tensors="pt").to(
            self._model.device
        )
        # BLIP replaces the first prompt token by BOS and drops the last ([SEP]): the decoder
        # starts from (B, prompt_len - 1) ids, or from BOS alone without a prompt.
        start = inputs["input_ids"].shape[1] - 1 if text else 1
        with torch.inference_mode():
            ids = self._model.generate(**inputs, **self.settings.generate_kwargs())  # (B, start + new)
        end = self._model.config.text_config.sep_token_id  # BLIP's decoder ends captions with [SEP]
        return [_until(row[start:].tolist(), end) for row in ids]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_model": None, "_processor": None}  # a worker loads the model itself

    def run(self, images: list[Image.Image]) -> list[bytes]:
        """One caption per image, UTF-8 encoded (the raw output the stage caches)."""
        ids = self.generate_ids(images)  # loads the model and processor on first use
        decode = self._processor.tokenizer.decode
        return [" ".join(decode(row, skip_special_tokens=True).split()).encode("utf-8") for row in ids]

    def caption(self, raw: bytes) -> str:
        """The caption from a raw output."""
        return raw.decode("utf-8")


def _until(ids: list[int], end: int) -> list[int]:
    """Ids before the first `end` token (rows that end early are padded after it)."""
    return ids[: ids.index(end)] if end in ids else ids
