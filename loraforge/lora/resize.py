"""LoRA resizing: a kohya-format LoRA brought to a smaller rank by SVD, like kohya's `resize_lora.py`.

Each layer's weight change (alpha / rank) · up @ down is decomposed again and truncated to a rank
chosen per layer (`choose_rank`): `fixed`, or from its singular values (`sv_ratio`, `sv_fro`,
`sv_cumulative`). Every layer is written with one alpha (see `loraforge.lora.format`). Also here: the
resized file's header (`resize_metadata`) and the per-layer report table (`layer_table`).
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal, Mapping

import torch
from torch import Tensor

from loraforge.lora.format import ALPHA, DOWN, UP, flatten_weight, lora_layers
from loraforge.lora.svd import fold_scale

ResizeMethod = Literal["fixed", "sv_ratio", "sv_fro", "sv_cumulative"]
RESIZE_METHODS = ("fixed", "sv_ratio", "sv_fro", "sv_cumulative")

# Singular values at or below this are treated as zero (a layer that did not change).
MIN_SV = 1e-8
# Relative tolerance when comparing singular values or retained shares with a target, so that a
# target met exactly is met despite float32 round-off in the SVD.
TARGET_TOL = 1e-5


def choose_rank(S: Tensor, rank: int, method: ResizeMethod = "fixed", param: float | None = None) -> int:
    """The new rank of a layer from its singular values.

    Never more than `rank`, nor more than len(S) (the layer's own rank: pass only the singular
    values the layer can have), nor less than 1. A zero layer gets rank 1, as in kohya.

    Args:
        S: the layer's singular values, descending, (k,) with k ≥ 1.
        rank: the wanted rank (`fixed`), or the cap of a dynamic method; ≥ 1.
        method: `fixed` keeps `rank`; `sv_ratio` keeps singular values ≥ max / `param`;
            `sv_fro` the smallest rank keeping a `param` share of the Frobenius norm;
            `sv_cumulative` the smallest rank keeping a `param` share of the sum of singular values.
        param: the dynamic method's target: ≥ 1 for `sv_ratio`, in (0, 1] for `sv_fro` and
            `sv_cumulative`; unused by `fixed`.
    """
    _check_resize_args(rank, method, param)
    if S.numel() == 0:
        raise ValueError("`S` must hold at least one singular value")
    S = S.double()
    if float(S[0]) <= MIN_SV:
        return 1  # a zero layer: keep one (zero) component
    if method == "fixed":
        new = rank
    elif method == "sv_ratio":
        new = int((S * param >= S[0] * (1 - TARGET_TOL)).sum())
    else:
        values = S.pow(2) if method == "sv_fro" else S
        kept = torch.cumsum(values, 0) / values.sum()  # (k,): share kept by the top 1..k
        if method == "sv_fro":
            kept = kept.sqrt()
        new = int((kept < param * (1 - TARGET_TOL)).sum()) + 1
    return max(1, min(new, rank, S.numel()))


def _check_resize_args(rank: int, method: str, param: float | None) -> None:
    if rank < 1:
        raise ValueError(f"`rank` must be ≥ 1, got {rank}")
    if method not in RESIZE_METHODS:
        raise ValueError(f"`method` must be one of {', '.join(RESIZE_METHODS)}, got {method!r}")
    if method == "sv_ratio" and (param is None or param < 1.0):
        raise ValueError(f"`param` for method 'sv_ratio' must be ≥ 1, got {param}")
    if method in ("sv_fro", "sv_cumulative") and (param is None or not 0.0 < param <= 1.0):
        raise ValueError(f"`param` for method {method!r} must be in (0, 1], got {param}")


def resize_layer(
    up: Tensor,
    down: Tensor,
    alpha: float,
    rank: int,
    method: ResizeMethod = "fixed",
    param: float | None = None,
    new_alpha: float | None = None,
) -> tuple[Tensor, Tensor, float, dict[str, float]]:
    """Resize one LoRA layer by SVD of the weight change it applies.

    W = (alpha / old_rank) · up @ down is decomposed again and truncated to the rank chosen by
    `choose_rank`. The old scale is folded into the new factors, so the layer's effect is
    unchanged up to the dropped singular values, whatever the new alpha.

    Args:
        up: (out, r) or (out, r, 1, 1).
        down: (r, in) or (r, in, kh, kw).
        alpha: the layer's alpha.
        rank: the wanted rank (`fixed`), or the cap of a dynamic method; ≥ 1.
        method: `fixed`, `sv_ratio`, `sv_fro` or `sv_cumulative` (see `choose_rank`).
        param: the dynamic method's target (see `choose_rank`).
        new_alpha: the new layer's alpha (> 0); None means the new rank (scale 1).

    Returns:
        (up, down, new_alpha, stats): new factors in float32, shaped as the inputs with the new
        rank; stats `rank`, `old_rank`, `fro_retained` (share of the Frobenius norm kept) and
        `sv_ratio_max_min` (largest / smallest kept singular value).
    """
    _check_resize_args(rank, method, param)
    old_rank = down.shape[0]
    U, S, Vh = _product_svd(flatten_weight(up).float() * (float(alpha) / old_rank), flatten_weight(down).float())
    new_rank = choose_rank(S, rank, method, param)  # S has at most old_rank values: the own rank
    new_alpha = float(new_rank) if new_alpha is None else float(new_alpha)
    if new_alpha <= 0:
        raise ValueError(f"`new_alpha` must be > 0, got {new_alpha}")
    new_up = fold_scale(U[:, :new_rank] * S[:new_rank], new_rank, new_alpha)  # (out, new_rank)
    new_up = new_up.reshape(up.shape[0], new_rank, *up.shape[2:])
    new_down = Vh[:new_rank].reshape(new_rank, *down.shape[1:])
    largest, smallest = float(S[0]), float(S[new_rank - 1])
    stats = {
        "rank": new_rank,
        "old_rank": old_rank,
        "fro_retained": _fro_fraction(S, new_rank),
        "sv_ratio_max_min": largest / smallest if smallest > 0 else (1.0 if largest == 0 else math.inf),
    }
    return new_up.contiguous(), new_down.contiguous(), new_alpha, stats


def _product_svd(up: Tensor, down: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of up @ down without forming it: QR of both factors, then an r×r SVD.

    Exact, far cheaper than the SVD of the (out, in) product, and it yields only the
    ≤ r singular values the product can have (no round-off tail).

    Args:
        up: (out, r).
        down: (r, in).

    Returns:
        U (out, k), S (k,), Vh (k, in) with k = min(out, in, r).
    """
    q_up, r_up = torch.linalg.qr(up)  # (out, a), (a, r) with a = min(out, r)
    q_down, r_down = torch.linalg.qr(down.T)  # (in, b), (b, r) with b = min(in, r)
    u, S, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)  # (a, k), (k,), (k, b)
    return q_up @ u, S, vh @ q_down.T


def _fro_fraction(S: Tensor, rank: int) -> float:
    """Share of the Frobenius norm kept by the top `rank` singular values (1.0 for a zero matrix)."""
    sq = S.double().pow(2)
    total = float(sq.sum())
    return 1.0 if total <= 0.0 else math.sqrt(float(sq[:rank].sum()) / total)


def resize_lora(
    tensors: Mapping[str, Tensor],
    rank: int,
    method: ResizeMethod = "fixed",
    param: float | None = None,
    new_alpha: float | None = None,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, Tensor], dict[str, dict[str, float]]]:
    """Resize every layer of a kohya-format LoRA (see `resize_layer`).

    Every layer gets the same alpha, also when the dynamic methods give layers different ranks
    (see `loraforge.lora.format` for why).

    Args:
        tensors: the LoRA state dict; a layer without `.alpha` has alpha = its rank.
        rank: the wanted rank (`fixed`), or the cap of a dynamic method; ≥ 1.
        method: `fixed`, `sv_ratio`, `sv_fro` or `sv_cumulative` (see `choose_rank`).
        param: the dynamic method's target (see `choose_rank`).
        new_alpha: the alpha of every new layer (> 0); None means `rank`.
        device: where the SVDs run.

    Returns:
        (new tensors with the input's up/down dtype and float32 alphas, stats per kohya name).
    """
    new_alpha = float(rank) if new_alpha is None else float(new_alpha)
    out: dict[str, Tensor] = {}
    stats: dict[str, dict[str, float]] = {}
    for name in lora_layers(tensors):
        up, down = tensors[name + UP], tensors[name + DOWN]
        alpha = float(tensors[name + ALPHA]) if name + ALPHA in tensors else float(down.shape[0])
        new_up, new_down, _, stats[name] = resize_layer(
            up.to(device), down.to(device), alpha, rank, method, param, new_alpha
        )
        out[name + DOWN] = new_down.to("cpu", down.dtype).contiguous()
        out[name + UP] = new_up.to("cpu", up.dtype).contiguous()
        out[name + ALPHA] = torch.tensor(new_alpha, dtype=torch.float32)
    return out, stats


def resize_metadata(
    metadata: dict[str, str],
    rank: int,
    method: str,
    param: float | None,
    stats: dict[str, dict[str, float]],
    title: str,
) -> dict[str, str]:
    """The header of a resized LoRA: the input's, with dim/alpha, comment and modelspec updated.

    Fixed resizes write `ss_network_dim` = `ss_network_alpha` = rank; dynamic ones write
    `Dynamic` for both, as kohya does. The hashes are recomputed by `save_lora`.

    Args:
        metadata: the input file's header.
        rank: the fixed rank, or the dynamic methods' cap (also every layer's alpha).
        method: `fixed`, `sv_ratio`, `sv_fro` or `sv_cumulative`.
        param: the dynamic method's target.
        stats: per-layer stats from `resize_lora`.
        title: `modelspec.title`.
    """
    ranks = [int(s["rank"]) for s in stats.values()]
    fro = [s["fro_retained"] for s in stats.values()]
    what = f"{method} rank {rank}" + (f" (param {param:g})" if param is not None else "")
    comment = (
        f"resized by loraforge: {what} from {metadata.get('ss_network_dim', '?')}; "
        f"ranks {min(ranks, default=0)}-{max(ranks, default=0)}, "
        f"mean Frobenius kept {100 * sum(fro) / max(len(fro), 1):.2f}%"
    )
    previous = metadata.get("ss_training_comment", "")
    dim = str(rank) if method == "fixed" else "Dynamic"
    alpha = str(float(rank)) if method == "fixed" else "Dynamic"
    new = {
        **metadata,
        "ss_network_dim": dim,
        "ss_network_alpha": alpha,
        "ss_training_comment": f"{previous}; {comment}" if previous else comment,
        "ss_resize": json.dumps({"method": method, "rank": rank, "param": param, "alpha": float(rank)}),
    }
    new["modelspec.title"] = title
    if "modelspec.description" in new:
        new["modelspec.description"] = new["ss_training_comment"]
    return new


def layer_table(stats: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Rows `layer`, `rank`, `old_rank`, `fro_retained_pct`, `sv_ratio_max_min` for reports.

    Args:
        stats: per-layer stats from `resize_lora`.
    """
    return [
        {
            "layer": name,
            "rank": int(s["rank"]),
            "old_rank": int(s["old_rank"]),
            "fro_retained_pct": round(100 * s["fro_retained"], 4),
            "sv_ratio_max_min": s["sv_ratio_max_min"],
        }
        for name, s in stats.items()
    ]
