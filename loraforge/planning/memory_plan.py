"""The `memory` part of `loraforge plan`: the finetune params as a `loraforge.planning.memory.Setup`, the
model's architecture, the largest bucket; the breakdown table and the "will it fit" verdict.

GB here is GiB (2³⁰ bytes), as nvidia-smi and torch count: a "24 GB" card has 24 GiB. The CUDA
caching allocator fragments a few % on top, so a margin under `TIGHT_SHARE` of the card is "tight".
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from loraforge.planning.memory import GIB, PERSISTENT, Architecture, Setup, combined, estimate, peak, phases, savings
from loraforge.training.optimizers import ADAPTIVE  # one step size d: text-encoder LRs default to lr, not lr / 4

if TYPE_CHECKING:
    from stages.finetune_params import Params as FinetuneParams

TIGHT_SHARE = 0.05
ENCODERS = ("text_encoder", "text_encoder_2")


def trained_components(ft: FinetuneParams, arch: str) -> tuple[str, ...]:
    """The UNet, and each text encoder whose LR is above 0 (as `stages.finetune.component_lrs` decides).

    Args:
        ft: the finetune params.
        arch: `sd15` or `sdxl`.
    """
    if not ft.train_text_encoder:
        return ("unet",)
    te1 = ft.text_encoder_lr if ft.text_encoder_lr is not None else ft.lr / (1 if ft.optimizer in ADAPTIVE else 4)
    te2 = ft.text_encoder_2_lr if ft.text_encoder_2_lr is not None else te1
    lrs = (te1, te2) if arch == "sdxl" else (te1,)
    return ("unet", *(name for name, lr in zip(ENCODERS, lrs) if lr > 0))


def setup_from_params(ft: FinetuneParams, arch: str, bucket: tuple[int, int], device: str = "cuda") -> Setup:
    """The memory-relevant settings of a finetune run, as stages/finetune.py trains it.

    Args:
        ft: the finetune params.
        arch: `sd15` or `sdxl`.
        bucket: the largest bucket (width, height) in pixels.
        device: `cuda` or `cpu`.
    """
    trained = trained_components(ft, arch)
    randomised = bool(
        ft.shuffle_caption
        or ft.caption_tag_dropout_rate
        or ft.caption_dropout_rate
        or ft.caption_dropout_every_n_epochs
    )
    return Setup(
        mode=ft.mode,
        optimizer=ft.optimizer,
        optimizer_args=dict(ft.optimizer_args),
        mixed_precision=ft.mixed_precision,
        gradient_checkpointing=ft.gradient_checkpointing,
        batch_size=ft.batch_size,
        accumulation=ft.gradient_accumulation,
        latent=(bucket[1] // 8, bucket[0] // 8),
        trained=trained,
        ema=ft.ema_decay > 0,
        text_cached=trained == ("unet",) and not randomised,
        conv_lora=ft.conv_dim > 0,
        forward_passes=2 if (ft.class_prompt or ft.reg_images) else 1,  # the class batch's graph is alive too
        processes=ft.num_processes,
        device="cpu" if device == "cpu" else "cuda",
        fused_backward=ft.fused_backward,
        weights_dtype=ft.weights_dtype,
    )


def largest_bucket(
    root: Path, resolution: int, step: int, min_side: int | None, max_side: int | None
) -> tuple[int, int]:
    """The largest-area bucket (width, height) in pixels: from the latents manifest when the
    latents stage has run, else the largest the bucket grid allows.

    Args:
        root: the project root.
        resolution: the bucket resolution (area = resolution²).
        step: `latents.bucket_step`.
        min_side: `latents.min_bucket`.
        max_side: `latents.max_bucket`.
    """
    from loraforge.data.buckets import BucketGrid

    manifest = root / "data" / "latents" / "manifest.jsonl"
    if manifest.is_file():
        rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]
        if rows:
            w, h = max((tuple(r["bucket"]) for r in rows), key=_area_then_square)
            return int(w), int(h)
    buckets = BucketGrid.resolve(resolution, step, min_side, max_side).buckets()
    return max(buckets, key=_area_then_square) if buckets else (resolution, resolution)


def _area_then_square(bucket: tuple[int, int]) -> tuple[int, int]:
    return bucket[0] * bucket[1], -abs(bucket[0] - bucket[1])


def verdict(model: Architecture, s: Setup, vram_gb: float) -> str:
    """ "fits in 24 GB with 3.1 GB to spare", or what it needs and the biggest savings.

    Args:
        model: the architecture.
        s: the training setup.
        vram_gb: the card's memory in GB (GiB).
    """
    if not vram_gb > 0:
        raise ValueError(f"`--vram` must be > 0, got {vram_gb:g}")
    need = peak(estimate(model, s), s) / GIB
    if need <= vram_gb:
        tight = ", tight: allocator fragmentation can take a few %" if vram_gb - need < TIGHT_SHARE * vram_gb else ""
        return f"fits in {vram_gb:g} GB with {vram_gb - need:.1f} GB to spare{tight}"
    text = f"needs ~{need:.1f} GB: does not fit in {vram_gb:g} GB"
    if found := savings(model, s):
        text += "; biggest savings: " + ", ".join(f"{label} −{saved / GIB:.1f} GB" for label, saved in found[:4])
        if (together := combined(model, s) / GIB) < need:
            text += f"; checkpointing, 8-bit/Adafactor, cached text and bf16 together: ~{together:.1f} GB"
    return text


def memory_report(model: Architecture, s: Setup, vram_gb: float | None, bucket: tuple[int, int]) -> dict[str, Any]:
    """The `memory` section of reports/plan.json.

    Args:
        model: the architecture.
        s: the training setup.
        vram_gb: the card's memory in GB, or None (no verdict).
        bucket: the largest bucket (width, height) in pixels.
    """
    terms = estimate(model, s)
    top = peak(terms, s)
    report: dict[str, Any] = {
        "arch": model.arch,
        "largest_bucket": list(bucket),
        "params": {name: c.params.numel for name, c in model.components.items()},
        "setup": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(s).items()},
        "terms_bytes": terms,
        "phases_bytes": phases(terms, s),
        "peak_bytes": top,
        "peak_gb": round(top / GIB, 2),
        "savings_gb": [[label, round(saved / GIB, 2)] for label, saved in savings(model, s)],  # largest first
    }
    if vram_gb is not None:
        report.update(vram_gb=vram_gb, fits=top <= vram_gb * GIB, verdict=verdict(model, s, vram_gb))
    return report


def format_memory(report: Mapping[str, Any]) -> str:
    """The breakdown table (one line per term, in GB) and the verdict.

    Args:
        report: from `memory_report`.
    """
    terms = report["terms_bytes"]
    width = max(len(k) for k in terms)
    w, h = report["largest_bucket"]
    unit, size = ("GB", GIB) if report["peak_bytes"] >= GIB else ("MB", 2**20)  # tiny models: MB (MiB)
    lines = [
        f"[memory] {report['arch']}, largest bucket {w}x{h}; in {unit} ({unit[0]}iB); peak = persistent + largest phase"
    ]
    for name, value in terms.items():
        lines.append(f"  {name:<{width}}  {value / size:8.2f}  {'persistent' if name.startswith(PERSISTENT) else ''}")
    phase = ", ".join(f"{k} {v / size:.2f}" for k, v in report["phases_bytes"].items())
    lines.append(f"  {'peak':<{width}}  {report['peak_bytes'] / size:8.2f}  (phases: {phase})")
    if "verdict" in report:
        lines += [f"  {part}" for part in report["verdict"].split("; ")]
    return "\n".join(line.rstrip() for line in lines)


def project_memory(
    root: Path, ft: FinetuneParams, lat: Any, native: int, model_path: Path | None, arch: str, vram_gb: float | None
) -> dict[str, Any]:
    """The `memory` section for a project: its finetune and latents params, its model.

    Args:
        root: the project root (a latents manifest there gives the buckets).
        ft: the finetune params.
        lat: the latents params (resolution, bucket_step, min_bucket, max_bucket).
        native: the model's native resolution (the default bucket resolution).
        model_path: the model's local diffusers folder, or None for the reference `arch`.
        arch: `sd15` or `sdxl`.
        vram_gb: the card's memory in GB, or None.
    """
    from loraforge.planning.model_sizes import folder_architecture, reference_architecture

    if model_path is None:
        model = reference_architecture(arch, ft.network_dim, ft.conv_dim)
    else:
        model = folder_architecture(model_path, arch, ft.network_dim, ft.conv_dim)
    resolution = getattr(lat, "resolution", None) or native
    bucket = largest_bucket(root, resolution, lat.bucket_step, lat.min_bucket, lat.max_bucket)
    return memory_report(model, setup_from_params(ft, arch, bucket, ft.model.device), vram_gb, bucket)
