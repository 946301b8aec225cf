"""kohya-format LoRA files: which layers carry a LoRA, their names, header metadata, save and load.

The pipeline makes its LoRA the way the practitioners' guides do: full finetune, then extract a
LoRA from the weight difference (truncated SVD, `loraforge.lora.svd`), then resize it to a small
rank (SVD again, `loraforge.lora.resize`). This module holds what those share with training and
evaluation: the names, the format, and applying a LoRA to weights.

Conventions, shared with kohya sd-scripts, diffusers, ComfyUI and A1111:

- A LoRA on a weight W of shape (out, in) is a pair `down` (rank, in) and `up` (out, rank) with
  a scalar `alpha`; the layer becomes W + (alpha / rank) · up @ down. For a convolution with
  weight (out, in, kh, kw), `down` is (rank, in, kh, kw) and `up` is (out, rank, 1, 1).
- Keys in a file are `<kohya name>.lora_down.weight`, `<kohya name>.lora_up.weight` and
  `<kohya name>.alpha`, where the kohya name is a prefix (`lora_unet`, `lora_te`, `lora_te1`,
  `lora_te2`) and the module name with `.` replaced by `_`. UNet modules are named as kohya names
  them: diffusers names for SD1.5, the original Stability ("sgm") names for SDXL
  (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`); see `lora_targets` and
  `loraforge.models.kohya_names`.
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
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

from torch import Tensor

from loraforge.models.kohya_names import (
    KOHYA_UNET_NAMING,
    Prefix,
    kohya_names,
    kohya_unet_names,
    layout_from_config,
    layout_from_keys,
    text_encoder_targets,
    unet_targets,
)
from loraforge.models.safetensors_io import save_tensors

DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"

BASE_MODEL_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}


# --------------------------------------------------------------------------------------------
# Which weights get a LoRA, and their names (the rules are in loraforge.models.kohya_names)
# --------------------------------------------------------------------------------------------

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
# Layers of a LoRA state dict, and applying them to weights (tests, evaluation without peft)
# --------------------------------------------------------------------------------------------


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


def flatten_weight(weight: Tensor) -> Tensor:
    """A Linear (out, in) or conv (out, in, kh, kw) weight as a matrix (out, in*kh*kw).

    Args:
        weight: a 2-D or 4-D weight (or LoRA factor).
    """
    if weight.dim() == 2:
        return weight
    if weight.dim() == 4:
        return weight.flatten(1)
    raise ValueError(f"expected a 2-D or 4-D weight, got shape {tuple(weight.shape)}")


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
    delta = flatten_weight(up).float() @ flatten_weight(down).float()  # (out, in_flat)
    delta = delta * (float(alpha) / rank)
    return delta.reshape(up.shape[0], *down.shape[1:])


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
            save_tensors(plain, tmp, {k: v for k, v in metadata.items() if k.startswith("ss_")})
            model_hash, legacy_hash = sshs_hashes(tmp)
            metadata = {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}
        save_tensors(plain, tmp, metadata)  # sorted header: same tensors, same bytes
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
