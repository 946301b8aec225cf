"""WD14-style booru taggers for the caption stage, run by onnxruntime.

A tagger folder holds `model.onnx` and `selected_tags.csv` (`tag_id,name,category,count`;
category 9 rating, 0 general, 4 character), the layout of the SmilingWolf/wd-* repos. Images are
prepared as those taggers expect: composited and padded to a square on white, resized to the
model's input side (read from the model), BGR, float32 in 0..255. `run(images)` returns each
image's tag scores as .npy bytes, which the stage caches; `caption(raw)` selects the tags with the
current settings, so a new threshold re-selects tags without running the model again.

onnxruntime is imported when the model loads.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from loraforge.captioning.captioners import normalize_tag

RATING, GENERAL, CHARACTER = 9, 0, 4  # selected_tags.csv categories
# Tags whose underscore is part of the face (SmilingWolf's taggers keep these as they are).
KAOMOJIS = frozenset(
    {
        "0_0",
        "(o)_(o)",
        "+_+",
        "+_-",
        "._.",
        "<o>_<o>",
        "<|>_<|>",
        "=_=",
        ">_<",
        "3_3",
        "6_9",
        ">_o",
        "@_@",
        "^_^",
        "o_o",
        "u_u",
        "x_x",
        "|_|",
        "||_||",
    }
)


@dataclass(frozen=True)
class Tag:
    """One row of `selected_tags.csv`: the tag's name and category (9 rating, 0 general, 4 character)."""

    name: str
    category: int


@dataclass(frozen=True)
class Wd14Settings:
    """How a WD14 tagger's scores become a caption.

    Attributes:
        general_threshold: general tags with a score ≥ this are kept.
        character_threshold: character tags with a score ≥ this are kept.
        include_rating: add the most likely rating tag (`general`, `sensitive`...), first.
        undesired_tags: tags never written (matched case-insensitively, `_` = space).
        character_first: character tags before general ones (else after).
        replace_underscores: `long_hair` → `long hair` (kaomoji such as `^_^` stay as they are).
    """

    general_threshold: float = 0.35
    character_threshold: float = 0.85
    include_rating: bool = False
    undesired_tags: tuple[str, ...] = ()
    character_first: bool = True
    replace_underscores: bool = True


def read_selected_tags(path: Path) -> list[Tag]:
    """The tagger's labels in output order, from `selected_tags.csv` (needs `name` and `category` columns).

    Args:
        path: the CSV file.
    """
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"name", "category"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: needs `name` and `category` columns, has {reader.fieldnames}")
        return [Tag(row["name"], int(row["category"])) for row in reader]


def wd14_preprocess(image: Image.Image, size: int) -> np.ndarray:
    """An image as WD14 taggers take it: (size, size, 3) float32 BGR in 0..255.

    Transparency is composited on white, the image padded to a centred square on white, then
    resized with bicubic resampling (SmilingWolf's reference code).

    Args:
        image: any PIL image.
        size: the model's input side.
    """
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    canvas.alpha_composite(rgba)
    rgb = canvas.convert("RGB")
    side = max(rgb.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
    if side != size:
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1].copy()  # RGB -> BGR


def tag_name(name: str, replace_underscores: bool) -> str:
    """The tag as written in a caption: underscores to spaces unless disabled or a kaomoji."""
    return name.replace("_", " ") if replace_underscores and name not in KAOMOJIS else name


def select_tags(scores: np.ndarray, tags: list[Tag], settings: Wd14Settings) -> str:
    """The caption from one image's scores: [rating], character and general tags above their
    thresholds, each group by falling score, undesired tags left out; joined with `, `.

    Args:
        scores: (n_tags,) sigmoid scores in `tags` order.
        tags: `read_selected_tags`.
        settings: thresholds and formatting.
    """
    if len(scores) != len(tags):
        raise ValueError(f"the tagger gives {len(scores)} scores but selected_tags.csv lists {len(tags)} tags")
    undesired = {normalize_tag(t) for t in settings.undesired_tags}

    def group(category: int, threshold: float) -> list[str]:
        picked = [(float(s), t.name) for s, t in zip(scores, tags) if t.category == category and s >= threshold]
        names = [tag_name(n, settings.replace_underscores) for _, n in sorted(picked, key=lambda p: (-p[0], p[1]))]
        return [n for n in names if normalize_tag(n) not in undesired]

    character, general = group(CHARACTER, settings.character_threshold), group(GENERAL, settings.general_threshold)
    ordered = character + general if settings.character_first else general + character
    ratings = [(float(s), t.name) for s, t in zip(scores, tags) if t.category == RATING]
    if settings.include_rating and ratings:
        rating = tag_name(max(ratings, key=lambda p: p[0])[1], settings.replace_underscores)
        ordered = ([rating] if normalize_tag(rating) not in undesired else []) + ordered
    return ", ".join(ordered)


class Wd14Tagger:
    """A WD14-style ONNX tagger run by onnxruntime, loaded on first use.

    Args:
        folder: a folder with `model.onnx` and `selected_tags.csv` (`locate_model`).
        settings: thresholds and formatting (used by `caption`, not by `run`).
        device: `auto` or `cuda` use onnxruntime's CUDA provider when it is installed; else CPU.
    """

    suffix = ".npy"

    def __init__(self, folder: Path, settings: Wd14Settings, device: str = "auto") -> None:
        self.folder, self.settings, self.device = Path(folder), settings, device
        self.tags = read_selected_tags(self.folder / "selected_tags.csv")
        self._session: Any = None

    def identity(self) -> dict[str, Any]:
        """What besides the model files changes the raw output: nothing (scores are settings-free)."""
        return {}

    def load(self) -> None:
        """Open the ONNX session and read the input side and batch limit from the model."""
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if self.device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self._session = ort.InferenceSession(str(self.folder / "model.onnx"), providers=providers)
        shape = self._session.get_inputs()[0].shape  # (batch, side, side, 3), NHWC
        if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]:
            raise ValueError(f"{self.folder / 'model.onnx'}: input shape {shape} is not (batch, side, side, 3)")
        self.size: int = shape[1]
        self.max_batch: int | None = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None

    def scores(self, images: list[Image.Image]) -> np.ndarray:
        """(B, n_tags) float32 sigmoid scores.

        Args:
            images: any PIL images.
        """
        if self._session is None:
            self.load()
        step = self.max_batch or len(images)
        inp, out = self._session.get_inputs()[0].name, self._session.get_outputs()[0].name
        parts = []
        for start in range(0, len(images), step):
            batch = np.stack([wd14_preprocess(im, self.size) for im in images[start : start + step]])  # (b, S, S, 3)
            parts.append(self._session.run([out], {inp: batch})[0].astype(np.float32))
        result = np.concatenate(parts)
        if result.shape[1] != len(self.tags):
            raise ValueError(
                f"{self.folder / 'model.onnx'} gives {result.shape[1]} scores "
                f"but selected_tags.csv lists {len(self.tags)} tags"
            )
        return result

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_session": None}  # a worker opens the ONNX session itself

    def run(self, images: list[Image.Image]) -> list[bytes]:
        """Each image's scores as .npy bytes (the raw output the stage caches)."""
        out = []
        for row in self.scores(images):
            buffer = io.BytesIO()
            np.save(buffer, row)
            out.append(buffer.getvalue())
        return out

    def caption(self, raw: bytes) -> str:
        """The tags for a raw output, selected with the current settings."""
        return select_tags(np.load(io.BytesIO(raw)), self.tags, self.settings)
