"""Derive `dvc.yaml` from `pipeline.yaml` (`loraforge sync-dvc`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from loraforge.spec import PIPELINE_FILE, Pipeline, StageSpec, load_pipeline

DVC_FILE = "dvc.yaml"
HEADER = (
    "# Generated from pipeline.yaml by `loraforge sync-dvc`; do not edit by hand.\n"
    "# `loraforge sync-dvc --check` (run in the tests) fails when this file is stale.\n"
)


def _out_entry(path: str, cache: bool) -> Any:
    return path if cache else {path: {"cache": False}}


def stage_block(stage: StageSpec) -> dict[str, Any]:
    """The dvc.yaml block of one stage: cmd, deps (code + inputs), params, outs, metrics, plots."""
    block: dict[str, Any] = {
        "cmd": f"loraforge stage {stage.name}",
        "deps": [*stage.code, *stage.inputs.values()],
        "params": list(stage.params),
    }
    groups: dict[str, list[Any]] = {"outs": [], "metrics": [], "plots": []}
    kind_to_group = {"out": "outs", "metrics": "metrics", "plots": "plots"}
    for out in stage.outputs.values():
        groups[kind_to_group[out.kind]].append(_out_entry(out.path, out.cache))
    groups["metrics"].append(_out_entry(stage.report, False))
    block.update({k: v for k, v in groups.items() if v})
    if stage.description:
        block["desc"] = stage.description
    return block


def render(pipeline: Pipeline, plots: list[Any] | None = None) -> str:
    """dvc.yaml text for `pipeline` (deterministic, so `--check` can compare bytes)."""
    doc: dict[str, Any] = {"stages": {name: stage_block(s) for name, s in pipeline.stages.items()}}
    if plots:
        doc["plots"] = plots
    return HEADER + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=100)


def top_level_plots(root: Path) -> list[Any] | None:
    """The optional top-level `plots:` of pipeline.yaml, passed to dvc.yaml unchanged."""
    with open(Path(root) / PIPELINE_FILE, encoding="utf-8") as f:
        return (yaml.safe_load(f) or {}).get("plots")


def sync(root: Path, check: bool = False) -> bool:
    """Write dvc.yaml (or, with `check`, only compare). Returns True when it is up to date."""
    root = Path(root)
    text = render(load_pipeline(root), top_level_plots(root))
    target = root / DVC_FILE
    current = target.read_text(encoding="utf-8") if target.exists() else None
    if check:
        return current == text
    if current != text:
        target.write_text(text, encoding="utf-8")
    return True
