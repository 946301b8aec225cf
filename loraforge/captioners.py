"""Model captioners for the caption stage: BLIP (transformers) and WD14-style ONNX taggers.

Both load from a local folder or a Hugging Face id (downloaded once into the Hugging Face cache;
only a hub id ever downloads):

- `blip`: a folder written by `save_pretrained` (config.json, safetensors weights, processor and
  tokenizer files), e.g. `Salesforce/blip-image-captioning-large`. Beam search or nucleus
  sampling (seeded per image, so a caption never depends on its batch), lengths in new tokens,
  an optional text prompt that conditions the caption and is cut from it.
- `wd14`: a folder with `model.onnx` and `selected_tags.csv` (`tag_id,name,category,count`;
  category 9 rating, 0 general, 4 character), the layout of the SmilingWolf/wd-* repos, run by
  onnxruntime. Images are prepared as those taggers expect: composited and padded to a square
  on white, resized to the model's input side (read from the model), BGR, float32 in 0..255.

A captioner's `run(images)` returns one raw output per image as bytes (BLIP: the caption text,
WD14: the tag scores as .npy), which the stage caches in the item store; `caption(raw)` turns a
raw output into the caption with the current settings. WD14 scores therefore survive a change of
threshold: the tags are re-selected, the model does not run again. A cache key holds the hash of
the model's files (`files_hash`), never its name.

torch, transformers, onnxruntime and huggingface_hub are imported inside the functions that use them.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from loraforge.fingerprint import hash_json
from loraforge.models import HASH_CACHE, HUB_ID, HashCache

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

CaptionerKind = Literal["blip", "wd14"]
DEFAULT_MODELS: dict[str, str] = {  # what `caption.captioner_path: null` means (kohya's defaults)
    "blip": "Salesforce/blip-image-captioning-large",
    "wd14": "SmilingWolf/wd-v1-4-convnext-tagger-v2",
}
WD14_FILES = ("model.onnx", "selected_tags.csv")
BLIP_PATTERNS = ("*.json", "*.txt", "*.safetensors")  # configs, tokenizer vocab, weights; never pickles
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


# ---------------------------------------------------------------------------------------------
# Finding the model files


def locate_model(
    kind: CaptionerKind,
    value: str | None,
    root: Path,
    revision: str | None = None,
    param: str = "caption.captioner_path",
) -> Path:
    """The local folder holding the captioner's files: `value` as a folder, else a hub download.

    Args:
        kind: `blip` or `wd14` (decides which files a hub download fetches).
        value: a folder (absolute or relative to `root`), a Hugging Face id, or None for
            `DEFAULT_MODELS[kind]`.
        root: the project root, which relative folders are taken from.
        revision: hub branch, tag or commit; None for the default branch.
        param: the params key named in errors.
    """
    value = value or DEFAULT_MODELS[kind]
    local = Path(value).expanduser()
    local = local if local.is_absolute() else Path(root) / local
    if local.exists():
        if not local.is_dir():
            raise ValueError(f"`{param}` = {value!r}: {local} is a file; give the folder that holds the {kind} model")
        return local
    if value.startswith((".", "/", "~")) or "\\" in value or not HUB_ID.match(value):
        raise FileNotFoundError(
            f"`{param}` = {value!r}: no such folder {local} (and not a Hugging Face id like `owner/name`)"
        )
    try:
        return download_model(kind, value, revision)
    except Exception as e:  # offline, no such repo, no such file: one message naming the param
        raise FileNotFoundError(
            f"`{param}` = {value!r}: no folder {local}, and the Hugging Face hub could not provide it: {e}"
        ) from e


def download_model(kind: CaptionerKind, repo_id: str, revision: str | None) -> Path:
    """Fetch (or find in the Hugging Face cache) a captioner's files; returns the snapshot folder.

    Args:
        kind: `wd14` fetches `model.onnx` and `selected_tags.csv`; `blip` configs, vocab and safetensors.
        repo_id: `owner/name` on the hub.
        revision: branch, tag or commit; None for the default branch.
    """
    from huggingface_hub import hf_hub_download, snapshot_download

    if kind == "wd14":
        paths = [Path(hf_hub_download(repo_id, name, revision=revision)) for name in WD14_FILES]
        return paths[0].parent
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(BLIP_PATTERNS)))


def model_files(kind: CaptionerKind, folder: Path, param: str = "caption.captioner_path") -> list[Path]:
    """The files a captioner loads (what its identity hash covers); raises naming a missing one.

    Args:
        kind: `blip` or `wd14`.
        folder: the resolved model folder.
        param: the params key named in errors.
    """
    if kind == "wd14":
        for name in WD14_FILES:
            if not (folder / name).is_file():
                raise FileNotFoundError(
                    f"`{param}`: no {name} at {folder / name} (a WD14 tagger folder holds {' and '.join(WD14_FILES)})"
                )
        return [folder / name for name in WD14_FILES]
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"`{param}`: no config.json at {folder / 'config.json'} (a BLIP folder as written by save_pretrained)"
        )
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"`{param}`: no .safetensors weights in {folder} (pickle weights are not loaded)")
    return sorted({p for pattern in BLIP_PATTERNS for p in folder.glob(pattern) if p.is_file()})


def files_hash(files: list[Path], folder: Path, state_dir: Path) -> str:
    """xxh3-128 over the files' names (relative to `folder`) and contents; each file's hash is
    remembered in `state_dir/hashcache.json` by (path, size, mtime), so big weights are read once.

    Args:
        files: the model's files (`model_files`).
        folder: the model folder.
        state_dir: loraforge's private folder.
    """
    cache = HashCache(Path(state_dir) / HASH_CACHE)
    digests = {p.relative_to(folder).as_posix(): cache.hash(p) for p in files}
    cache.save()
    return hash_json(digests)


# ---------------------------------------------------------------------------------------------
# BLIP


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

        from loraforge.models import quiet_hf_loading, resolve_device

        quiet_hf_loading()
        self._processor = BlipProcessor.from_pretrained(self.folder, local_files_only=True)
        model = BlipForConditionalGeneration.from_pretrained(self.folder, local_files_only=True, use_safetensors=True)
        self._model = model.to(resolve_device(self.device)).eval()

    def generate_ids(self, images: list[Image.Image]) -> list[list[int]]:
        """New token ids per image: prompt cut, stopped before the end token (and the padding after it).

        Beam search runs the batch at once; nucleus sampling runs image by image, each from
        `settings.seed`, so a sampled caption does not depend on the images beside it.

        Args:
            images: RGB images.
        """
        import torch

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
        import torch

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


# ---------------------------------------------------------------------------------------------
# WD14


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
    import numpy as np
    from PIL import Image as PILImage

    rgba = image.convert("RGBA")
    canvas = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
    canvas.alpha_composite(rgba)
    rgb = canvas.convert("RGB")
    side = max(rgb.size)
    square = PILImage.new("RGB", (side, side), (255, 255, 255))
    square.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
    if side != size:
        square = square.resize((size, size), PILImage.Resampling.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1].copy()  # RGB -> BGR


def normalize_tag(tag: str) -> str:
    """A tag as compared: lower case, `_` as space, single spaces (`Long_Hair ` → `long hair`).

    Args:
        tag: one comma-separated tag.
    """
    return " ".join(tag.replace("_", " ").split()).lower()


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
        import numpy as np

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
                f"{self.folder / 'model.onnx'} gives {result.shape[1]} scores but selected_tags.csv lists {len(self.tags)} tags"
            )
        return result

    def run(self, images: list[Image.Image]) -> list[bytes]:
        """Each image's scores as .npy bytes (the raw output the stage caches)."""
        import numpy as np

        out = []
        for row in self.scores(images):
            buffer = io.BytesIO()
            np.save(buffer, row)
            out.append(buffer.getvalue())
        return out

    def caption(self, raw: bytes) -> str:
        """The tags for a raw output, selected with the current settings."""
        import numpy as np

        return select_tags(np.load(io.BytesIO(raw)), self.tags, self.settings)
