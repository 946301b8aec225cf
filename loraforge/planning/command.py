"""`loraforge plan`: the training plan (`loraforge.planning.steps`) for a project folder, printed as a table
and written to `reports/plan.json`, with the run's memory estimate (`loraforge.planning.memory_plan`) and,
given `--vram`, whether it fits."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from loraforge.errors import InputError
from loraforge.planning.steps import STRENGTH, build_plan, format_table, plan_table
from loraforge.planning.memory_plan import format_memory


def plan_for_project(
    root: Path,
    manifest: Path | None = None,
    strength: float = 1.0,
    target_steps: int | None = None,
    vram: float | None = None,
    arch: str | None = None,
) -> dict[str, Any]:
    """The plan for a project: its ingested manifest and its validated `finetune` / `latents` params,
    and the memory estimate (`memory`).

    Args:
        root: the project root (holds pipeline.yaml and params.yaml).
        manifest: the ingest manifest; default `data/ingested/manifest.jsonl` under `root`.
        strength: F for the LR suggestion.
        target_steps: a step count for the reverse (repeats) formula.
        vram: the GPU's memory in GB: the estimate then says whether the run fits.
        arch: `sd15` / `sdxl`: size the real architecture from the shipped configs instead of
            resolving `model.base` (nothing is downloaded).
    """
    from loraforge.data.images import read_jsonl
    from loraforge.planning.model_sizes import REFERENCE_NATIVE
    from loraforge.models.loading import resolve_model
    from loraforge.pipeline.params import load_stage_params
    from loraforge.planning.memory_plan import project_memory
    from loraforge.pipeline.runner import STATE_DIR
    from loraforge.pipeline.spec import load_pipeline

    pipeline = load_pipeline(root)
    ft = load_stage_params(root, pipeline, "finetune")
    lat = load_stage_params(root, pipeline, "latents")
    manifest = manifest or root / "data" / "ingested" / "manifest.jsonl"
    if not manifest.is_file():
        raise InputError(f"{manifest} not found: run `loraforge stage ingest` (or `dvc repro ingest`) first")
    if vram is not None and not vram > 0:
        raise InputError(f"`--vram` must be > 0, got {vram:g}")
    if arch is None:
        info = resolve_model(ft.model, root / STATE_DIR)
        native, arch, model_path = info.native_resolution, info.arch, info.path
    else:
        native, model_path = REFERENCE_NATIVE[arch], None
    plan = build_plan(
        read_jsonl(manifest),
        repeats=ft.repeats,
        batch=ft.batch_size,
        ga=ft.gradient_accumulation,
        epochs=ft.epochs,
        lr=ft.lr,
        text_encoder=ft.train_text_encoder,
        scheduler=ft.lr_scheduler,
        resolution=getattr(lat, "resolution", None) or native,
        base_resolution=native,
        strength=strength,
        target_steps=target_steps,
        flip=bool(getattr(lat, "flip", False)),
    )
    plan["memory"] = project_memory(root, ft, lat, native, model_path, arch, vram)
    return plan


def parse_strength(value: str) -> float:
    """F from a name of the 002 guide's list (`medium`, `hard`...) or a number.

    Args:
        value: the `--strength` argument.
    """
    if value in STRENGTH:
        return STRENGTH[value]
    try:
        f = float(value)
    except ValueError:
        raise InputError(f"`--strength` must be one of {', '.join(STRENGTH)} or a number > 0, got {value!r}") from None
    if not f > 0:  # the message `plan._positive` gives
        raise InputError(f"`--strength` must be > 0, got {f}")
    return f


def _run_plan_command(args: argparse.Namespace) -> int:
    """`loraforge plan`: print the plan, write reports/plan.json; exit status 2 on a bad setting or input.

    Args:
        args: the parsed `--root`, `--manifest`, `--strength`, `--target-steps`, `--vram` and `--arch`.
    """
    root = Path(args.root).resolve()
    try:
        plan = plan_for_project(
            root,
            Path(args.manifest) if args.manifest else None,
            parse_strength(args.strength),
            args.target_steps,
            args.vram,
            args.arch,
        )
    except ValueError as e:  # ParamsError included: the message names the key or file
        print(f"loraforge plan: {e}", file=sys.stderr)
        return 2
    out = root / "reports" / "plan.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(plan, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(format_table(plan_table(plan)))
    print(format_memory(plan["memory"]))
    print(f"written: {out}")
    return 0


def add_plan_command(subparsers: Any) -> None:
    """Register `loraforge plan` on the CLI's subparsers: print the plan, write reports/plan.json.

    Args:
        subparsers: the object `ArgumentParser.add_subparsers()` returned.
    """
    p = subparsers.add_parser(
        "plan",
        help="print the training plan (steps arithmetic of the 000/002 guides) and its memory estimate; "
        "write reports/plan.json",
    )
    p.add_argument("--root", default=".", help="project root (default: the current folder)")
    p.add_argument("--manifest", default=None, help="ingest manifest (default: data/ingested/manifest.jsonl)")
    p.add_argument(
        "--strength", default="medium", help=f"F: one of {', '.join(STRENGTH)} or a number (default: medium)"
    )
    p.add_argument("--target-steps", type=int, default=None, help="also give the repeats that reach this many steps")
    p.add_argument(
        "--vram", type=float, default=None, help="GPU memory in GB: say whether the run fits, and what would help"
    )
    p.add_argument(
        "--arch",
        choices=("sd15", "sdxl"),
        default=None,
        help="estimate memory for the real SD1.5 / SDXL (shipped configs) instead of resolving model.base "
        "(nothing is downloaded)",
    )
    p.set_defaults(func=_run_plan_command)
