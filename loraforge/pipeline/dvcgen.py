"""Derive `dvc.yaml` from `pipeline.yaml` (`loraforge sync-dvc`).

Besides the pipeline's stages, dvc.yaml gets one guard stage, `check`, that runs first on every
`dvc repro` (`always_changed`) and that every stage depends on:

- it validates the whole params.yaml: DVC deletes a stage's outputs just before running it, so
  a bad value must stop the run before any stage starts, and it does, since `check` fails first;
- it writes `reports/inputs/<stage>.json`, the content hashes of the files that stage's params
  point at (`loraforge.pipeline.filedeps`); each is a dep of its stage, so replacing a model file at the
  same path reruns exactly the stages that use it, and an unchanged one reruns nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from loraforge.pipeline.codedeps import code_dependencies, installed_code_root
from loraforge.pipeline.filedeps import INPUTS_DIR
from loraforge.pipeline.spec import PARAMS_FILE, PIPELINE_FILE, Pipeline, StageSpec, load_pipeline

DVC_FILE = "dvc.yaml"
CHECK_STAGE = "check"
HEADER = (
    "# Generated from pipeline.yaml by `loraforge sync-dvc`; do not edit by hand.\n"
    "# `loraforge sync-dvc --check` (run in the tests) fails when this file is stale.\n"
)


def _out_entry(path: str, cache: bool) -> Any:
    return path if cache else {path: {"cache": False}}


def schema_files(root: Path, pipeline: Pipeline) -> list[str]:
    """The params schema: every stage's params module and what it imports (e.g. loraforge/pipeline/params.py)."""
    files: list[str] = []
    for stage in pipeline.stages.values():
        module = stage.params_module_name.replace(".", "/") + ".py"
        base = root if (root / module).is_file() else installed_code_root(module)
        if base is None:
            continue
        for path in (module, *code_dependencies(base, module)):
            path = path if base == root else (base / path).as_posix()
            if path not in files:
                files.append(path)
    return files


def inputs_file(stage: str) -> str:
    """The `check` stage's record of the hashes of `stage`'s file params."""
    return f"{INPUTS_DIR}/{stage}.json"


def check_block(root: Path, pipeline: Pipeline) -> dict[str, Any]:
    """The guard stage: validates params.yaml before any stage can delete its outputs, and hashes
    the files params point at."""
    return {
        "cmd": "loraforge check --fingerprint",
        "deps": [PARAMS_FILE, PIPELINE_FILE, *schema_files(root, pipeline)],
        "outs": [_out_entry(inputs_file(name), False) for name in pipeline.stages],
        "always_changed": True,
        "desc": "Validate params.yaml before any stage touches its outputs; hash the files params name",
    }


def stage_block(stage: StageSpec) -> dict[str, Any]:
    """The dvc.yaml block of one stage: cmd, deps (code, inputs, its file-param hashes), params, outs,
    metrics, plots."""
    block: dict[str, Any] = {
        "cmd": f"loraforge stage {stage.name}",
        "deps": [*stage.code, *stage.inputs.values(), inputs_file(stage.name)],
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


def render(root: Path, pipeline: Pipeline, plots: list[Any] | None = None) -> str:
    """dvc.yaml text for `pipeline` (deterministic, so `--check` can compare bytes)."""
    stages = {CHECK_STAGE: check_block(Path(root), pipeline)}
    stages.update({name: stage_block(s) for name, s in pipeline.stages.items()})
    doc: dict[str, Any] = {"stages": stages}
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
    text = render(root, load_pipeline(root), top_level_plots(root))
    target = root / DVC_FILE
    current = target.read_text(encoding="utf-8") if target.exists() else None
    if check:
        return current == text
    if current != text:
        target.write_text(text, encoding="utf-8")
    return True
