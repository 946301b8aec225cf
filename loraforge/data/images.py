"""Image helpers shared by the image stages: decode and normalise, hash, save, resize, JSONL.

Pure functions over PIL images and paths; no torch. Every image that enters the pipeline goes
through `decode_image` (or `decode_with_alpha`, which also returns its transparency as a mask),
which either returns an 8-bit RGB image or raises `ImageRejected` with a reason a user can act on
("empty file", "truncated: ..."), so a bad file is never silently skipped.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import xxhash
from PIL import Image, ImageCms, ImageOps

from loraforge.errors import InputError

log = logging.getLogger(__name__)

# Formats a training set realistically holds. Limiting `Image.open` to these keeps Pillow's
# permissive sniffers (TGA, MPEG, XPM...) from "recognising" a stray text or binary file.
TRAINING_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "AVIF", "BMP", "GIF", "TIFF", "JPEG2000", "QOI")
_COLOR = re.compile(r"^#([0-9a-fA-F]{6})$")
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}
_WITH_ALPHA = {"RGBA", "LA", "PA", "RGBa", "La"}
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
HASH_STRIP_BYTES = 1 << 24  # pixel_hash reads big images 16 MiB of rows at a time


class ImageRejected(InputError):
    """A file that cannot enter the dataset; `reason` says why in a few words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_color(value: str) -> tuple[int, int, int]:
    """`#rrggbb` to an (r, g, b) tuple of 0-255 ints.

    Args:
        value: the colour, e.g. `#ffffff` (case-insensitive).
    """
    m = _COLOR.match(value)
    if not m:
        raise InputError(f"colour must be `#rrggbb` (six hex digits), got {value!r}")
    hexa = m.group(1)
    return int(hexa[0:2], 16), int(hexa[2:4], 16), int(hexa[4:6], 16)


def _allowed_formats() -> list[str]:
    # Image.open raises KeyError for a format whose plugin this Pillow build lacks (AVIF...).
    Image.init()
    return [f for f in TRAINING_FORMATS if f in Image.OPEN]


def decode_image(path: Path, background: tuple[int, int, int], max_pixels: int | None = None) -> Image.Image:
    """Fully decode `path` into an upright, 8-bit RGB image.

    EXIF orientation is applied, an embedded ICC profile is converted to sRGB, 16-bit data is
    scaled (not clipped) to 8 bits, CMYK and grayscale become RGB, and transparency is flattened
    onto `background`.

    Args:
        path: the file to read.
        background: (r, g, b) colour that transparent pixels are composited onto.
        max_pixels: refuse images with more pixels (`ingest.max_pixels`), read from the header
            before any pixel is decoded; None = no limit of ours.

    Raises:
        ImageRejected: the file is empty, not an image, too large, truncated or corrupt, or of an
            unsupported pixel format; the reason names the problem.
    """
    return to_rgb(open_upright(path, max_pixels), background)


def decode_with_alpha(
    path: Path, background: tuple[int, int, int], max_pixels: int | None = None
) -> tuple[Image.Image, Image.Image | None]:
    """`decode_image`'s RGB image and its alpha channel as an "L" mask (None when the image has
    no transparency, or every pixel is opaque): the masked loss's mask (kohya's `alpha_mask`).

    Args:
        path: the file to read.
        background: (r, g, b) colour that transparent pixels are composited onto.
        max_pixels: see `decode_image`.

    Raises:
        ImageRejected: see `decode_image`.
    """
    upright = open_upright(path, max_pixels)
    return to_rgb(upright, background), alpha_mask(upright)


def alpha_mask(img: Image.Image) -> Image.Image | None:
    """The alpha channel of a decoded image as an "L" image; None without transparency.

    Args:
        img: a loaded PIL image, before `to_rgb`.
    """
    if img.mode not in _WITH_ALPHA and not (img.mode == "P" and "transparency" in img.info):
        return None
    alpha = img.convert("RGBA").getchannel("A")
    return None if alpha.getextrema() == (255, 255) else alpha


def may_have_alpha(path: Path) -> bool:
    """Whether a file's header says it has transparency (True when it cannot be read: ask the decoder).

    Args:
        path: the image file.
    """
    try:
        with Image.open(path, formats=_allowed_formats()) as img:  # the header only: no pixel decoded
            return img.mode in _WITH_ALPHA or "transparency" in img.info
    except Exception:  # noqa: BLE001 - anything unreadable goes to the full decode, which explains it
        return True


def open_upright(path: Path, max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode `path` (any training format), EXIF orientation applied; no mode change.

    Args:
        path: the file to read.
        max_pixels: see `decode_image`.

    Raises:
        ImageRejected: see `decode_image`.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise ImageRejected("empty file")
    try:
        with Image.open(path, formats=_allowed_formats()) as opened:
            w, h = opened.size
            if max_pixels is not None and w * h > max_pixels:
                raise ImageRejected(
                    f"{w}x{h} is {w * h / 1e6:.2f} MP, over `ingest.max_pixels` ({max_pixels / 1e6:g} MP)"
                )
            opened.load()  # lazy by default: force the full decode so truncation shows up here
            return ImageOps.exif_transpose(opened, in_place=True) or opened  # no copy when upright
    except ImageRejected:
        raise
    except Image.UnidentifiedImageError:
        raise ImageRejected(f"not an image (or not one of {', '.join(_allowed_formats())})") from None
    except Image.DecompressionBombError as e:
        raise ImageRejected(f"too large: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        # Pillow reports broken data with any of these, depending on the codec.
        raise ImageRejected(f"cannot decode ({type(e).__name__}): {e}") from None


def decode_mask(path: Path, size: tuple[int, int], max_pixels: int | None = None) -> Image.Image:
    """A mask file (`<stem>-mask.png`) as an upright "L" image (255 = train on this pixel, 0 = not).

    Args:
        path: the mask file.
        size: (width, height) of its image, which the mask must match.
        max_pixels: see `decode_image`.

    Raises:
        ImageRejected: the mask does not decode, or its size differs from the image's.
    """
    try:
        upright = open_upright(path, max_pixels)
    except ImageRejected as e:
        raise ImageRejected(f"mask {Path(path).name}: {e.reason}") from None
    if upright.mode in _SIXTEEN_BIT or upright.mode == "I":
        upright = _sixteen_to_eight(upright)
    mask = upright.convert("L")
    if mask.size != tuple(size):
        raise ImageRejected(f"mask {Path(path).name} is {mask.width}x{mask.height}, its image is {size[0]}x{size[1]}")
    return mask


def to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Normalise a decoded image of any common mode to 8-bit sRGB without alpha.

    Args:
        img: a loaded PIL image (any mode Pillow decodes: 1, L, P, I;16, I, RGB, RGBA, CMYK...).
        background: (r, g, b) colour that transparent pixels are composited onto.

    Raises:
        ImageRejected: a pixel mode with no meaningful 8-bit rendering (e.g. 32-bit float).
    """
    icc = img.info.get("icc_profile")
    if img.mode in _SIXTEEN_BIT or img.mode == "I":
        img = _sixteen_to_eight(img)
    elif img.mode == "P":
        # A palette may carry transparency (tRNS / GIF); RGBA keeps it for the flatten below.
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in _WITH_ALPHA:
        img = img.convert("RGBA")
    elif img.mode == "F":
        raise ImageRejected("unsupported pixel mode F (32-bit float)")
    elif img.mode not in ("RGB", "CMYK"):
        try:
            img = img.convert("RGB")
        except ValueError:
            raise ImageRejected(f"unsupported pixel mode {img.mode}") from None
    if icc and img.mode in ("RGB", "RGBA", "CMYK"):
        img = _icc_to_srgb(img, icc)
    if img.mode == "RGBA":
        flat = Image.new("RGB", img.size, background)
        flat.paste(img, mask=img.getchannel("A"))
        return flat
    return img.convert("RGB") if img.mode != "RGB" else img


def _sixteen_to_eight(img: Image.Image) -> Image.Image:
    # Pillow opens 16-bit grayscale as I;16 (or I, 32-bit int): the full range is 0-65535, so
    # scale by 255/65535 (= 1/257) rather than Pillow's convert("L"), which clips at 255.
    values = np.asarray(img, dtype=np.float64)
    eight = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(eight).convert("RGB")


def _icc_to_srgb(img: Image.Image, icc: bytes) -> Image.Image:
    # Phone photos (Display P3) and print CMYK files carry a profile; without converting, their
    # colours shift. A broken or mismatched profile is not worth rejecting the image: keep the
    # raw values and say so in the log.
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = src.profile.xcolor_space.strip()  # "RGB", "CMYK", "GRAY"...
        if space != ("CMYK" if img.mode == "CMYK" else "RGB"):
            return img  # e.g. a gray profile on an image already expanded to RGB
        if "srgb" in ImageCms.getProfileDescription(src).lower():
            return img  # already sRGB (most camera JPEGs): a transform would only add rounding
        out_mode = "RGBA" if img.mode == "RGBA" else "RGB"
        converted = ImageCms.profileToProfile(img, src, _SRGB, outputMode=out_mode)
    except (ImageCms.PyCMSError, OSError, ValueError, AttributeError) as e:
        log.warning("ignoring unusable ICC profile (%s); colours taken as sRGB", e)
        return img
    return converted if converted is not None else img


def pixel_hash(img: Image.Image) -> str:
    """xxh3-128 hex digest of an image's size, mode and raw pixels (identical pictures, whatever
    their file format or metadata, hash the same).

    Args:
        img: a PIL image, normally the RGB output of `decode_image`.
    """
    w, h = img.size
    digest = xxhash.xxh3_128(f"{img.mode}:{w}x{h}:".encode())
    rows = max(1, HASH_STRIP_BYTES // max(1, w * len(img.getbands())))
    for top in range(0, h, rows):  # strip by strip: a 64-megapixel image never needs a second copy
        digest.update(img.crop((0, top, w, min(h, top + rows))).tobytes())
    return digest.hexdigest()


def save_png(img: Image.Image, path: Path) -> None:
    """Write `img` as a PNG with no metadata, so the bytes depend on the pixels only.

    Args:
        img: the image to write.
        path: destination file (its folder must exist); the format is PNG whatever the suffix.
    """
    # compress_level 1: entries are written once and read by every later stage; the fast
    # level is several times quicker on photos for ~10% more disk.
    img.save(path, format="PNG", compress_level=1)


def lanczos_upscale(img: Image.Image, min_side: int) -> Image.Image:
    """Upscale with Lanczos so the short side is at least `min_side`; never downscales.

    Args:
        img: the image to enlarge.
        min_side: target short side in pixels (≥ 1). An image already that large is returned
            unchanged (the same object).
    """
    if min_side < 1:
        raise ValueError(f"`min_side` must be ≥ 1, got {min_side}")
    w, h = img.size
    short = min(w, h)
    if short >= min_side:
        return img
    scale = min_side / short
    # The short side lands exactly on min_side; the long side keeps the aspect ratio.
    size = (min_side, max(min_side, round(h * scale))) if w <= h else (max(min_side, round(w * scale)), min_side)
    return img.resize(size, Image.Resampling.LANCZOS)


def resize_cover_crop(
    img: Image.Image, width: int, height: int, resample: Image.Resampling = Image.Resampling.LANCZOS
) -> tuple[Image.Image, tuple[int, int], tuple[int, int]]:
    """Resize so the image covers `width` x `height` (Lanczos), then centre-crop to it.

    Args:
        img: the source image.
        width: target width in pixels (≥ 1).
        height: target height in pixels (≥ 1).
        resample: the filter (a mask takes the same geometry with BOX: no ringing past its edges).

    Returns:
        (cropped image of exactly `width` x `height`, crop top-left as (top, left) in resized
        pixels, original size as (height, width)), the last two as SDXL's micro-conditioning
        expects them.
    """
    if width < 1 or height < 1:
        raise ValueError(f"target size must be ≥ 1 x 1, got {width} x {height}")
    w, h = img.size
    original = (h, w)
    scale = max(width / w, height / h)
    # ceil, not round: the covering side must never come out one pixel short of the target.
    rw = max(width, math.ceil(w * scale - 1e-9))
    rh = max(height, math.ceil(h * scale - 1e-9))
    resized = img if (rw, rh) == (w, h) else img.resize((rw, rh), resample)
    top, left = (rh - height) // 2, (rw - width) // 2
    return resized.crop((left, top, left + width, top + height)), (top, left), original


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file (blank lines skipped).

    Args:
        path: the file to read.

    Raises:
        ValueError: a line is not a JSON object; the message names the file and line.
    """
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write one JSON object per line (UTF-8, keys in insertion order).

    Args:
        path: the file to write (its folder is created if needed).
        rows: the objects to write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
