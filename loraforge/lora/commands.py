"""Standalone LoRA commands, outside the pipeline: `loraforge extract` and `loraforge resize`.

    loraforge extract --base A --tuned B --out X.safetensors [--dim 128] [--conv-dim 0] [--svd lowrank] ...
    loraforge resize IN.safetensors --rank 16 [--method sv_fro --param 0.9] --out Y.safetensors

`--base` / `--tuned` are diffusers folders (unet/, text_encoder/, text_encoder_2/; safetensors,
sharded or not) or single `.safetensors` files holding a diffusers-named UNet state dict (like
`models/checkpoints/epoch-N/unet.safetensors`). `cli.py` wires these in with
`add_extract_command(subparsers)` and `add_resize_command(subparsers)`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# Spelled here, not imported from loraforge.lora.svd / lora_resize, so that building the CLI parser
# never imports torch (tests/test_extract_resize.py checks they match the library's).
SVD_METHODS = ("full", "lowrank")
RESIZE_METHODS = ("fixed", "sv_ratio", "sv_fro", "sv_cumulative")
DTYPES = ("float32", "float16", "bfloat16")


def add_extract_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add `extract` to an argparse sub-parser set; the parsed args' `func` runs it.

    Args:
        subparsers: what `ArgumentParser.add_subparsers()` returned.
    """
    p = subparsers.add_parser(
        "extract",
        help="extract a kohya-format LoRA from two checkpoints (tuned − base)",
        description="LoRA = truncated SVD of (tuned − base), streamed one layer at a time.",
    )
    p.add_argument("--base", type=Path, required=True, help="base model: diffusers folder or UNet .safetensors")
    p.add_argument("--tuned", type=Path, required=True, help="finetuned model: diffusers folder or UNet .safetensors")
    p.add_argument("--out", type=Path, required=True, help="the LoRA file to write (.safetensors)")
    p.add_argument("--dim", type=int, default=128, help="rank of Linear / 1×1 layers (default 128)")
    p.add_argument("--conv-dim", type=int, default=0, help="rank of 3×3 convs; 0 leaves them out (default)")
    p.add_argument(
        "--clamp-quantile", type=float, default=1.0, help="clamp factors at this quantile of |values|; 1 = off"
    )
    p.add_argument(
        "--min-diff", type=float, default=1e-6, help="leave out a text encoder whose largest change is not above this"
    )
    p.add_argument(
        "--svd",
        choices=SVD_METHODS,
        default="full",
        help="full (exact, default) or lowrank (randomised: ≥5× faster at dim 128 on SDXL, error within 0.2%%)",
    )
    p.add_argument("--save-dtype", choices=DTYPES, default="float16")
    p.add_argument(
        "--arch", choices=("auto", "sd15", "sdxl"), default="auto", help="naming convention (auto: from the weights)"
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the SVDs run")
    p.set_defaults(func=cmd_extract)
    return p


def add_resize_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add `resize` to an argparse sub-parser set; the parsed args' `func` runs it.

    Args:
        subparsers: what `ArgumentParser.add_subparsers()` returned.
    """
    p = subparsers.add_parser("resize", help="reduce a kohya-format LoRA to a smaller (or per-layer dynamic) rank")
    p.add_argument("lora", type=Path, help="the LoRA to resize (.safetensors, kohya format)")
    p.add_argument("--rank", type=int, required=True, help="the rank (fixed), or the cap of a dynamic method")
    p.add_argument("--method", choices=RESIZE_METHODS, default="fixed")
    p.add_argument("--param", type=float, default=None, help="sv_ratio: ≥ 1; sv_fro / sv_cumulative: in (0, 1]")
    p.add_argument("--out", type=Path, required=True, help="the LoRA file to write (.safetensors)")
    p.add_argument(
        "--save-dtype", choices=("keep", *DTYPES), default="keep", help="dtype of the factors (default: as the input)"
    )
    p.add_argument("--report", type=Path, default=None, help="also write the per-layer table as JSON here")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the SVDs run")
    p.set_defaults(func=cmd_resize)
    return p


def _device(setting: str) -> str:
    import torch

    if setting == "cuda" and not torch.cuda.is_available():
        raise SystemExit("loraforge: `--device cuda` but CUDA is not available")
    return "cuda" if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()) else "cpu"


def cmd_extract(args: argparse.Namespace) -> int:
    """Run `loraforge extract` (see `add_extract_command`)."""
    from loraforge.lora.format import save_lora
    from loraforge.lora.extraction import (
        ExtractSettings,
        detect_arch,
        extract_component,
        extraction_metadata,
        git_revision,
        open_source,
        open_weights,
    )

    if args.dim < 1:
        raise SystemExit(f"loraforge extract: `--dim` must be ≥ 1, got {args.dim}")
    if args.conv_dim < 0 or not 0 < args.clamp_quantile <= 1 or args.min_diff < 0:
        raise SystemExit("loraforge extract: `--conv-dim` must be ≥ 0, `--clamp-quantile` in (0, 1], `--min-diff` ≥ 0")
    try:
        base, tuned = open_source(args.base, "--base"), open_source(args.tuned, "--tuned")
    except (ValueError, OSError) as e:
        raise SystemExit(f"loraforge extract: {e}") from None
    with open_weights(base.files["unet"]) as reader:
        unet_keys = reader.keys
    components = [c for c in base.files if c in tuned.files]
    arch = detect_arch(unet_keys, components) if args.arch == "auto" else args.arch
    settings = ExtractSettings(args.dim, args.conv_dim, args.clamp_quantile, args.min_diff, args.save_dtype, args.svd)
    device = _device(args.device)
    tensors: dict[str, Any] = {}
    notes: dict[str, dict[str, Any]] = {}
    for component in components:
        if component == "text_encoder_2" and arch == "sd15":
            raise SystemExit(f"loraforge extract: `--arch sd15` but {args.tuned} has text_encoder_2")
        part, notes[component] = extract_component(
            arch,
            component,
            base.files[component],
            tuned.files[component],
            settings,
            device,
            unet_config=base.unet_config or tuned.unet_config,
            min_diff_name="--min-diff",
        )
        tensors.update(part)
    metadata = extraction_metadata(
        arch,
        args.out.stem,
        settings,
        notes,
        str(args.base),
        ss_tuned_model_name=str(args.tuned),
        ss_loraforge_revision=git_revision(Path(__file__).resolve().parent),
    )
    save_lora(args.out, tensors, metadata)
    layers = sum(1 for k in tensors if k.endswith(".alpha"))
    print(
        f"wrote {args.out}: {arch}, {layers} layers at dim {args.dim}, components: "
        + ", ".join(f"{c} ({'in' if n['included'] else 'left out'})" for c, n in notes.items())
    )
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    """Run `loraforge resize` (see `add_resize_command`)."""
    import torch

    from loraforge.lora.format import load_lora, save_lora
    from loraforge.lora.resize import layer_table, resize_lora, resize_metadata
    from loraforge.lora.lycoris import file_algo

    if args.rank < 1:
        raise SystemExit(f"loraforge resize: `--rank` must be ≥ 1, got {args.rank}")
    if not args.lora.is_file():
        raise SystemExit(f"loraforge resize: {args.lora} does not exist")
    tensors, metadata = load_lora(args.lora)
    if file_algo(tensors) != "lora":
        raise SystemExit(
            f"loraforge resize: {args.lora}: a {file_algo(tensors)} file (LyCORIS / DoRA) is not SVD-resizable; "
            "use it at its trained size"
        )
    try:
        resized, stats = resize_lora(
            tensors, rank=args.rank, method=args.method, param=args.param, device=_device(args.device)
        )
    except ValueError as e:
        raise SystemExit(f"loraforge resize: {args.lora}: {str(e).replace('`param`', '`--param`')}") from None
    if args.save_dtype != "keep":
        resized = {k: v if k.endswith(".alpha") else v.to(getattr(torch, args.save_dtype)) for k, v in resized.items()}
    save_lora(args.out, resized, resize_metadata(metadata, args.rank, args.method, args.param, stats, args.out.stem))
    rows = layer_table(stats)
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(rows, indent=1) + "\n")
    ranks = [r["rank"] for r in rows]
    kept = [r["fro_retained_pct"] for r in rows]
    print(
        f"wrote {args.out}: {len(rows)} layers, ranks {min(ranks)}-{max(ranks)}, "
        f"Frobenius kept mean {sum(kept) / len(kept):.2f}% min {min(kept):.2f}%"
    )
    return 0
