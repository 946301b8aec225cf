"""Measured signs of under- and overtraining, and the rule that picks the epoch to ship.

Pure functions on numpy arrays and plain rows, so tests feed them synthetic images and series:

- overfit as the LoRA weight rises (003 guide: "saturated, full of artefacts" at weight > 1.2):
  `colourfulness`, `clipped_share`, `high_frequency_share`, compared with the weight-0 image;
- memorisation (001 guide: prompt training captions 1:1; near-copies mean overtraining):
  `nearest_distance` of a generated image's embedding to the training images' embeddings;
- likeness: `centroid_similarity` of trigger-prompt images to the training set (the DreamBooth
  paper's subject fidelity, CLIP-I, with CLIP): the recommendation's main signal;
- the loss curve's `local_minima` (003 guide), and the validation loss when finetune measured it;
- `recommend`: the documented rule over per-epoch rows.

Embeddings are CLIP image embeddings when `evaluate.clip_model` names a local CLIP model, else
the fallback `pixel_embedding` (a 16×16 RGB thumbnail, mean-centred, unit length: cosine
similarity of two of them is the Pearson correlation of their thumbnails).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

CLIPPED_LOW, CLIPPED_HIGH = 2, 253  # a pixel is clipped when any channel is at or beyond these (0-255)
THUMB = 16  # side of the fallback embedding's thumbnail


def as_array(img: "Image.Image") -> np.ndarray:
    """An RGB image as float32 (H, W, 3) in [0, 255].

    Args:
        img: a PIL image (converted to RGB).
    """
    return np.asarray(img.convert("RGB"), dtype=np.float32)


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler & Süsstrunk (2003) colourfulness of an (H, W, 3) array in [0, 255], divided by 255.

    0 for a grey image; oversaturated images score high (natural photos ≈ 0.1-0.4).

    Args:
        rgb: float array (H, W, 3), values 0-255.
    """
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg, yb = r - g, 0.5 * (r + g) - b
    spread = math.hypot(float(rg.std()), float(yb.std()))
    mean = math.hypot(float(rg.mean()), float(yb.mean()))
    return (spread + 0.3 * mean) / 255.0


def clipped_share(rgb: np.ndarray) -> float:
    """Share of pixels with a channel at ≤ 2 or ≥ 253: blown highlights and crushed colours.

    Args:
        rgb: float array (H, W, 3), values 0-255.
    """
    clipped = (rgb <= CLIPPED_LOW) | (rgb >= CLIPPED_HIGH)
    return float(clipped.any(axis=-1).mean())


def box_blur(gray: np.ndarray) -> np.ndarray:
    """3×3 mean filter with edge padding, same shape as `gray` (H, W).

    Args:
        gray: float array (H, W).
    """
    padded = np.pad(gray, 1, mode="edge")
    h, w = gray.shape
    return sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) / 9.0


def high_frequency_share(rgb: np.ndarray) -> float:
    """Share of the luminance variance above a 3×3 blur: noise, speckle and ringing artefacts.

    In [0, 1]: ~0 for smooth images, rising towards 1 for per-pixel noise.

    Args:
        rgb: float array (H, W, 3), values 0-255.
    """
    gray = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    variance = float(((gray - gray.mean()) ** 2).mean())
    if variance < 1e-6:
        return 0.0
    return float(((gray - box_blur(gray)) ** 2).mean()) / variance


def image_signs(rgb: np.ndarray) -> dict[str, float]:
    """The three overfit signs of one image: colourfulness, clipped share, high-frequency share.

    Args:
        rgb: float array (H, W, 3), values 0-255.
    """
    return {"colourfulness": colourfulness(rgb), "clipped": clipped_share(rgb), "high_freq": high_frequency_share(rgb)}


def mean_signs(signs: Sequence[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean of several images' signs.

    Args:
        signs: one `image_signs` result per image (non-empty).
    """
    if not signs:
        raise ValueError("`signs` must hold at least one image's signs")
    return {k: float(np.mean([s[k] for s in signs])) for k in signs[0]}


def rises(
    at_weight: dict[str, float], at_zero: dict[str, float], training: dict[str, float] | None = None
) -> dict[str, float]:
    """How the signs rose from weight 0 to a weight: relative for colourfulness and high
    frequency (0.25 = 25 % more), absolute for the clipped share (0.05 = 5 points more).

    With the training images' signs, each rise is measured from the higher of the base model's
    and the training set's level: a LoRA that learned a vivid, saturated style (pure magenta is
    clipped by definition) reproduces its training images, it is not burnt; only going beyond
    them is an overfit sign.

    Args:
        at_weight: mean signs of the images at the weight in question.
        at_zero: mean signs of the same prompts and seeds at weight 0 (the base model).
        training: mean signs of the training images at the render size, or None.
    """
    floor = {k: max(v, training[k]) for k, v in at_zero.items()} if training else at_zero

    def relative(key: str) -> float:
        return at_weight[key] / max(floor[key], 1e-6) - 1.0

    return {
        "saturation_rise": relative("colourfulness"),
        "high_freq_rise": relative("high_freq"),
        "clipped_rise": at_weight["clipped"] - floor["clipped"],
    }


def mean_abs_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean |a − b| over pixels and channels, in [0, 1]: how much the LoRA changed the image.

    Args:
        a: float array (H, W, 3), values 0-255.
        b: same shape as `a`.
    """
    return float(np.abs(a - b).mean() / 255.0)


# ---------------------------------------------------------------- embeddings and similarity


def unit(v: np.ndarray) -> np.ndarray:
    """`v` scaled to unit length along its last axis (zero vectors stay zero).

    Args:
        v: array (..., D).
    """
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(norm, 1e-12)


def pixel_embedding(img: "Image.Image") -> np.ndarray:
    """The fallback embedding (no CLIP model): a 16×16 RGB thumbnail, mean-centred, unit length.

    Args:
        img: a PIL image.
    """
    from PIL import Image as PILImage

    thumb = np.asarray(img.convert("RGB").resize((THUMB, THUMB), PILImage.Resampling.BOX), dtype=np.float32)
    flat = thumb.reshape(-1)
    return unit(flat - flat.mean())


def nearest_distance(query: np.ndarray, references: np.ndarray) -> float:
    """Cosine distance (1 − cos) from one embedding to its nearest reference: 0 = same image.

    Args:
        query: unit embedding (D,).
        references: unit embeddings (N, D), N ≥ 1.
    """
    if references.ndim != 2 or len(references) == 0:
        raise ValueError("`references` must be a non-empty (N, D) array of training-image embeddings")
    return float(1.0 - (references @ query).max())


def centroid_similarity(queries: np.ndarray, references: np.ndarray) -> float:
    """Mean cosine similarity of queries (M, D) to the training set's mean embedding: likeness.

    Args:
        queries: unit embeddings of trigger-prompt images (M, D).
        references: unit embeddings of the training images (N, D).
    """
    centroid = unit(references.mean(axis=0))
    return float((queries @ centroid).mean())


# ---------------------------------------------------------------- loss


def local_minima(losses: dict[int, float]) -> list[int]:
    """Epochs whose loss is lower than the previous epoch's and not higher than the next one's:
    "a low before increasing again" (003 guide). The last epoch has no next and never counts.

    Args:
        losses: loss per epoch number.
    """
    epochs = sorted(losses)
    return [
        e
        for prev, e, nxt in zip(epochs, epochs[1:], epochs[2:])
        if losses[e] < losses[prev] and losses[e] <= losses[nxt]
    ]


# ---------------------------------------------------------------- the recommendation rule


@dataclass(frozen=True)
class Limits:
    """Thresholds of the recommendation rule (the `evaluate` params of the same names).

    Attributes:
        check_weight: LoRA weight at which overfit signs are judged (003 guide: > 1.2 shows them).
        saturation_rise: largest allowed relative rise in colourfulness vs weight 0.
        high_freq_rise: largest allowed relative rise in high-frequency share vs weight 0.
        clipped_rise: largest allowed rise in clipped-pixel share vs weight 0 (absolute).
        memorisation_ratio: an epoch memorises when its caption images' distance to the nearest
            training image falls below this fraction of the base model's distance.
        validation_tolerance: with validation losses, only epochs at most this share above the
            lowest one compete on likeness (0.1 = 10 %).
    """

    check_weight: float = 1.2
    saturation_rise: float = 0.25
    high_freq_rise: float = 0.25
    clipped_rise: float = 0.05
    memorisation_ratio: float = 0.5
    validation_tolerance: float = 0.1


@dataclass
class Verdict:
    """What the rule found for one epoch.

    Attributes:
        epoch: epoch number.
        memorises: whether caption images are near-copies of training images.
        overfit: the overfit signs over their limits at `Limits.check_weight`, e.g. ["saturation_rise 0.41 > 0.25"].
        loss_minimum: whether the epoch is a local minimum of the train loss.
        validation_loss: its validation loss (finetune's `validation.tsv`), or None.
        likeness_gain: how much closer to the training images its renders are than the base
            model's (`likeness − likeness_base`), or None when not measured.
    """

    epoch: int
    memorises: bool
    overfit: list[str] = field(default_factory=list)
    loss_minimum: bool = False
    validation_loss: float | None = None
    likeness_gain: float | None = None


def judge(row: dict[str, Any], limits: Limits, minima: list[int]) -> Verdict:
    """Apply the limits to one epoch's row (missing measurements never count against it).

    Args:
        row: per-epoch metrics: `epoch`, and optionally `memorisation`, `memorisation_base` and
            the rises at the check weight (`saturation_rise`, `high_freq_rise`, `clipped_rise`).
        limits: the thresholds.
        minima: epochs that are local minima of the loss.
    """
    mem, base = row.get("memorisation"), row.get("memorisation_base")
    memorises = mem is not None and base is not None and mem < limits.memorisation_ratio * base
    overfit = [
        f"{k} {row[k]:.3g} > {getattr(limits, k):g}"
        for k in ("saturation_rise", "high_freq_rise", "clipped_rise")
        if row.get(k) is not None and row[k] > getattr(limits, k)
    ]
    epoch = int(row["epoch"])
    like, like_base = row.get("likeness"), row.get("likeness_base")
    gain = like - like_base if like is not None and like_base is not None else None
    return Verdict(
        epoch,
        memorises,
        overfit,
        loss_minimum=epoch in minima,
        validation_loss=row.get("validation_loss"),
        likeness_gain=gain,
    )


def recommend(rows: list[dict[str, Any]], limits: Limits) -> dict[str, Any]:
    """The epoch to ship, with the reasons.

    The rule: drop every epoch from the first memorising one on (001 guide); drop epochs with
    overfit signs at the check weight (003 guide); of the rest, take the one whose renders came
    closest to the training images (the highest likeness gain over the base model: the concept
    learned best) among those whose validation loss, when measured, is within
    `validation_tolerance` of the lowest; else, when none gained likeness or it was not measured,
    the one with the lowest validation loss (ties: the earliest), else the latest local minimum
    of the train loss (003 guide), else the latest. If nothing is left, ship the earliest epoch
    and say that every epoch shows overtraining. Why: docs/choosing-the-epoch.md.

    Args:
        rows: one row per epoch (see `judge`), with `epoch` and optionally `loss`, `validation_loss`.
        limits: the thresholds.
    """
    if not rows:
        raise ValueError("`rows` must hold at least one epoch")
    rows = sorted(rows, key=lambda r: r["epoch"])
    losses = {int(r["epoch"]): r["loss"] for r in rows if r.get("loss") is not None}
    verdicts = [judge(r, limits, local_minima(losses)) for r in rows]
    first_memorising = next((v.epoch for v in verdicts if v.memorises), None)
    candidates = [v for v in verdicts if (first_memorising is None or v.epoch < first_memorising) and not v.overfit]
    contenders = within_validation(candidates, limits.validation_tolerance)
    chosen = choose(candidates, contenders)
    fallback = chosen is None
    if fallback:
        chosen = verdicts[0]
    reasons = explain(chosen, verdicts, first_memorising, limits, rows, fallback)
    above = [v.epoch for v in candidates if v not in contenders]
    if above and not fallback and chosen.likeness_gain is not None and chosen.likeness_gain > 0:
        ceiling = f"{1 + limits.validation_tolerance:g} × the lowest"
        reasons.insert(-1, f"not compared on likeness (validation loss over {ceiling}): epochs {join(above)}")
    return {
        "epoch": chosen.epoch,
        "reasons": reasons,
        "fallback": fallback,
        "memorising_from": first_memorising,
        "overfit": {v.epoch: v.overfit for v in verdicts if v.overfit},
        "loss_minima": [v.epoch for v in verdicts if v.loss_minimum],
    }


def join(epochs: list[int]) -> str:
    """Epoch numbers as `10, 20, 30`."""
    return ", ".join(map(str, epochs))


def within_validation(candidates: list[Verdict], tolerance: float) -> list[Verdict]:
    """The candidates whose validation loss is at most `tolerance` above the lowest of them
    (all of them when none was measured; an epoch without one is kept).

    Args:
        candidates: verdicts of the epochs that passed the memorisation and overfit checks.
        tolerance: the share above the lowest validation loss allowed (0.1 = 10 %).
    """
    measured = [v.validation_loss for v in candidates if v.validation_loss is not None]
    if not measured:
        return candidates
    ceiling = min(measured) * (1 + tolerance)
    return [v for v in candidates if v.validation_loss is None or v.validation_loss <= ceiling]


def choose(candidates: list[Verdict], contenders: list[Verdict]) -> Verdict | None:
    """The contender with the highest positive likeness gain (the earliest of equals), else the
    candidate with the lowest validation loss (the earliest of equals), else the latest
    train-loss minimum among the candidates, else the latest candidate, else None.

    Args:
        candidates: verdicts of the epochs that passed the memorisation and overfit checks.
        contenders: the candidates within the validation-loss tolerance (`within_validation`).
    """
    liked = [v for v in contenders if v.likeness_gain is not None and v.likeness_gain > 0]
    if liked:
        return max(liked, key=lambda v: (v.likeness_gain, -v.epoch))
    validated = [v for v in candidates if v.validation_loss is not None]
    if validated:
        return min(validated, key=lambda v: (v.validation_loss, v.epoch))
    minima = [v for v in candidates if v.loss_minimum]
    pool = minima or candidates
    return pool[-1] if pool else None


def explain(
    chosen: Verdict,
    verdicts: list[Verdict],
    first_memorising: int | None,
    limits: Limits,
    rows: list[dict[str, Any]],
    fallback: bool,
) -> list[str]:
    """Human-readable reasons for the choice (they go into best.json and the report).

    Args:
        chosen: the recommended epoch's verdict.
        verdicts: every epoch's verdict, in epoch order.
        first_memorising: the first epoch whose caption images are near-copies, or None.
        limits: the thresholds.
        rows: the per-epoch rows (for the measured values).
        fallback: True when no epoch passed and the earliest is shipped anyway.
    """
    row = next(r for r in rows if int(r["epoch"]) == chosen.epoch)
    if fallback:
        return [
            f"every epoch shows overtraining signs; shipping the earliest, epoch {chosen.epoch}: "
            "train fewer epochs or with a lower finetune.lr"
        ]
    reasons = []
    if first_memorising is not None:
        reasons.append(
            f"epoch {chosen.epoch}: before epoch {first_memorising}, where the caption images' distance to the "
            f"nearest training image drops below {limits.memorisation_ratio:g} × the base model's"
        )
    elif row.get("memorisation") is not None:
        reasons.append(
            f"epoch {chosen.epoch}: no epoch memorises (caption images stay ≥ {limits.memorisation_ratio:g} × "
            "the base model's distance from the nearest training image)"
        )
    else:
        reasons.append(f"epoch {chosen.epoch}: memorisation not measured (no training images declared)")
    measured = [k for k in ("saturation_rise", "high_freq_rise", "clipped_rise") if row.get(k) is not None]
    if measured:
        values = ", ".join(f"{k} {row[k]:.3g} ≤ {getattr(limits, k):g}" for k in measured)
        reasons.append(f"no saturation or artefacts at weight {limits.check_weight:g} ({values})")
    else:
        reasons.append(f"overfit signs not measured (weight {limits.check_weight:g} or 0 not in evaluate.weights)")
    skipped = [v.epoch for v in verdicts if v.overfit and (first_memorising is None or v.epoch < first_memorising)]
    if skipped:
        reasons.append(f"skipped for overfit signs: epochs {', '.join(map(str, skipped))}")
    return reasons + choice_reasons(chosen, row)


def choice_reasons(chosen: Verdict, row: dict[str, Any]) -> list[str]:
    """Why `choose` took this one of the passing epochs.

    Args:
        chosen: the recommended epoch's verdict.
        row: its per-epoch row (for the train loss).
    """
    if chosen.likeness_gain is not None and chosen.likeness_gain > 0:
        return [
            f"the highest likeness gain of the epochs that passed (+{chosen.likeness_gain:.3g} over the base "
            "model): its renders are the closest to the training images"
        ]
    reasons = []
    if chosen.likeness_gain is not None:
        reasons.append("no passing epoch's renders came closer to the training images than the base model's")
    if chosen.validation_loss is not None:
        reasons.append(f"the lowest validation loss of the epochs that passed ({chosen.validation_loss:.4g})")
    elif chosen.loss_minimum:
        reasons.append(f"a local minimum of the train loss (epoch loss {row['loss']:.4g})")
    else:
        reasons.append("the latest epoch that passed (no passing epoch is a local minimum of the train loss)")
    return reasons
