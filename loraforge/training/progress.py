"""The loop's progress: the step count, the loss and LR rows of every step (`steps.tsv`,
`lr.tsv`), the mean loss per epoch (`epochs.tsv`), the saved epochs, and the stage's report.

`progress` is a plain JSON-able dict (the resume state saves it as is): `global_step`, `epoch`,
`steps`, `lrs`, `epochs`, `saved`, and `validation` (rows of `validation.tsv`) once there is one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object

from loraforge.training.checkpoints import states_hash
from loraforge.training.fsdp import full_states
from loraforge.training.setup import Training


def record_step(
    progress: dict[str, Any], epoch: int, loss: float, applied: dict[str, float], norms: dict[str, float]
) -> None:
    """Count the step and add its rows to `steps.tsv` and `lr.tsv`.

    Args:
        progress: the loop's progress.
        epoch: 1-based epoch.
        loss: the step's loss.
        applied: the LR each param group applied (`applied_lrs`).
        norms: the LoRA max-norm figures of the last optimizer step (with `scale_weight_norms`).
    """
    progress["global_step"] += 1
    step = progress["global_step"]
    progress["steps"].append({"step": step, "epoch": epoch, "loss": loss, "lr": applied["unet"], **norms})
    progress["lrs"].append({"step": step, **applied})


def record_epoch(progress: dict[str, Any], epoch: int, losses: list[float]) -> None:
    """Finish the epoch: its mean loss joins `epochs.tsv` and it becomes the progress's last epoch.

    Args:
        progress: the loop's progress.
        epoch: 1-based epoch.
        losses: the loss of each of its steps (this process's).
    """
    progress["epochs"].append({"epoch": epoch, "loss": sum(losses) / len(losses)})
    progress["epoch"] = epoch


def write_tables(folder: Path, progress: dict[str, Any]) -> None:
    """`steps.tsv` (loss, LR and LoRA norms per step), `lr.tsv` (each group's applied LR per step)
    `epochs.tsv` (mean loss per epoch) and, with validation on, `validation.tsv` (validation and
    train loss per saved epoch).

    Args:
        folder: the stage's loss folder.
        progress: the loop's progress (its `steps`, `lrs`, `epochs` and `validation` rows).
    """
    write_tsv(folder / "steps.tsv", progress["steps"])
    write_tsv(folder / "lr.tsv", progress["lrs"])
    write_tsv(folder / "epochs.tsv", progress["epochs"])
    if progress.get("validation"):
        write_tsv(folder / "validation.tsv", progress["validation"])


def write_tsv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Tab-separated table with a header row (DVC plots read it).

    Args:
        path: the file (parents created).
        rows: dicts with the same keys.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    header = list(rows[0]) if rows else []
    lines = ["\t".join(header)] + [
        "\t".join(f"{r[h]:.6g}" if isinstance(r[h], float) else str(r[h]) for h in header) for r in rows
    ]
    path.write_text("\n".join(lines) + "\n")


def summary(
    t: Training,
    plan: dict[str, Any],
    progress: dict[str, Any],
    class_images: int,
    reg_encoded: int,
    mixed_precision: str,
    optimizer: str,
    save_dtype: torch.dtype,
) -> dict[str, Any]:
    """The finetune stage's report (`reports/finetune.json`). With several processes (a collective:
        every process calls it) `weights_xxh3` lists each process's final-weights hash by global rank
    (under FSDP, of the full weights it gathered).

        Args:
            t: the model and what trained.
            plan: the steps plan (`loraforge.training.data.plan`).
            progress: the loop's progress (loss rows, saved epochs).
            class_images: prior preservation's class examples (0: off).
            reg_encoded: reg images VAE-encoded by this run (the rest came from the store).
            mixed_precision: `finetune.mixed_precision`.
            optimizer: `finetune.optimizer`.
            save_dtype: the checkpoints' dtype (mode full: the hash equals `states_hash` of the saved files).
    """
    hashes = held = None
    if t.accelerator.num_processes > 1:
        held = gather_object(
            [held_parameters(t.trained)]
        )  # FSDP: each process its shard; DDP: all  # data parallel: every process must end with the same weights
        states = (
            full_states(t.trained, everywhere=True) if t.fsdp else {n: m.state_dict() for n, m in t.trained.items()}
        )
        hashes = gather_object([states_hash(states, save_dtype)])
    return {
        "items": plan["images"],
        "computed": plan["images"],
        "reused": 0,
        "plan": plan,
        "epochs_saved": progress["saved"],
        "loss_first_epoch": progress["epochs"][0]["loss"],
        "loss_last_epoch": progress["epochs"][-1]["loss"],
        "validation": progress.get("validation", []),
        "device": str(t.accelerator.device),
        "mixed_precision": mixed_precision,
        "optimizer": optimizer,
        "loss_scale": t.precision.loss_scale,
        "skipped_steps": t.precision.skipped,
        "trained": list(t.lrs),
        "ema": t.ema is not None,
        "class_images": {"count": class_images, "encoded": reg_encoded},
        "text_cache": {"hits": t.encode.hits, "misses": t.encode.misses} if hasattr(t.encode, "hits") else None,
        "final_lr": progress["lrs"][-1] if progress["lrs"] else {},
        "processes": t.accelerator.num_processes,
        "weights_xxh3": hashes,
        "fsdp": t.fsdp,
        "parameters_held": held,
        "optimizer_steps_taken": getattr(t.lr_schedule, "scheduler", t.lr_schedule).last_epoch,
    }


def held_parameters(trained: dict[str, torch.nn.Module]) -> int:
    """How many trained parameters (elements) this process holds: all of them under DDP, its
    shard's under FSDP (a DTensor's local part).

    Args:
        trained: component name -> module.
    """
    return sum(
        getattr(p, "to_local", lambda p=p: p)().numel()
        for m in trained.values()
        for p in m.parameters()
        if p.requires_grad
    )
