"""LoRA math and kohya-format LoRA files.

The pipeline makes its LoRA the way the practitioners' guides do: full finetune, then extract a
LoRA from the weight difference (truncated SVD, like kohya's `extract_lora_from_models.py`),
then resize it to a small rank (SVD again, like kohya's `resize_lora.py`).

Conventions, shared with kohya sd-scripts, diffusers, ComfyUI and A1111:

- A LoRA on a weight W of shape (out, in) is a pair `down` (rank, in) and `up` (out, rank) with
  a scalar `alpha`; the layer becomes W + (alpha / rank) · up @ down. For a convolution with
  weight (out, in, kh, kw), `down` is (rank, in, kh, kw) and `up` is (out, rank, 1, 1).
- Keys in a file are `<kohya name>.lora_down.weight`, `<kohya name>.lora_up.weight` and
  `<kohya name>.alpha`, where the kohya name is a prefix (`lora_unet`, `lora_te`, `lora_te1`,
  `lora_te2`) and the module name with `.` replaced by `_`. UNet modules are named as kohya names
  them: diffusers names for SD1.5, the original Stability ("sgm") names for SDXL
  (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`); see `lora_targets` and
  `loraforge.kohya_names`.
- The header carries kohya's `ss_*` keys, Stability's `modelspec.*` keys and kohya's
  `sshs_model_hash` / `sshs_legacy_hash` (`lora_metadata`, `modelspec_metadata`, `save_lora`).

Which weights get a LoRA is decided from state-dict key names only, so extraction can stream one
layer at a time from safetensors files without building the models.

One alpha per file. Layers may have different ranks (a layer narrower than `dim`, `conv_dim`,
the dynamic resize methods), but every layer is written with the same alpha and the factor
alpha / rank is folded into `up`. diffusers (0.42) mis-scales kohya files whose alphas differ
between layers: it keys its per-layer alpha overrides by names that no longer match the
attention modules (`...attn1.processor.to_q_lora.down.weight`), peft ignores them with a
warning, and those layers get the file's most common alpha instead of their own.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Union

import torch
from torch import Tensor

KOHYA_PREFIXES = ("lora_unet", "lora_te", "lora_te1", "lora_te2")
Prefix = Literal["lora_unet", "lora_te", "lora_te1", "lora_te2"]
ResizeMethod = Literal["fixed", "sv_ratio", "sv_fro", "sv_cumulative"]
RESIZE_METHODS = ("fixed", "sv_ratio", "sv_fro", "sv_cumulative")

# A source of weights: a state dict, or a function `get(key) -> Tensor` that reads one tensor
# (e.g. from a `safetensors.safe_open` handle), so that extraction never holds a whole model.
TensorSource = Union[Mapping[str, Tensor], Callable[[str], Tensor]]

DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"

BASE_MODEL_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}

# Singular values at or below this are treated as zero (a layer that did not change).
MIN_SV = 1e-8
# Relative tolerance when comparing singular values or retained shares with a target, so that a
# target met exactly is met despite float32 round-off in the SVD.
TARGET_TOL = 1e-5

_UNET_BLOCK = r"(?:down_blocks\.\d+|mid_block|up_blocks\.\d+)"
# Linear and 1x1-conv weights inside a Transformer2DModel (kohya: UNET_TARGET_REPLACE_MODULE).
_UNET_ATTENTION = re.compile(
    rf"^{_UNET_BLOCK}\.attentions\.\d+\."
    r"(?:proj_in|proj_out|transformer_blocks\.\d+\."
    r"(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))\.weight$"
)
# Every conv/linear weight of ResnetBlock2D, Downsample2D and Upsample2D (kohya's "conv_dim"
# LoRA, a.k.a. LoCon): the 3x3 convs get `conv_dim`, time_emb_proj and 1x1 conv_shortcut `dim`.
_UNET_CONV = re.compile(
    rf"^{_UNET_BLOCK}\."
    r"(?:resnets\.\d+\.(?:conv1|conv2|conv_shortcut|time_emb_proj)|(?:downsamplers|upsamplers)\.0\.conv)"
    r"\.weight$"
)
# CLIP text encoder: attention projections and MLP (kohya: TEXT_ENCODER_TARGET_REPLACE_MODULE).
# transformers ≥ 5 flattens CLIPTextModel (`encoder.layers...`, no `text_model.` level), while
# CLIPTextModelWithProjection and every checkpoint on disk before it keep `text_model.`.
_TEXT_ENCODER = re.compile(
    r"^(?:text_model\.)?encoder\.layers\.\d+\."
    r"(?:self_attn\.(?:q_proj|k_proj|v_proj|out_proj)|mlp\.(?:fc1|fc2))\.weight$"
)


# --------------------------------------------------------------------------------------------
# Which weights get a LoRA, and their names
# --------------------------------------------------------------------------------------------


def unet_targets(keys: Iterable[str], conv: bool) -> list[str]:
    """UNet modules that get a LoRA, chosen from diffusers state-dict key names.

    Args:
        keys: state-dict keys of a diffusers `UNet2DConditionModel` (SD1.5 or SDXL), e.g.
            `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight`.
        conv: also target the ResNet, downsampler and upsampler convolutions (and the ResNet's
            `time_emb_proj` / `conv_shortcut`), as kohya does when `conv_dim` is set.

    Returns:
        Sorted module names (keys without `.weight`).
    """
    patterns = [_UNET_ATTENTION, _UNET_CONV] if conv else [_UNET_ATTENTION]
    return _matching_modules(keys, patterns)


def text_encoder_targets(keys: Iterable[str]) -> list[str]:
    """CLIP text-encoder modules that get a LoRA: q/k/v/out projections and the MLP's fc1/fc2.

    Args:
        keys: state-dict keys of a transformers `CLIPTextModel` or `CLIPTextModelWithProjection`,
            e.g. `text_model.encoder.layers.0.self_attn.q_proj.weight`, or
            `encoder.layers.0.self_attn.q_proj.weight` (CLIPTextModel in transformers ≥ 5).

    Returns:
        Sorted module names (keys without `.weight`), spelled as in `keys`.
    """
    return _matching_modules(keys, [_TEXT_ENCODER])


def _matching_modules(keys: Iterable[str], patterns: list[re.Pattern[str]]) -> list[str]:
    modules = {key[: -len(".weight")] for key in keys if any(p.match(key) for p in patterns)}
    return sorted(modules)


def kohya_name(prefix: Prefix, module: str) -> str:
    """The kohya name of a module: `prefix` + `_` + the module name with `.` replaced by `_`.

    Text-encoder modules are always named as in the checkpoint layout every tool expects
    (`text_model.encoder.layers.N...`), also when transformers ≥ 5 calls them `encoder.layers.N...`.

    UNet modules keep their diffusers names here, which is kohya's SD1.5 convention; kohya's SDXL
    LoRAs use the original Stability ("sgm") names, which `lora_targets` (via
    `loraforge.kohya_names`) writes for SDXL.

    Args:
        prefix: `lora_unet`, `lora_te` (SD1.5 text encoder), `lora_te1` or `lora_te2` (SDXL).
        module: dotted module name, e.g. `down_blocks.1.attentions.0.proj_in`.

    Example:
        `kohya_name("lora_unet", "mid_block.attentions.0.proj_in")` →
        `lora_unet_mid_block_attentions_0_proj_in`
    """
    if prefix not in KOHYA_PREFIXES:
        raise ValueError(f"`prefix` must be one of {', '.join(KOHYA_PREFIXES)}, got {prefix!r}")
    if not module or module.endswith(".weight"):
        raise ValueError(f"`module` must be a module name without `.weight`, got {module!r}")
    if prefix != "lora_unet" and module.startswith("encoder."):
        module = "text_model." + module  # transformers ≥ 5's flattened CLIPTextModel
    return f"{prefix}_{module.replace('.', '_')}"


def kohya_names(prefix: Prefix, modules: Iterable[str]) -> dict[str, str]:
    """Map module names to their kohya names (see `kohya_name`); fails if two names collide.

    Args:
        prefix: `lora_unet`, `lora_te`, `lora_te1` or `lora_te2`.
        modules: dotted module names, e.g. from `unet_targets` or `text_encoder_targets`.
    """
    targets = {module: kohya_name(prefix, module) for module in modules}
    if len(set(targets.values())) != len(targets):
        raise ValueError(f"`modules` give colliding kohya names under prefix {prefix!r}")
    return targets


Component = Literal["unet", "text_encoder", "text_encoder_2"]
# kohya's prefix of each component, per architecture.
PREFIXES: dict[str, dict[str, Prefix]] = {
    "sd15": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}


def lora_targets(
    arch: Literal["sd15", "sdxl"],
    component: Component,
    keys: Iterable[str],
    conv: bool = False,
    unet_config: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Module name → kohya name for every LoRA-carrying module of one component, as kohya names them.

    SD1.5 UNet modules keep their diffusers names; SDXL UNet modules get their sgm names
    (`lora_unet_input_blocks_4_1_...`), numbered from `unet_config` (else from `keys`); text
    encoders get `lora_te_` (SD1.5) or `lora_te1_` / `lora_te2_` (SDXL).

    Args:
        arch: `sd15` or `sdxl`.
        component: `unet`, `text_encoder` or `text_encoder_2` (SDXL only).
        keys: the component's state-dict keys (diffusers / transformers names).
        conv: also target the UNet's ResNet and resampler convolutions (`extract.conv_dim` > 0).
        unet_config: the UNet's config.json contents (SDXL numbering); None derives it from `keys`.
    """
    from loraforge.kohya_names import KOHYA_UNET_NAMING, kohya_unet_names, layout_from_config, layout_from_keys

    if arch not in PREFIXES:
        raise ValueError(f"`arch` must be one of {', '.join(PREFIXES)}, got {arch!r}")
    if component not in PREFIXES[arch]:
        raise ValueError(f"`component` must be one of {', '.join(PREFIXES[arch])} for {arch}, got {component!r}")
    keys = list(keys)
    if component != "unet":
        return kohya_names(PREFIXES[arch][component], text_encoder_targets(keys))
    naming = KOHYA_UNET_NAMING[arch]
    layout = None
    if naming == "sgm":
        layout = layout_from_config(unet_config) if unet_config is not None else layout_from_keys(keys)
    return kohya_unet_names(unet_targets(keys, conv=conv), naming, layout)


# --------------------------------------------------------------------------------------------
# Extraction: weight difference -> LoRA
# --------------------------------------------------------------------------------------------


def _flatten(weight: Tensor) -> Tensor:
    """A Linear (out, in) or conv (out, in, kh, kw) weight as a matrix (out, in*kh*kw)."""
    if weight.dim() == 2:
        return weight
    if weight.dim() == 4:
        return weight.flatten(1)
    raise ValueError(f"expected a 2-D or 4-D weight, got shape {tuple(weight.shape)}")


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
    matrix = _flatten(delta).float()  # (out, in_flat)
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
            from `kohya_names`); the weight read is `<module>.weight`.
        dim: rank of Linear and 1×1 conv layers (≥ 1).
        conv_dim: rank of k×k conv layers; must be ≥ 1 if any such layer is targeted.
        clamp_quantile: see `extract_layer` (1.0 = no clamping).
        dtype: dtype of the saved `lora_up` / `lora_down` tensors (the SVD runs in float32).
        alpha: the alpha written for every layer; None means `dim`. One alpha for the whole
            file (see the module docstring); a layer whose rank r differs from it gets its
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
        key = f"{module}.weight"
        w_base, w_tuned = get_base(key), get_tuned(key)
        if w_base.shape != w_tuned.shape:
            raise ValueError(f"`{key}` has shape {tuple(w_base.shape)} in base, {tuple(w_tuned.shape)} in tuned")
        delta = w_tuned.to(device, torch.float32) - w_base.to(device, torch.float32)
        rank = layer_rank(delta.shape, dim, conv_dim)
        del w_base, w_tuned  # keep one layer's weights alive at a time
        up, down, kept = _svd_split(delta, rank, clamp_quantile, svd)
        del delta
        rank = down.shape[0]
        lora[name + DOWN] = down.to("cpu", dtype).contiguous()
        lora[name + UP] = fold_scale(up, rank, alpha).to("cpu", dtype).contiguous()
        lora[name + ALPHA] = torch.tensor(alpha, dtype=torch.float32)
        if on_layer is not None:
            on_layer(name, {"rank": rank, "fro_retained": kept})
    return lora


def fold_scale(up: Tensor, rank: int, alpha: float) -> Tensor:
    """`up` rescaled so that a layer with this `alpha` applies up @ down unchanged.

    Loaders multiply by alpha / rank; multiplying `up` by rank / alpha cancels that.

    Args:
        up: (out, r) or (out, r, 1, 1), with r = `rank`.
        rank: the layer's rank.
        alpha: the alpha the layer will be saved with (> 0).
    """
    return up if float(alpha) == float(rank) else up * (rank / float(alpha))


def _fro_fraction(S: Tensor, rank: int) -> float:
    """Share of the Frobenius norm kept by the top `rank` singular values (1.0 for a zero matrix)."""
    sq = S.double().pow(2)
    total = float(sq.sum())
    return 1.0 if total <= 0.0 else math.sqrt(float(sq[:rank].sum()) / total)


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


# --------------------------------------------------------------------------------------------
# Resizing: LoRA -> smaller LoRA
# --------------------------------------------------------------------------------------------


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


def merge_layer(up: Tensor, down: Tensor, alpha: float) -> Tensor:
    """The weight change a LoRA layer applies at scale 1: (alpha / rank) · up @ down.

    Args:
        up: (out, r) or (out, r, 1, 1).
        down: (r, in) or (r, in, kh, kw).
        alpha: the layer's alpha.

    Returns:
        float32 tensor shaped like the layer's weight: (out, in) or (out, in, kh, kw).
    """
    rank = down.shape[0]
    if up.shape[1] != rank:
        raise ValueError(f"`up` {tuple(up.shape)} and `down` {tuple(down.shape)} disagree on the rank")
    delta = _flatten(up).float() @ _flatten(down).float()  # (out, in_flat)
    delta = delta * (float(alpha) / rank)
    return delta.reshape(up.shape[0], *down.shape[1:])


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
    U, S, Vh = _product_svd(_flatten(up).float() * (float(alpha) / old_rank), _flatten(down).float())
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


def lora_layers(tensors: Mapping[str, Tensor]) -> list[str]:
    """The kohya names in a LoRA state dict; fails on keys that are not plain LoRA keys.

    Args:
        tensors: a kohya-format LoRA state dict.
    """
    parts: dict[str, set[str]] = {}
    for key in tensors:
        name, _, suffix = key.partition(".")
        if "." + suffix not in (DOWN, UP, ALPHA):
            raise ValueError(f"`{key}` is not a plain LoRA key (`.lora_down.weight`, `.lora_up.weight`, `.alpha`)")
        parts.setdefault(name, set()).add("." + suffix)
    for name, have in parts.items():
        if not {DOWN, UP} <= have:
            raise ValueError(f"LoRA `{name}` needs both `{DOWN}` and `{UP}`, has {', '.join(sorted(have))}")
    return sorted(parts)


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
    (see the module docstring for why).

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


# --------------------------------------------------------------------------------------------
# Applying a LoRA to weights (tests, evaluation without peft)
# --------------------------------------------------------------------------------------------


def apply_lora(
    state: Mapping[str, Tensor],
    tensors: Mapping[str, Tensor],
    targets: Mapping[str, str],
    scale: float = 1.0,
) -> dict[str, Tensor]:
    """A copy of `state` with each targeted weight W replaced by W + scale · (alpha/r) · up @ down.

    Args:
        state: a model's state dict (e.g. a UNet's), not modified.
        tensors: a kohya-format LoRA state dict (may hold other components' layers too).
        targets: module name → kohya name; targets absent from `tensors` are left as they are.
        scale: the LoRA weight (0 = base model, 1 = as trained).

    Returns:
        The new state dict; changed weights keep their dtype.
    """
    new = dict(state)
    for module, name in targets.items():
        if name + DOWN not in tensors:
            continue
        key = f"{module}.weight"
        if key not in state:
            raise KeyError(f"`{key}` (LoRA `{name}`) is not in `state`")
        alpha = float(tensors[name + ALPHA]) if name + ALPHA in tensors else float(tensors[name + DOWN].shape[0])
        delta = merge_layer(tensors[name + UP], tensors[name + DOWN], alpha)
        weight = state[key]
        if delta.shape != weight.shape:
            raise ValueError(f"LoRA `{name}` gives shape {tuple(delta.shape)}, `{key}` is {tuple(weight.shape)}")
        new[key] = (weight.float() + scale * delta.to(weight.device)).to(weight.dtype)
    return new


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _metadata_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    return str(value)


def lora_metadata(
    arch: Literal["sd15", "sdxl"],
    dim: int | str,
    alpha: float | str,
    **training: Any,
) -> dict[str, str]:
    """kohya's `ss_*` metadata for a LoRA file (read by A1111, ComfyUI and LoRA browsers).

    Args:
        arch: `sd15` or `sdxl`; sets `ss_base_model_version`.
        dim: the network rank, or a word such as `Dynamic` when ranks differ per layer.
        alpha: the network alpha, or a word such as `Dynamic`.
        training: further metadata, e.g. `ss_learning_rate=1e-6`; each key must start with
            `ss_` (or `sshs_`); values are stringified, dicts and lists as JSON.
    """
    if arch not in BASE_MODEL_VERSION:
        raise ValueError(f"`arch` must be one of {', '.join(BASE_MODEL_VERSION)}, got {arch!r}")
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": _metadata_value(dim),
        "ss_network_alpha": _metadata_value(alpha),
        "ss_base_model_version": BASE_MODEL_VERSION[arch],
        "ss_v2": "False",
    }
    for key, value in training.items():
        if not key.startswith(("ss_", "sshs_")):
            raise ValueError(f"metadata key `{key}` must start with `ss_` or `sshs_`")
        meta[key] = _metadata_value(value)
    return meta


MODELSPEC_ARCH = {"sd15": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}
MODELSPEC_IMPL = {"sd15": "diffusers", "sdxl": "https://github.com/Stability-AI/generative-models"}
MODELSPEC_RESOLUTION = {"sd15": "512x512", "sdxl": "1024x1024"}


def modelspec_metadata(
    arch: Literal["sd15", "sdxl"], title: str, date: str | None = None, **extra: str
) -> dict[str, str]:
    """Stability's ModelSpec 1.0 keys (`modelspec.*`), as kohya's `sai_model_spec.py` writes them for LoRAs.

    Args:
        arch: `sd15` or `sdxl`; sets architecture, implementation and resolution.
        title: `modelspec.title` (kohya uses the output file's stem).
        date: ISO 8601 date-time; None means now (UTC, seconds).
        extra: further `modelspec.*` fields without the prefix, e.g. `description="..."`.
    """
    import datetime

    if arch not in MODELSPEC_ARCH:
        raise ValueError(f"`arch` must be one of {', '.join(MODELSPEC_ARCH)}, got {arch!r}")
    date = date or datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCH[arch],
        "modelspec.implementation": MODELSPEC_IMPL[arch],
        "modelspec.title": title,
        "modelspec.resolution": MODELSPEC_RESOLUTION[arch],
        "modelspec.prediction_type": "epsilon",
        "modelspec.date": date,
    }
    meta.update({f"modelspec.{k}": str(v) for k, v in extra.items()})
    return meta


def sshs_hashes(path: Path) -> tuple[str, str]:
    """kohya's `sshs_model_hash` and `sshs_legacy_hash` of a safetensors file (sd-webui-additional-networks).

    The model hash is the SHA-256 of everything after the header (the tensor bytes), so it does not
    depend on the metadata; the legacy hash is the first 8 hex digits of the SHA-256 of the 64 KiB
    at offset 1 MiB of the file (header included). kohya computes both on the file with only its
    `ss_*` metadata; `save_lora` does the same.

    Args:
        path: a `.safetensors` file.
    """
    import hashlib

    model, legacy = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        f.seek(8 + header_len)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            model.update(chunk)
        f.seek(0x100000)
        legacy.update(f.read(0x10000))
    return model.hexdigest(), legacy.hexdigest()[:8]


def save_lora(path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str], hashes: bool = True) -> Path:
    """Write a LoRA as safetensors, atomically (temp file in the same folder, fsync, rename).

    Args:
        path: destination file (`.safetensors`); its folder is created if needed.
        tensors: the LoRA state dict; saved contiguous, on CPU, in the dtypes given.
        metadata: string → string header metadata (see `lora_metadata`, `modelspec_metadata`).
        hashes: add kohya's `sshs_model_hash` / `sshs_legacy_hash`, computed as kohya does on the
            file holding only the `ss_*` metadata (so the file is written twice; the model hash
            covers the tensor bytes only, the legacy hash also sees that header).

    Returns:
        `path`.
    """
    from safetensors.torch import save_file

    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"`metadata` values must be strings; not so for {', '.join(map(str, bad))}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if hashes:  # as kohya: hashed over the file with only the `ss_*` metadata
            save_file(plain, str(tmp), metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
            model_hash, legacy_hash = sshs_hashes(tmp)
            metadata = {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}
        save_file(plain, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_lora(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a safetensors LoRA: (tensors on CPU, header metadata — empty if none).

    Args:
        path: the `.safetensors` file.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = dict(f.metadata() or {})
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    return tensors, metadata
