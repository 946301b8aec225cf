"""Exact resume: the full training state, saved with each checkpoint, outside the stage outputs.

The runner (like DVC) empties `models/checkpoints` before the stage runs, so the state lives
under `<state_dir>/resume/<fingerprint>/`, where the fingerprint covers every finetune param
except `resume` itself, the model's weight hashes and the training data. A changed param or
image gives a new fingerprint: a fresh run, never a wrong resume.

    resume/<fp>/checkpoints/epoch-NNNN/   the checkpoint as the stage ships it (hard-linked out)
    resume/<fp>/state-epoch-NNNN/         weights (float32), optimizer, LR schedule, EMA, grad
                                          scaler, RNG states, step, epoch, loss rows
Only the newest state is kept; each folder appears by rename, so a killed run leaves none half-written.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from loraforge.store.fingerprint import hash_json, hash_tree
from loraforge.models.loading import ModelInfo, component_hash
from loraforge.store.items import materialize
from loraforge.training.settings import ENCODER_NAMES
from loraforge.errors import Diverged

STATE_PREFIX = "state-epoch-"


def resume_folder(
    params: Mapping[str, Any],
    latents: Path,
    captions: Path,
    reg_images: Path | None,
    info: ModelInfo,
    state_dir: Path,
    validation_folder: Path | None = None,
) -> Path:
    """`<state_dir>/resume/<fingerprint>`: params (less `resume`), model weight hashes, training data.

    Args:
        params: the finetune params as a mapping (`dataclasses.asdict`).
        latents: the latents folder.
        captions: the captions folder.
        reg_images: the `finetune.reg_images` folder or None (its content counts, not just its path).
        info: the resolved model.
        state_dir: loraforge's private folder.
        validation_folder: the `finetune.validation_folder` folder or None (its content counts:
            the validation rows a state keeps were measured on it).
    """
    own = {k: v for k, v in params.items() if k != "resume"}
    models = {c: component_hash(info, c, state_dir) for c in ("unet", *ENCODER_NAMES) if (info.path / c).is_dir()}
    data = {"latents": hash_tree(latents), "captions": hash_tree(captions)}
    if reg_images is not None:
        data["reg_images"] = hash_tree(reg_images)
    if validation_folder is not None:
        data["validation_folder"] = hash_tree(validation_folder)
    return state_dir / "resume" / hash_json({"params": own, "models": models, "data": data, "version": 1})


def newest_state(folder: Path) -> Path | None:
    """The newest complete state folder under `folder`, or None."""
    states = sorted(folder.glob(f"{STATE_PREFIX}*")) if folder.is_dir() else []
    return states[-1] if states else None


def _atomic_dir(final: Path, fill: Any) -> None:
    """Build a folder with `fill(tmp)` next to `final`, then rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
    try:
        fill(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_state(
    folder: Path,
    epoch: int,
    trained: dict[str, torch.nn.Module],
    optimizer: Any,
    schedule: Any,
    ema: Any,
    scaler: Any,
    progress: dict[str, Any],
) -> Path:
    """Write `state-epoch-NNNN` and delete older states.

    Args:
        folder: the run's resume folder.
        epoch: the epoch just finished.
        trained: name -> unwrapped trained module (weights saved in float32).
        optimizer: the optimizer (its state_dict holds moments and, for Prodigy, d).
        schedule: the LR schedule.
        ema: the EMA or None.
        scaler: the fp16 grad scaler or None.
        progress: JSON-able loop state (global_step, epoch, loss rows, saved epochs).
    """

    def fill(tmp: Path) -> None:
        for name, module in trained.items():
            state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in module.state_dict().items()}
            if not all(torch.isfinite(v).all() for v in state.values()):
                raise Diverged(f"{name} has non-finite weights at epoch {epoch}; not saving a resume state")
            save_file(state, str(tmp / f"{name}.safetensors"))
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.to_save().items()}, str(tmp / "ema.safetensors"))
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(),
            },
            tmp / "training.pt",
        )
        (tmp / "progress.json").write_text(json.dumps(progress))

    final = folder / f"{STATE_PREFIX}{epoch:04d}"
    _atomic_dir(final, fill)
    for old in folder.glob(f"{STATE_PREFIX}*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(
    path: Path, trained: dict[str, torch.nn.Module], optimizer: Any, schedule: Any, ema: Any, scaler: Any
) -> dict[str, Any]:
    """Restore everything `save_state` wrote into the live objects; returns the loop progress.

    Args:
        path: a `state-epoch-NNNN` folder.
        trained: name -> unwrapped trained module.
        optimizer: the optimizer (same groups as when saved).
        schedule: the LR schedule.
        ema: the EMA or None.
        scaler: the grad scaler or None.
    """
    for name, module in trained.items():
        module.load_state_dict(load_file(str(path / f"{name}.safetensors")))
    if ema is not None:
        ema.load(load_file(str(path / "ema.safetensors")))
    blob = torch.load(path / "training.pt", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    schedule.load_state_dict(blob["schedule"])
    if scaler is not None and blob["scaler"] is not None:
        scaler.load_state_dict(blob["scaler"])
    torch.set_rng_state(blob["torch_rng"])
    random.setstate(blob["python_rng"])
    return json.loads((path / "progress.json").read_text())


def publish_checkpoint(built: Path, outputs: Path) -> None:
    """Hard-link a checkpoint folder kept in the resume folder into the stage's outputs."""
    for file in sorted(built.rglob("*")):
        if file.is_file():
            materialize(file, outputs / built.name / file.relative_to(built))


def restore(
    keep: Path | None,
    trained: dict[str, torch.nn.Module],
    optimizer: Any,
    schedule: Any,
    ema: Any,
    scaler: Any,
    outputs: Path,
) -> dict[str, Any]:
    """The loop's progress: from the newest state in `keep` (its weights, optimizer, schedule, EMA,
    scaler and RNG restored in place, its checkpoints hard-linked back into `outputs`), else fresh.

    Args:
        keep: the run's resume folder, or None (`finetune.resume: off`).
        trained: name -> unwrapped trained module.
        optimizer: the optimizer.
        schedule: the LR schedule.
        ema: the EMA or None.
        scaler: the fp16 grad scaler or None.
        outputs: the stage's checkpoints folder.
    """
    progress: dict[str, Any] = {"global_step": 0, "epoch": 0, "steps": [], "lrs": [], "epochs": [], "saved": []}
    if keep is not None and (state := newest_state(keep)) is not None:
        progress = load_state(state, trained, optimizer, schedule, ema, scaler)
        for name in progress["saved"]:
            publish_checkpoint(keep / "checkpoints" / name, outputs)
        print(f"finetune: resumed from {state.name} (step {progress['global_step']})")
    return progress
