"""One epoch's measured signs, from its renders (the formulas are in `loraforge.evaluation.metrics`), and
the rows and records they are written as (metrics.json, best.json, the TSV series).

An epoch's renders are keyed as `render.render_epoch` makes them: fixed images by
(prompt index, seed, weight), caption images by (image id, weight). Every sign comes with its
base-model (weight 0) value where one exists, so a report can show what the LoRA changed.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from loraforge.evaluation.metrics import (
    Limits,
    as_array,
    centroid_similarity,
    image_signs,
    mean_abs_difference,
    mean_signs,
    nearest_distance,
    rises,
)
from loraforge.evaluation.grids import open_rgb
from loraforge.evaluation.html_report import read_tsv

if TYPE_CHECKING:
    from loraforge.evaluation.embedding import Embedder
    from loraforge.evaluation.render import Shots

Fixed = dict[tuple[int, int, float], Path]  # (prompt index, seed, weight) -> image
SERIES_KEYS = (
    "loss",
    "validation_loss",
    "lora_effect",
    "saturation_rise",
    "high_freq_rise",
    "clipped_rise",
    "memorisation",
    "memorisation_base",
    "likeness",
    "likeness_base",
    "clip_score",
    "clip_score_base",
)


def epoch_signs(
    images: dict[str, Any],
    shots: Shots,
    embedder: Embedder,
    train: tuple[np.ndarray, dict[str, float]] | None,
    check_weight: float,
) -> dict[str, Any]:
    """Every sign one epoch's renders show: `weight_signs`, then (with training images)
    `memorisation` and `likeness`, then (with CLIP) `clip_scores`.

    Args:
        images: `render.render_epoch`'s result.
        shots: what was rendered.
        embedder: the image (and text) embedder.
        train: the training images' unit embeddings (N, D) and mean signs at the render size, or
            None when they are not declared.
        check_weight: the weight at which the overfit rises are judged (`evaluate.check_weight`).
    """
    fixed = images["fixed"]
    train_emb, train_signs = train if train is not None else (None, None)
    out = weight_signs(fixed, shots, check_weight, train_signs)
    if train_emb is not None and shots.captions:
        out.update(memorisation(embedder, images["caption"], [c["id"] for c in shots.captions], train_emb))
    if train_emb is not None:
        out.update(likeness(embedder, images, shots, train_emb))
    if embedder.has_text:
        out.update(clip_scores(embedder, fixed, shots))
    return out


def weight_signs(
    fixed: Fixed, shots: Shots, check_weight: float, train_signs: dict[str, float] | None = None
) -> dict[str, Any]:
    """The overfit signs per weight (`per_weight`), the LoRA's effect (`lora_effect`: mean
    difference between weight 0 and the largest weight) and the rises at `check_weight` vs weight 0
    (or vs the training images where their level is higher: `metrics.rises`).

    Args:
        fixed: the fixed-prompt images.
        shots: what was rendered (pairs and the weight sweep).
        check_weight: the weight at which the rises are judged.
        train_signs: the training images' mean signs at the render size, or None.
    """
    weights = shots.weights
    arrays = {k: as_array(open_rgb(v)) for k, v in fixed.items()}
    per_weight = {w: mean_signs([image_signs(a) for (i, s, ww), a in arrays.items() if ww == w]) for w in weights}
    top = max(weights)
    out: dict[str, Any] = {"per_weight": {f"{w:g}": v for w, v in per_weight.items()}}
    if 0.0 in weights and top > 0:
        out["lora_effect"] = float(
            np.mean([mean_abs_difference(arrays[(i, s, 0.0)], arrays[(i, s, top)]) for i, s in shots.pairs])
        )
    if 0.0 in weights and check_weight in weights:
        out.update(rises(per_weight[check_weight], per_weight[0.0], train_signs))
    return out


def memorisation(
    embedder: Embedder, captions: dict[tuple[str, float], Path], ids: list[str], train_emb: np.ndarray
) -> dict[str, float]:
    """`memorisation` (weight 1) and `memorisation_base` (weight 0): the caption images' mean
    distance to the nearest training image.

    Args:
        embedder: the image embedder.
        captions: the caption images by (training image id, weight).
        ids: the captioned training images' ids, in order.
        train_emb: unit embeddings of the training images (N, D).
    """
    out = {}
    for suffix, w in (("", 1.0), ("_base", 0.0)):
        emb = embedder.images([open_rgb(captions[(i, w)]) for i in ids])
        out[f"memorisation{suffix}"] = float(np.mean([nearest_distance(e, train_emb) for e in emb]))
    return out


def likeness(embedder: Embedder, images: dict[str, Any], shots: Shots, train_emb: np.ndarray) -> dict[str, float]:
    """`likeness` (at the shown weight) and `likeness_base` (weight 0): the similarity to the
    training set of every fixed prompt's images and, when the shown weight is 1, of the random
    prompts' images too (the more renders, the less one seed's luck moves the ranking).

    Args:
        embedder: the image embedder.
        images: `render.render_epoch`'s result (`fixed` and `random` images).
        shots: what was rendered (prompts, seeds, weights, random prompts, the shown weight).
        train_emb: unit embeddings of the training images (N, D).
    """
    out = {}
    for suffix, w in (("", shots.shown_weight), ("_base", 0.0)):
        if w not in shots.weights:
            continue
        paths = [images["fixed"][(i, s, w)] for i, s in shots.pairs]
        if shots.shown_weight == 1.0:
            paths += [images["random"][(j, w)] for j in range(len(shots.randoms))]
        out[f"likeness{suffix}"] = centroid_similarity(embedder.images([open_rgb(p) for p in paths]), train_emb)
    return out


def clip_scores(embedder: Embedder, fixed: Fixed, shots: Shots) -> dict[str, float]:
    """`clip_score` (at the shown weight) and `clip_score_base` (weight 0): 100 × the mean cosine
    of each fixed image to its prompt, floored at 0. Needs a CLIP embedder.

    Args:
        embedder: a CLIP embedder (`has_text`).
        fixed: the fixed-prompt images.
        shots: what was rendered (prompts, pairs, weights, the shown weight).
    """
    texts = embedder.texts(shots.prompts)
    out = {}
    for suffix, w in (("", shots.shown_weight), ("_base", 0.0)):
        if w in shots.weights:
            emb = embedder.images([open_rgb(fixed[(i, s, w)]) for i, s in shots.pairs])
            out[f"clip_score{suffix}"] = float(
                np.mean([100 * max(float(e @ texts[i]), 0.0) for e, (i, _) in zip(emb, shots.pairs)])
            )
    return out


# ---------------------------------------------------------------- rows and records


def epoch_row(m: dict[str, Any]) -> dict[str, Any]:
    """The flat per-epoch row of metrics.json / epochs.tsv (only what was measured).

    Args:
        m: one epoch's metrics.
    """
    return {"epoch": m["epoch"], **{k: m[k] for k in SERIES_KEYS if m.get(k) is not None}}


def metric_columns(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The metrics table's columns: `epoch`, then each of `SERIES_KEYS` some row has.

    Args:
        rows: per epoch name, its `epoch_row`.
    """
    return ["epoch", *[k for k in SERIES_KEYS if any(k in row for row in rows.values())]]


def weight_rows(epochs: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows (epoch, weight, colourfulness, clipped, high_freq) for the weight-sweep plot.

    Args:
        epochs: per epoch name, with `metrics.per_weight`.
    """
    return [
        {"epoch": e["metrics"]["epoch"], "weight": float(w), **signs}
        for e in epochs.values()
        for w, signs in e["metrics"]["per_weight"].items()
    ]


def metrics_record(rows: dict[str, dict[str, Any]], best_epoch: int, best_name: str, similarity: str) -> dict[str, Any]:
    """The content of metrics.json: every epoch's row, the best and the final one.

    Args:
        rows: per epoch name, its `epoch_row`, in epoch order.
        best_epoch: the recommended epoch's number.
        best_name: the recommended epoch's name.
        similarity: the embedding method (`Embedder.method`).
    """
    final = list(rows)[-1]
    return {
        "best_epoch": best_epoch,
        "similarity": similarity,
        "epochs": rows,
        "best": rows[best_name],
        "final": {"epoch": final, **rows[final]},
    }


def best_record(best: dict[str, Any], best_name: str, lora: str, similarity: str, limits: Limits) -> dict[str, Any]:
    """The content of best.json: the recommended epoch, its LoRA file and why.

    Args:
        best: `evalmetrics.recommend`'s result.
        best_name: the recommended epoch's name.
        lora: the recommended LoRA's file name.
        similarity: the embedding method (`Embedder.method`).
        limits: the thresholds the rule used.
    """
    return {
        "epoch": best_name,
        "epoch_number": best["epoch"],
        "lora": lora,
        "reasons": best["reasons"],
        "fallback": best["fallback"],
        "memorising_from": best["memorising_from"],
        "overfit": {str(k): v for k, v in best["overfit"].items()},
        "loss_minima": best["loss_minima"],
        "similarity": similarity,
        "limits": asdict(limits),
    }


def validation_losses(loss_folder: Path | None, extract_report: Path | None) -> dict[int, float]:
    """Validation loss per saved epoch from finetune's `validation.tsv` (empty when validation was
    off), of the weights the shipped LoRAs come from: the EMA column when `extract.from_ema` made
    them (extract's report says so) and finetune measured it, else the raw weights' column.

    Args:
        loss_folder: `reports/finetune`, or None when not declared.
        extract_report: `reports/extract.json`, or None when not declared.
    """
    path = None if loss_folder is None else loss_folder / "validation.tsv"
    if path is None or not path.is_file():
        return {}
    rows = read_tsv(path.read_text())
    from_ema = (
        extract_report is not None
        and extract_report.is_file()
        and json.loads(extract_report.read_text()).get("from_ema")
    )
    column = "validation_loss_ema" if from_ema and all("validation_loss_ema" in r for r in rows) else "validation_loss"
    return {int(r["epoch"]): r[column] for r in rows if column in r}
