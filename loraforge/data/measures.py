"""Dataset craft: the pure measurements ingest uses to judge and shape a training set.

Guides: 000 = RFKTR's guide (Dataset Saturation Balance, the style "precision method"), 003 = the
LoRA guide (anti-AI-filter cleanup). Every function here is a short, pure numpy/PIL function:

- DSB (000): `dsb_white_share` per image, `dataset_dsb` for the set, `dsb_inside` for the
  60% ± 5% window, `fewest_removals` for the images to drop when it is outside.
- Precision tiling (000): `tile_boxes` cuts an image into rows × cols sectors; `laplacian_variance`
  (blur) and `clipped_share` (exposure) say which sectors hold little information.
- Quality gates: `dhash` + `hamming` for near-duplicates, `laplacian_variance` for blur,
- Anti-AI-filter cleanup (003): `clean_adversarial`, a light resample + median pass, and `psnr`
  to report how much it changed.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageFilter

POSTER_BITS = 2  # 2 bits = 4 tones: the 000 guide posterizes "to around 4 tones"
WHITE_FROM_TONE = 2  # tones 2 and 3 (of 0-3) are the two lighter ones: the guide's "right-hand side"
MAX_EXHAUSTIVE = 50_000  # subsets `fewest_removals` tries one by one before it only tries the ends
_EPS = 1e-9  # float slack: 0.3+0.4+0.55+0.15 must count as exactly 35%


# ---------------------------------------------------------------- DSB (000 guide)


def dsb_white_share(img: Image.Image) -> float:
    """White share of one image, the 000 guide's way: desaturate, posterize to 4 tones, count the
    pixels in the two lighter tones.

    Args:
        img: any PIL image (converted to 8-bit grayscale with ITU-R 601 luma, as "desaturate" in
            photo editors does).

    Returns:
        The share of pixels in the two lighter of the 4 tones, in [0, 1] (black share = 1 − it).
    """
    # Posterizing to 4 tones keeps a grey level's top 2 bits (tones 0, 64, 128, 192), so "one of
    # the two lighter tones" is grey >= 128: counted off the histogram, with no copy of the image.
    histogram = img.convert("L").histogram()  # 256 counts
    white_from = WHITE_FROM_TONE << (8 - POSTER_BITS)
    return sum(histogram[white_from:]) / sum(histogram)


@dataclass(frozen=True)
class DatasetBalance:
    """A dataset's DSB.

    Attributes:
        white: mean white share of the images, in [0, 1].
        black: mean black share (1 − white).
        dominant: the larger of the two: what the 000 guide's 60% ± 5% refers to.
        side: `black` or `white`, whichever dominates (`white` on a tie).
    """

    white: float
    black: float
    dominant: float
    side: str


def dataset_dsb(shares: Sequence[float]) -> DatasetBalance:
    """The dataset's DSB: mean white share | mean black share (000 guide: "(white) / amount of
    images | (black) / amount of images"; 30, 5, 40, 55, 15 %W give 29%W | 71%B).

    Args:
        shares: per-image white shares in [0, 1]; at least one.
    """
    if len(shares) == 0:
        raise ValueError("`shares` must hold at least one image's white share")
    white = float(np.mean(shares))
    black = 1.0 - white
    return DatasetBalance(white, black, max(white, black), "white" if white >= black else "black")


def dsb_inside(dominant: float, target: float, tolerance: float) -> bool:
    """Whether a DSB is inside the sweet spot: strictly within `target ± tolerance`.

    Strict, because the 000 guide's worked example drops two images, not one: dropping only the
    5%W image leaves 35%W | 65%B, on the edge of 60% ± 5%, which the guide does not accept.

    Args:
        dominant: the dominant side's share (`DatasetBalance.dominant`).
        target: `dataset.dsb_target` (the guide: 0.60).
        tolerance: `dataset.dsb_tolerance` (the guide: 0.05).
    """
    return abs(dominant - target) < tolerance - _EPS


def fewest_removals(shares: Sequence[float], target: float, tolerance: float) -> list[int] | None:
    """The fewest images whose removal brings the dataset's DSB inside `target ± tolerance`.

    Among the smallest sets that work, the one whose DSB lands closest to `target` wins (the 000
    guide's example: from 30, 5, 40, 55, 15 %W, dropping images 2 and 5 gives 41.7%W | 58.3%B;
    dropping 1 and 2 also works, at 36.7%W | 63.3%B, further from 60%). Every subset is tried while
    there are at most `MAX_EXHAUSTIVE` of a size; beyond that only sets taken from the two ends of
    the white-share order (the outliers, which move the mean most). Those sets step the mean by
    less than 1 / (images left), so for large sets they cannot jump over the window.

    Args:
        shares: per-image white shares in [0, 1].
        target: `dataset.dsb_target`.
        tolerance: `dataset.dsb_tolerance`.

    Returns:
        Indices into `shares` to remove (sorted; empty when already inside), or None when no
        removal that keeps at least one image gets inside.
    """
    if dsb_inside(dataset_dsb(shares).dominant, target, tolerance):
        return []
    values = np.asarray(shares, dtype=np.float64)
    for k in range(1, len(values)):
        best = _best_removal(values, k, target, tolerance)
        if best is not None:
            return sorted(best)
    return None


def _best_removal(values: np.ndarray, k: int, target: float, tolerance: float) -> tuple[int, ...] | None:
    # The k-subset to drop that lands inside and nearest the target (the first on a tie), or None.
    removed, pick = _candidates(values, k)  # (m,) removed white sum per candidate; pick(i) → its indices
    white = (values.sum() - removed) / (len(values) - k)  # (m,) mean white share left
    dominant = np.maximum(white, 1.0 - white)
    inside = np.abs(dominant - target) < tolerance - _EPS
    if not inside.any():
        return None
    return pick(int(np.argmin(np.where(inside, np.abs(dominant - target), np.inf))))


def _candidates(values: np.ndarray, k: int) -> tuple[np.ndarray, Callable[[int], tuple[int, ...]]]:
    # All k-subsets when few enough; else j from the dark end and k − j from the light end,
    # summed with prefix sums so a large dataset costs O(k) per size, not O(k²).
    n = len(values)
    if math.comb(n, k) <= MAX_EXHAUSTIVE:
        subsets = np.array(list(itertools.combinations(range(n), k)), dtype=np.int64)  # (m, k)
        return values[subsets].sum(axis=1), lambda i: tuple(int(x) for x in subsets[i])
    order = np.argsort(values, kind="stable")
    prefix = np.concatenate([[0.0], np.cumsum(values[order])])  # prefix[j] = sum of the j darkest
    j = np.arange(k + 1)
    removed = prefix[j] + (prefix[n] - prefix[n - (k - j)])
    return removed, lambda i: tuple(int(x) for x in np.concatenate([order[:i], order[n - (k - i) :]]))


# ---------------------------------------------------------------- precision tiling (000 guide)


def tile_boxes(width: int, height: int, rows: int, cols: int) -> list[tuple[int, int, int, int]]:
    """PIL crop boxes (left, top, right, bottom) of a rows × cols grid, row by row; the sectors
    cover the image exactly (edges spread the remainder, so no pixel is lost or shared).

    Args:
        width: image width in pixels.
        height: image height in pixels.
        rows: sectors down (the 000 guide's example: 4 × 4 = 16 sectors).
        cols: sectors across.
    """
    if rows < 1 or cols < 1:
        raise ValueError(f"`rows` and `cols` must be ≥ 1, got {rows} x {cols}")
    if rows > height or cols > width:
        raise ValueError(f"a {width} x {height} image cannot be cut into {rows} rows x {cols} cols")
    xs = [round(c * width / cols) for c in range(cols + 1)]
    ys = [round(r * height / rows) for r in range(rows + 1)]
    return [(xs[c], ys[r], xs[c + 1], ys[r + 1]) for r in range(rows) for c in range(cols)]


LAPLACIAN_ROWS = 256


def laplacian_variance(img: Image.Image) -> float:
    """Sharpness: variance of the 4-neighbour Laplacian of the 0-255 grayscale image (the usual
    blur measure; a blurred or flat sector scores low, in units of grey level²).

    Args:
        img: any PIL image of at least 3 x 3 pixels.
    """
    grey = np.asarray(img.convert("L"), dtype=np.uint8)  # (H, W)
    if grey.shape[0] < 3 or grey.shape[1] < 3:
        raise ValueError(f"`img` must be at least 3 x 3 pixels for a Laplacian, got {grey.shape[1]} x {grey.shape[0]}")
    # Two passes (mean, then squared deviations) over strips of rows: the float64 Laplacian of a
    # 64-megapixel photo would take ~3 GB at once; a strip of 256 rows takes a few MB.
    tops = range(0, grey.shape[0] - 2, LAPLACIAN_ROWS)
    count = (grey.shape[0] - 2) * (grey.shape[1] - 2)
    mean = sum(float(_laplacian(grey[t : t + LAPLACIAN_ROWS + 2]).sum()) for t in tops) / count
    return sum(float(np.square(_laplacian(grey[t : t + LAPLACIAN_ROWS + 2]) - mean).sum()) for t in tops) / count


def _laplacian(rows: np.ndarray) -> np.ndarray:
    """The 4-neighbour Laplacian of the valid interior of a block of grey rows, in float64."""
    g = rows.astype(np.float64)
    return g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4 * g[1:-1, 1:-1]


def clipped_share(img: Image.Image, low: int = 2, high: int = 253) -> float:
    """Exposure: the share of pixels whose grey level is clipped (≤ `low` or ≥ `high`).

    Args:
        img: any PIL image.
        low: grey levels at or below this count as crushed blacks.
        high: grey levels at or above this count as blown highlights.
    """
    histogram = img.convert("L").histogram()  # 256 counts: no per-pixel copy of a big image
    return (sum(histogram[: low + 1]) + sum(histogram[high:])) / sum(histogram)


def sector_drop_reason(sharpness: float, clipped: float, min_sharpness: float, max_clipped: float) -> str | None:
    """Why a sector holds too little information to keep (the 000 guide drops sectors "due to the
    strong blur and exposure"), or None to keep it.

    Args:
        sharpness: the sector's `laplacian_variance`.
        clipped: the sector's `clipped_share`.
        min_sharpness: `dataset.tile_min_sharpness`: a Laplacian variance below this is blur.
        max_clipped: `dataset.tile_max_clipped`: a clipped-pixel share above this is exposure.
    """
    if sharpness < min_sharpness:
        return f"blur: Laplacian variance {sharpness:.1f} < `dataset.tile_min_sharpness` {min_sharpness}"
    if clipped > max_clipped:
        return f"exposure: {clipped:.1%} clipped pixels > `dataset.tile_max_clipped` {max_clipped:.1%}"
    return None


# ---------------------------------------------------------------- quality gates


def dhash(img: Image.Image, size: int = 8) -> int:
    """Difference hash: a `size`² -bit perceptual hash (brighter-than-right-neighbour bits of a
    (size) × (size + 1) grayscale thumbnail). Resizes, re-encodes and small edits barely change it.

    Args:
        img: any PIL image.
        size: bits per side (8 gives the usual 64-bit hash).
    """
    thumb = np.asarray(img.convert("L").resize((size + 1, size), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (thumb[:, 1:] > thumb[:, :-1]).flatten()  # (size², )
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    """Bits that differ between two hashes.

    Args:
        a: one hash.
        b: the other.
    """
    return (a ^ b).bit_count()


def near_duplicates(hashes: Sequence[int], areas: Sequence[int], max_distance: int) -> dict[int, int]:
    """Near-duplicate pairs to drop: for each group of images within `max_distance` bits, every
    image but the largest (by pixel area; the earlier one on a tie) is dropped.

    Args:
        hashes: `dhash` per image, in manifest order.
        areas: width × height per image.
        max_distance: `dataset.near_duplicate_distance`; a negative value disables the check.

    Returns:
        {index dropped: index kept}.
    """
    if max_distance < 0:
        return {}
    order = sorted(range(len(hashes)), key=lambda i: (-areas[i], i))  # the largest is seen first
    kept: list[int] = []
    dropped: dict[int, int] = {}
    for i in order:
        match = next((k for k in kept if hamming(hashes[i], hashes[k]) <= max_distance), None)
        if match is None:
            kept.append(i)
        else:
            dropped[i] = match
    return dropped


# ---------------------------------------------------------------- anti-AI-filter cleanup (003 guide)


def clean_adversarial(img: Image.Image, scale: float = 0.5, median: int = 3) -> Image.Image:
    """Remove high-frequency adversarial patterns (the 003 guide's "anti-AI filters"): downsample
    by `scale` with a box filter (averaging away pixel-level perturbations), back up with Lanczos,
    then a small median filter (drops isolated spikes the resample spreads). Slightly softens
    real detail too; the 003 guide warns the cleanup "makes slight modifications".

    Args:
        img: an RGB image.
        scale: downsample factor in (0, 1].
        median: median filter size (odd, ≥ 1; 1 skips it).
    """
    if not 0 < scale <= 1:
        raise ValueError(f"`scale` must be in (0, 1], got {scale}")
    if median < 1 or median % 2 == 0:
        raise ValueError(f"`median` must be an odd size ≥ 1, got {median}")
    w, h = img.size
    small = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX)
    back = small.resize((w, h), Image.Resampling.LANCZOS)
    return back.filter(ImageFilter.MedianFilter(median)) if median > 1 else back


def psnr(a: Image.Image, b: Image.Image) -> float:
    """Peak signal-to-noise ratio of `b` against `a`, in dB over 8-bit RGB (inf when identical).

    Args:
        a: the reference image.
        b: an image of the same size.
    """
    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"images differ in size: {a.size} vs {b.size}")
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
