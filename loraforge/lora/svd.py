"""LoRA extraction: a kohya-format LoRA from the difference of two models, by truncated SVD.

The pipeline makes its LoRA the way the practitioners' guides do: full finetune, then extract a
LoRA from the weight difference (truncated SVD, like kohya's `extract_lora_from_models.py`),
then resize it to a small rank (`loraforge.lora.resize`). Which layers get a LoRA, their names,
the file format and its one-alpha-per-file rule are in `loraforge.lora.format`.

Weights are read through a `TensorSource`, one layer at a time, so extraction can stream from
safetensors files without building the models (`loraforge.lora.extraction`).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Literal, Mapping, Union

import torch
from torch import Tensor

from loraforge.lora.format import ALPHA, DOWN, UP, flatten_weight

# A source of weights: a state dict, or a function `get(key) -> Tensor` that reads one tensor
# (e.g. from a `safetensors.safe_open` handle), so that extraction never holds a whole model.
TensorSource = Union[Mapping[str, Tensor], Callable[[str], Tensor]]

SvdMethod = Literal["full", "lowrank"]
SVD_METHODS = ("full", "lowrank")
# Randomised SVD settings: extra sampled directions beyond the rank (max(16, rank / 2)), and
# power iterations (each sharpens the spectrum's decay). On SDXL-shaped deltas with a slowly
# decaying spectrum, rank/2 extra directions and 2 iterations put the rank-128 error within 0.2%
# of the exact SVD's; 16 extra directions gave +1.5% (benchmarks/extract.py).
LOWRANK_MIN_OVERSAMPLE = 16
LOWRANK_NITER = 2


def lowrank_oversample(rank: int) -> int:
    """Extra directions the randomised SVD samples beyond `rank`: max(16, rank // 2).

    Args:
        rank: the wanted rank.
    """
    return max(LOWRANK_MIN_OVERSAMPLE, rank // 2)


def _abs_quantile(values: Tensor, q: float) -> Tensor:
    """The `q` quantile of |values| (linear interpolation, as `torch.quantile`), for any size.

    `torch.quantile` refuses inputs over 2**24 elements, which full-rank SDXL layers exceed.
    """
    flat = values.abs().flatten().double()
    pos = q * (flat.numel() - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    lo_val = torch.kthvalue(flat, lo + 1).values
    hi_val = torch.kthvalue(flat, hi + 1).values if hi != lo else lo_val
    return (lo_val + (hi_val - lo_val) * (pos - lo)).to(values.dtype)


def _top_svd(matrix: Tensor, rank: int, svd: SvdMethod) -> tuple[Tensor, Tensor, Tensor]:
    """The top-`rank` singular triplets of a float32 matrix (out, in): U (out, r), S (r,), Vh (r, in).

    `full` is LAPACK's exact SVD; `lowrank` is `torch.svd_lowrank` (Halko et al.) with
    `lowrank_oversample(rank)` extra directions and `LOWRANK_NITER` power iterations; it falls
    back to `full` when rank + oversampling reaches the matrix's smaller side (no saving there).
    """
    if svd not in SVD_METHODS:
        raise ValueError(f"`svd` must be one of {', '.join(SVD_METHODS)}, got {svd!r}")
    q = rank + lowrank_oversample(rank)
    if svd == "full" or q >= min(matrix.shape):
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)  # (out, k), (k,), (k, in)
        return U[:, :rank], S[:rank], Vh[:rank]
    U, S, V = torch.svd_lowrank(matrix, q=q, niter=LOWRANK_NITER)  # (out, q), (q,), (in, q)
    return U[:, :rank], S[:rank], V[:, :rank].T


def _svd_split(
    delta: Tensor, rank: int, clamp_quantile: float, svd: SvdMethod = "full"
) -> tuple[Tensor, Tensor, float]:
    """Truncated SVD of a 2-D or 4-D delta, split and clamped as kohya does.

    Returns (up, down, fro_retained): `up` (out, r) or (out, r, 1, 1), `down` (r, in) or
    (r, in, kh, kw), and the share of the delta's Frobenius norm the top r singular values hold
    (before clamping); r = min(rank, out, in_flat).
    """
    if rank < 1:
        raise ValueError(f"`rank` must be ≥ 1, got {rank}")
    if not 0.0 < clamp_quantile <= 1.0:
        raise ValueError(f"`clamp_quantile` must be in (0, 1], got {clamp_quantile}")
    matrix = flatten_weight(delta).float()  # (out, in_flat)
    out_dim, in_flat = matrix.shape
    rank = min(rank, out_dim, in_flat)
    U, S, Vh = _top_svd(matrix, rank, svd)  # (out, r), (r,), (r, in_flat)
    up = U * S  # (out, r): singular values go into `up`
    down = Vh  # (r, in_flat)
    if clamp_quantile < 1.0:
        limit = _abs_quantile(torch.cat([up.flatten(), down.flatten()]), clamp_quantile)
        up, down = up.clamp(-limit, limit), down.clamp(-limit, limit)
    if delta.dim() == 4:
        up = up.reshape(out_dim, rank, 1, 1)
        down = down.reshape(rank, *delta.shape[1:])  # (r, in, kh, kw)
    total = float(matrix.double().pow(2).sum())
    kept = 1.0 if total <= 0.0 else min(1.0, math.sqrt(float(S.double().pow(2).sum()) / total))
    return up.contiguous(), down.contiguous(), kept


def extract_layer(
    delta: Tensor, rank: int, clamp_quantile: float = 1.0, svd: SvdMethod = "full"
) -> tuple[Tensor, Tensor]:
    """A rank-`rank` LoRA approximating one layer's weight difference (truncated SVD).

    The singular values go into `up` (U·S) and `down` is Vh, as kohya does; both are then clamped
    to the `clamp_quantile` quantile of their joint absolute values, which trims the rare huge
    entries that make a LoRA brittle at high weights. `up @ down` ≈ delta (scale 1).

    Args:
        delta: tuned − base weight, (out, in) for Linear or (out, in, kh, kw) for Conv2d.
        rank: wanted rank ≥ 1; capped at min(out, in·kh·kw).
        clamp_quantile: quantile in (0, 1] of |entries| to clamp at; 1.0 disables clamping
            (kohya's default is 0.99).
        svd: `full` (exact) or `lowrank` (randomised, much faster for rank ≪ layer size).

    Returns:
        (up, down) in float32: (out, r) and (r, in) for Linear; (out, r, 1, 1) and
        (r, in, kh, kw) for Conv2d.
    """
    up, down, _ = _svd_split(delta, rank, clamp_quantile, svd)
    return up, down


def _getter(source: TensorSource) -> Callable[[str], Tensor]:
    if callable(source):
        return source
    return source.__getitem__


def layer_rank(weight_shape: tuple[int, ...] | torch.Size, dim: int, conv_dim: int) -> int:
    """The extraction rank for one weight: `conv_dim` for k×k convs (k > 1), else `dim`.

    Args:
        weight_shape: (out, in) or (out, in, kh, kw).
        dim: rank for Linear and 1×1 conv weights.
        conv_dim: rank for larger convs; 0 means they should not be targeted at all.
    """
    if len(weight_shape) == 4 and tuple(weight_shape[2:]) != (1, 1):
        if conv_dim < 1:
            raise ValueError(f"a {tuple(weight_shape)} conv is targeted but `conv_dim` is {conv_dim}")
        return conv_dim
    return dim


def extract_lora(
    base: TensorSource,
    tuned: TensorSource,
    targets: Mapping[str, str],
    dim: int,
    conv_dim: int = 0,
    clamp_quantile: float = 1.0,
    dtype: torch.dtype = torch.float32,
    alpha: float | None = None,
    device: str | torch.device = "cpu",
    on_layer: Callable[[str, dict[str, float]], None] | None = None,
    svd: SvdMethod = "full",
) -> dict[str, Tensor]:
    """Extract a kohya-format LoRA from the difference of two models, one layer at a time.

    Args:
        base: the base model's weights: a state dict or a `get(key) -> Tensor` function.
        tuned: the finetuned model's weights, same keys as `base`.
        targets: module name (e.g. `down_blocks.1.attentions.0.proj_in`) → kohya name (e.g.
            from `loraforge.lora.format.lora_targets`); the weight read is `<module>.weight`.
        dim: rank of Linear and 1×1 conv layers (≥ 1).
        conv_dim: rank of k×k conv layers; must be ≥ 1 if any such layer is targeted.
        clamp_quantile: see `extract_layer` (1.0 = no clamping).
        dtype: dtype of the saved `lora_up` / `lora_down` tensors (the SVD runs in float32).
        alpha: the alpha written for every layer; None means `dim`. One alpha for the whole
            file (see `loraforge.lora.format`); a layer whose rank r differs from it gets its
            `up` multiplied by r / alpha, so every layer still applies exactly `up @ down`.
        device: where the SVD runs (`cuda` is much faster on SDXL-sized layers).
        on_layer: called after each layer with its kohya name and stats `rank` and
            `fro_retained` (share of the delta's Frobenius norm the LoRA keeps); for progress
            bars and reports.
        svd: `full` or `lowrank` (see `extract_layer`).

    Returns:
        `<kohya>.lora_down.weight`, `<kohya>.lora_up.weight` and `<kohya>.alpha` (a float32
        scalar) for every target; at LoRA weight 1 each layer adds its truncated delta.
    """
    if dim < 1:
        raise ValueError(f"`dim` must be ≥ 1, got {dim}")
    alpha = float(dim) if alpha is None else float(alpha)
    if alpha <= 0:
        raise ValueError(f"`alpha` must be > 0, got {alpha}")
    get_base, get_tuned = _getter(base), _getter(tuned)
    lora: dict[str, Tensor] = {}
    for module, name in targets.items():
        delta = _layer_delta(get_base, get_tuned, f"{module}.weight", device)  # (out, in) or (out, in, kh, kw)
        up, down, kept = _svd_split(delta, layer_rank(delta.shape, dim, conv_dim), clamp_quantile, svd)
        del delta
        rank = down.shape[0]
        lora[name + DOWN] = down.to("cpu", dtype).contiguous()
        lora[name + UP] = fold_scale(up, rank, alpha).to("cpu", dtype).contiguous()
        lora[name + ALPHA] = torch.tensor(alpha, dtype=torch.float32)
        if on_layer is not None:
            on_layer(name, {"rank": rank, "fro_retained": kept})
    return lora


def _layer_delta(
    get_base: Callable[[str], Tensor], get_tuned: Callable[[str], Tensor], key: str, device: str | torch.device
) -> Tensor:
    """tuned − base of one weight, in float32 on `device`; only this layer's weights are read.

    The two weights are freed when this returns, so one layer's weights are alive at a time.

    Args:
        get_base: reads a base weight.
        get_tuned: reads a tuned weight.
        key: the weight's key, `<module>.weight`.
        device: where the difference (and the SVD after it) is computed.
    """
    w_base, w_tuned = get_base(key), get_tuned(key)
    if w_base.shape != w_tuned.shape:
        raise ValueError(f"`{key}` has shape {tuple(w_base.shape)} in base, {tuple(w_tuned.shape)} in tuned")
    return w_tuned.to(device, torch.float32) - w_base.to(device, torch.float32)


def fold_scale(up: Tensor, rank: int, alpha: float) -> Tensor:
    """`up` rescaled so that a layer with this `alpha` applies up @ down unchanged.

    Loaders multiply by alpha / rank; multiplying `up` by rank / alpha cancels that.

    Args:
        up: (out, r) or (out, r, 1, 1), with r = `rank`.
        rank: the layer's rank.
        alpha: the alpha the layer will be saved with (> 0).
    """
    return up if float(alpha) == float(rank) else up * (rank / float(alpha))


def max_abs_delta(base: TensorSource, tuned: TensorSource, keys: Iterable[str]) -> float:
    """The largest |tuned − base| over the given keys, read one tensor at a time.

    Args:
        base: the base weights: a state dict or a `get(key) -> Tensor` function.
        tuned: the finetuned weights, same keys.
        keys: the keys to compare, e.g. the targeted modules' `.weight` keys.
    """
    get_base, get_tuned = _getter(base), _getter(tuned)
    largest = 0.0
    for key in keys:
        diff = get_tuned(key).float() - get_base(key).float()
        largest = max(largest, float(diff.abs().max()) if diff.numel() else 0.0)
    return largest


def text_encoder_changed(max_abs_diff: float, min_diff: float) -> bool:
    """Whether a text encoder changed enough to get a LoRA (kohya's `--min_diff` rule).

    Args:
        max_abs_diff: largest |tuned − base| over the text encoder's targeted weights.
        min_diff: threshold ≥ 0; an encoder whose largest change is not above it is left out.
    """
    if min_diff < 0:
        raise ValueError(f"`min_diff` must be ≥ 0, got {min_diff}")
    return max_abs_diff > min_diff
