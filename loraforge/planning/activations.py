"""Activation memory of a training step: what autograd keeps from forward for backward, in bytes.

Pure arithmetic over the UNet's config.json (no torch). The UNet's forward is walked as units
(`unet_units`): each ResnetBlock2D, each BasicTransformerBlock, each Transformer2DModel's wrapper
(norm + projections), each down/upsampler conv and the output head, each at the latent cells of
its level (the largest bucket's latent h × w, halved per level). A unit keeps

    bytes = coefficient × channels × cells × batch

with the coefficients below, counted op by op over diffusers' blocks (PyTorch saves only what
backward needs; flash / memory-efficient SDPA keeps q, k, v, the output and a logsumexp, never a
tokens² attention matrix). Without checkpointing the UNet keeps every unit's bytes. With gradient
checkpointing (diffusers checkpoints each resnet and each transformer layer) those keep only their
float32 input (4 B × C_in × cells); wrappers and resamplers keep theirs, and backward recomputes
one unit at a time: + the largest unit. Backward also holds `GRADS_IN_FLIGHT` activation gradients
the size of the largest unit output.

Checked in tests/test_memory.py against the bytes autograd saves (saved-tensor hooks) on narrowed
SD1.5 and SDXL UNets in float32, and against peak RSS of real training steps on CPU. The "half"
coefficients follow CUDA's autocast policy (norms in float32); CPU autocast runs norms in bf16 and
saves less, so they are an upper bound there.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

CONTEXT_TOKENS = 77  # CLIP positions: the cross-attention context length
# ResnetBlock2D, per (input channel, output channel): x, norm1(x), silu(·), then h, norm2(h),
# silu(·): 3 + 3 float32 tensors = (12, 12) B. Autocast: the norms run in float32 and each conv
# saves a 2-byte copy of its input: (10, 10). Frozen convs (mode lora without conv_dim) save no
# input: (8, 8).
RESNET = {"fp32": (12, 12), "half": (10, 10), "frozen": (8, 8)}
# BasicTransformerBlock per token × channel: LN1 in/out, q, k, v, attention out, residual, LN2 out,
# q2, attention-2 out, residual, LN3 out (12 C), the GEGLU projection 8 C, gelu 4 C, product 4 C:
# 28 float32 tensors = 112 B. Autocast: float32 norms and residuals, 2-byte q/k/v plus one cast
# copy per projection input, the GEGLU in 2 bytes: 78 B.
TRANSFORMER = {"fp32": 112, "half": 78}
WRAPPER = {"fp32": 16, "half": 14}  # Transformer2DModel: group norm in/out, proj_in / proj_out inputs
RESAMPLE = {"fp32": 4, "half": 2, "frozen": 0}  # a Downsample2D / Upsample2D conv's input
OUT = {"fp32": 12, "half": 10, "frozen": 8}  # conv_norm_out in/out, conv_out's input
# CLIP encoder layer per token × hidden: LN1 in/out, q, k, v, attention out, residual, LN2 out
# (8 D), fc1 out, the activation's saved input/output and fc2's input (3 × 4 D): 20 float32 tensors.
CLIP_LAYER = 80
GRADS_IN_FLIGHT = 2


def _per_block(value: Any, n: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * n


def unet_units(config: Mapping[str, Any], h: int, w: int) -> list[tuple[str, int, int, int]]:
    """The UNet's forward as units (kind, channels in, channels out, latent cells), in order.

    Kinds: `resnet`, `transformer` (one BasicTransformerBlock), `wrapper` (a Transformer2DModel's
    norm and projections), `resample` (a down/upsampler conv, at its input's cells), `out`.

    Args:
        config: the UNet config (diffusers' UNet2DConditionModel layout).
        h: latent height of the input.
        w: latent width of the input.
    """
    boc = list(config["block_out_channels"])
    n = len(boc)
    lpb = _per_block(config.get("layers_per_block", 2), n)
    tlpb = _per_block(config.get("transformer_layers_per_block", 1), n)
    rev_tlpb = _per_block(config.get("reverse_transformer_layers_per_block") or tlpb[::-1], n)
    cells = [math.ceil(h / 2**i) * math.ceil(w / 2**i) for i in range(n)]
    units: list[tuple[str, int, int, int]] = []

    def attention(c: int, layers: int, level: int) -> None:
        units.append(("wrapper", c, c, cells[level]))
        units.extend(("transformer", c, c, cells[level]) for _ in range(layers))

    skips, c = [boc[0]], boc[0]  # conv_in's output is the first skip connection
    for i, kind in enumerate(config["down_block_types"]):
        for _ in range(lpb[i]):
            units.append(("resnet", c, boc[i], cells[i]))
            c = boc[i]
            if "CrossAttn" in kind:
                attention(c, tlpb[i], i)
            skips.append(c)
        if i < n - 1:
            units.append(("resample", c, c, cells[i]))
            skips.append(c)
    units.append(("resnet", c, c, cells[-1]))
    if "CrossAttn" in str(config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"):
        attention(c, tlpb[-1], n - 1)
    units.append(("resnet", c, c, cells[-1]))
    for i, kind in enumerate(config["up_block_types"]):
        level, out = n - 1 - i, boc[n - 1 - i]
        for _ in range(lpb[level] + 1):
            units.append(("resnet", c + skips.pop(), out, cells[level]))  # input: torch.cat with the skip
            c = out
            if "CrossAttn" in kind:
                attention(c, rev_tlpb[i], level)
        if level > 0:
            units.append(("resample", c, c, cells[level - 1]))  # nearest ×2, then the conv
    units.append(("out", c, c, cells[0]))
    return units


def unit_bytes(unit: tuple[str, int, int, int], half: bool, frozen_convs: bool, context_dim: int) -> int:
    """Activation bytes one unit keeps for one sample (the coefficients above).

    Args:
        unit: (kind, channels in, channels out, cells) from `unet_units`.
        half: autocast (fp16 / bf16) is on.
        frozen_convs: the convolutions are frozen (mode lora without conv_dim).
        context_dim: the cross-attention context width (`cross_attention_dim`).
    """
    kind, c_in, c_out, cells = unit
    prec = "half" if half else "fp32"
    conv = "frozen" if frozen_convs else prec
    if kind == "resnet":
        a, b = RESNET[conv]
        return (a * c_in + b * c_out) * cells
    if kind == "transformer":  # + K and V of the 77-token context (and, in half, cast copies of it)
        context = 2 * c_out * CONTEXT_TOKENS * (2 if half else 4) + (4 * CONTEXT_TOKENS * context_dim if half else 0)
        return TRANSFORMER[prec] * c_out * cells + context
    if kind == "wrapper":
        return WRAPPER[prec] * c_out * cells
    if kind == "resample":
        return RESAMPLE[conv] * c_in * cells
    return OUT[conv] * c_in * cells


def unet_activation_bytes(
    config: Mapping[str, Any],
    latent: tuple[int, int],
    batch: int,
    *,
    half: bool = False,
    checkpointing: bool = False,
    frozen_convs: bool = False,
    passes: int = 1,
) -> int:
    """Activation bytes of the UNet at a latent size (module docstring).

    Args:
        config: the UNet config.
        latent: (height, width) in latent cells (the largest bucket's pixels / 8).
        batch: samples per forward.
        half: autocast (fp16 / bf16) is on.
        checkpointing: gradient checkpointing is on.
        frozen_convs: the convolutions are frozen (mode lora without conv_dim).
        passes: forwards whose graphs are alive at backward (2 with prior preservation).
    """
    units = unet_units(config, *latent)
    context_dim = int(config.get("cross_attention_dim") or 0)
    full = [unit_bytes(u, half, frozen_convs, context_dim) for u in units]
    if checkpointing:
        stored = [4 * u[1] * u[3] if u[0] in ("resnet", "transformer") else b for u, b in zip(units, full, strict=True)]
        per_sample = sum(stored) * passes + max(full)
    else:
        per_sample = sum(full) * passes
    grads = GRADS_IN_FLIGHT * 4 * max(c_out * cells for _, _, c_out, cells in units)
    return (per_sample + grads) * batch


def text_activation_bytes(layers: int, width: int, batch: int, checkpointing: bool = False, passes: int = 1) -> int:
    """Activation bytes of a trained CLIP text encoder: layers × 77 tokens × hidden × `CLIP_LAYER`
    bytes, or with checkpointing each layer's float32 input plus one layer recomputed. loraforge
    encodes outside autocast (stages/finetune.py), so these are float32 whatever mixed_precision.

    Args:
        layers: encoder layers.
        width: hidden size.
        batch: captions per forward.
        checkpointing: gradient checkpointing is on.
        passes: forwards alive at backward.
    """
    layer = CLIP_LAYER * CONTEXT_TOKENS * width
    if checkpointing:
        return (4 * CONTEXT_TOKENS * width * layers * passes + layer) * batch
    return layer * layers * passes * batch
