"""extract: a LoRA per saved epoch from the truncated SVD of (finetuned − base).

The 001 guide's core step: extract at a high dim (512), then resize. Weights stream one layer at
a time from both checkpoints (`safetensors.safe_open`), so two whole models are never in memory.
A text encoder whose largest change stays under `min_diff` is left out, with a log line and a
metadata entry (the guide warns kohya's default 0.01 silently drops them).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

from pydantic import Field

from loraforge.params import ModelParams, section

if TYPE_CHECKING:
    import torch

    from loraforge.runner import Paths, StageEnv

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
PREFIXES = {
    "sd15": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}


@section
class Params:
    """The `extract` section.

    Attributes:
        dim: rank of each extracted layer (capped by the layer's size); the 001 guide: 512.
        conv_dim: rank for 3×3 convolutions of the UNet's ResNet blocks; 0 leaves them out.
        clamp_quantile: clamp the factors at this quantile of their absolute values; 1 = no clamp (the guide).
        min_diff: a text encoder whose largest |finetuned − base| is below this is left out.
        save_dtype: dtype of the saved LoRA.
    """

    model: ModelParams
    dim: int = Field(128, ge=1)
    conv_dim: int = Field(0, ge=0)
    clamp_quantile: float = Field(1.0, gt=0, le=1)
    min_diff: float = Field(1e-6, ge=0)
    save_dtype: Literal["float32", "float16", "bfloat16"] = "float16"


@contextlib.contextmanager
def open_weights(files: list[Path]) -> Iterator[Any]:
    """A `get(key) -> Tensor` reader over one or more safetensors files (sharded checkpoints)."""
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        index = {}
        for path in files:
            handle = stack.enter_context(safe_open(str(path), framework="pt"))
            index.update({key: handle for key in handle.keys()})

        def get(key: str) -> "torch.Tensor":
            return index[key].get_tensor(key)

        get.keys = list(index)  # type: ignore[attr-defined]
        yield get


def extract_component(component: str, prefix: str, base_files: list[Path], tuned_file: Path, params: Params, device: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """LoRA tensors for one component (SVDs on `device`), and a note of what was decided."""
    import torch

    from loraforge.lora import extract_lora, kohya_names, max_abs_delta, text_encoder_changed, text_encoder_targets, unet_targets

    with open_weights(base_files) as base, open_weights([tuned_file]) as tuned:
        if component == "unet":
            modules = unet_targets(tuned.keys, conv=params.conv_dim > 0)
        else:
            modules = text_encoder_targets(tuned.keys)
            diff = max_abs_delta(base, tuned, [f"{m}.weight" for m in modules])
            if not text_encoder_changed(diff, params.min_diff):
                print(f"extract: {component} left out: its largest change {diff:.3g} is below `extract.min_diff` {params.min_diff:g}")
                return {}, {"included": False, "max_diff": diff}
            print(f"extract: {component} included: largest change {diff:.3g} ≥ `extract.min_diff` {params.min_diff:g}")
        targets = kohya_names(prefix, modules)
        tensors = extract_lora(base, tuned, targets, dim=params.dim, conv_dim=params.conv_dim,
                               clamp_quantile=params.clamp_quantile, dtype=getattr(torch, params.save_dtype), device=device)
    note = {"included": True, "modules": len(modules)}
    if component != "unet":
        note["max_diff"] = diff
    return tensors, note


def run(params: Params, inputs: "Paths", outputs: "Paths", env: "StageEnv") -> dict[str, Any]:
    """One `lora-epoch-NNNN.safetensors` per checkpoint folder into `outputs.loras`."""
    from loraforge.lora import lora_metadata, save_lora
    from loraforge.models import resolve_device, resolve_model, weight_files

    info = resolve_model(params.model, env.state_dir)
    device = resolve_device(params.model.device)
    epochs = sorted(p for p in inputs.checkpoints.glob("epoch-*") if p.is_dir())
    if not epochs:
        raise FileNotFoundError(f"no epoch-* checkpoint folders in {inputs.checkpoints}")
    per_epoch = {}
    for folder in epochs:
        meta = json.loads((folder / "meta.json").read_text())
        tensors, notes = {}, {}
        for component, prefix in PREFIXES[info.arch].items():
            tuned = folder / f"{component}.safetensors"
            if not tuned.exists():
                notes[component] = {"included": False, "reason": "not trained"}
                continue
            part, notes[component] = extract_component(component, prefix, weight_files(info, component), tuned, params, device)
            tensors.update(part)
        metadata = lora_metadata(info.arch, dim=params.dim, alpha=params.dim, ss_epoch=meta["epoch"], ss_steps=meta["global_step"],
                                 ss_sd_model_name=info.source, ss_text_encoders=json.dumps({k: v["included"] for k, v in notes.items() if k != "unet"}),
                                 ss_training_comment=f"extracted by loraforge at dim {params.dim}, clamp {params.clamp_quantile}, min_diff {params.min_diff:g}")
        save_lora(outputs.loras / f"lora-{folder.name}.safetensors", tensors, metadata)
        per_epoch[folder.name] = {"layers": sum(1 for k in tensors if k.endswith(".alpha")), "components": notes}
    return {"items": len(epochs), "computed": len(epochs), "reused": 0, "dim": params.dim, "epochs": per_epoch}
