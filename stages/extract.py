"""extract: a LoRA per saved epoch from the truncated SVD of (finetuned − base).

The 001 guide's core step: extract at a high dim (512), then resize. Weights stream one layer at
a time from both checkpoints (`safetensors.safe_open`), so two whole models are never in memory.
A text encoder whose largest change is not above `min_diff` is left out, with a log line and a
metadata entry `ss_min_diff` (the guide warns kohya's default 0.01 silently drops them). Names
follow kohya (SDXL UNet in sgm names); the header carries kohya's `ss_*` keys, `modelspec.*`,
`sshs_model_hash`, the dataset hash and the pipeline's git revision.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.extract_params import Params

if TYPE_CHECKING:
    import torch

    from loraforge.lora.extraction import ExtractSettings
    from loraforge.models.loading import ModelInfo
    from loraforge.pipeline.runner import Paths, StageEnv

# Components that can carry a LoRA, per architecture (kohya's prefixes are in loraforge.lora.format.PREFIXES).
PREFIXES = {
    "sd15": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}


def settings(params: Params) -> "ExtractSettings":
    """The library's extraction settings from the stage params."""
    from loraforge.lora.extraction import ExtractSettings

    return ExtractSettings(
        dim=params.dim,
        conv_dim=params.conv_dim,
        clamp_quantile=params.clamp_quantile,
        min_diff=params.min_diff,
        save_dtype=params.save_dtype,
        svd=params.svd,
    )


def weights_folder(folder: Path, meta: dict[str, Any], from_ema: bool) -> Path:
    """Where an epoch's weights are: the checkpoint folder, or its `ema/` (refused when no EMA was kept)."""
    if not from_ema:
        return folder
    if not meta.get("ema"):
        raise ValueError(
            f"`extract.from_ema` is set but {folder} has no EMA weights: set `finetune.ema_decay` > 0 and retrain"
        )
    return folder / "ema"


def dataset_hash(meta: dict[str, Any], inputs: "Paths") -> str:
    """The dataset's hash: the checkpoint's own record, else a hash of the `latents`/`captions` inputs if given."""
    if meta.get("dataset_hash"):
        return str(meta["dataset_hash"])
    from loraforge.store.fingerprint import hash_tree

    given = [inputs[name] for name in ("latents", "captions") if name in inputs]
    return "+".join(hash_tree(path) for path in given) if given else "unknown"


def extract_epoch(
    info: "ModelInfo", weights: Path, params: Params, device: "torch.device", unet_config: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The LoRA tensors of one epoch's checkpoint, and a note per component of what was decided.

    Args:
        info: the resolved base model.
        weights: the epoch's weights folder (`<component>.safetensors` for each trained component).
        params: the `extract` section.
        device: where the SVDs run.
        unet_config: the base UNet's config.json contents (SDXL sgm numbering).
    """
    from loraforge.lora.extraction import extract_component
    from loraforge.models.loading import weight_files

    tensors: dict[str, Any] = {}
    notes: dict[str, dict[str, Any]] = {}
    for component in PREFIXES[info.arch]:
        tuned = weights / f"{component}.safetensors"
        if not tuned.exists():
            notes[component] = {"included": False, "reason": "not trained"}
            continue
        part, notes[component] = extract_component(
            info.arch,
            component,
            weight_files(info, component),
            [tuned],
            settings(params),
            device,
            unet_config=unet_config,
        )
        tensors.update(part)
    return tensors, notes


def run(params: Params, inputs: "Paths", outputs: "Paths", env: "StageEnv") -> dict[str, Any]:
    """One `lora-epoch-NNNN.safetensors` per checkpoint folder into `outputs.loras`."""
    from loraforge.lora.format import save_lora
    from loraforge.lora.extraction import extraction_metadata, git_commit_date, git_revision
    from loraforge.models.loading import resolve_device, resolve_model

    info = resolve_model(params.model, env.state_dir)
    device = resolve_device(params.model.device)
    unet_config = json.loads((info.path / "unet" / "config.json").read_text(encoding="utf-8"))
    revision, date = git_revision(env.state_dir.parent), git_commit_date(env.state_dir.parent)
    epochs = sorted(p for p in inputs.checkpoints.glob("epoch-*") if p.is_dir())
    if not epochs:
        raise FileNotFoundError(f"no epoch-* checkpoint folders in {inputs.checkpoints}")
    per_epoch = {}
    for folder in epochs:
        meta = json.loads((folder / "meta.json").read_text())
        weights = weights_folder(folder, meta, params.from_ema)
        if meta.get("mode") == "lora":  # trained as a LoRA already: pass it through, resize still applies
            shutil.copyfile(weights / "lora.safetensors", outputs.loras / f"lora-{folder.name}.safetensors")
            per_epoch[folder.name] = {"passed_through": True, "ema": params.from_ema}
            continue
        tensors, notes = extract_epoch(info, weights, params, device, unet_config)
        name = f"lora-{folder.name}"
        training = {k: v for k, v in meta.items() if k not in ("epoch", "global_step", "dataset_hash")}
        metadata = extraction_metadata(
            info.arch,
            name,
            settings(params),
            notes,
            info.source,
            date=date,
            ss_epoch=meta["epoch"],
            ss_steps=meta["global_step"],
            ss_dataset_hash=dataset_hash(meta, inputs),
            ss_loraforge_revision=revision,
            ss_training_params=training,
        )
        save_lora(outputs.loras / f"{name}.safetensors", tensors, metadata)
        per_epoch[folder.name] = {"layers": sum(1 for k in tensors if k.endswith(".alpha")), "components": notes}
    return {
        "items": len(epochs),
        "computed": len(epochs),
        "reused": 0,
        "dim": params.dim,
        "svd": params.svd,
        "from_ema": params.from_ema,  # evaluate ranks the epochs by the EMA weights' validation loss then
        "revision": revision,
        "epochs": per_epoch,
    }
