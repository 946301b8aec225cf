"""The pipeline as a Prefect 3 flow, built from pipeline.yaml: one cached task per stage.

Orchestration only. A stage task's cache key is the xxhash fingerprint of the stage's code, its
validated params and its inputs' content (`stage_fingerprint`); the task returns the stage's
manifest (output paths + content hashes + report), which Prefect persists as JSON, so Prefect's
result storage never holds a second copy of images, latents or weights.

A cache hit is trusted only while the outputs on disk still match the cached manifest; if someone
deleted or edited them, the stage is recomputed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import TaskRunContext
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
from prefect.states import Failed, State

from loraforge.errors import StopRun
from loraforge.pipeline.filedeps import file_fingerprints
from loraforge.store.fingerprint import canonical, hash_file, hash_json, hash_tree
from loraforge.models.weights import HASH_CACHE, HashCache
from loraforge.pipeline.params import load_all_params, load_stage_params, read_params_file
from loraforge.pipeline.runner import STATE_DIR, resolve_inputs, run_stage
from loraforge.pipeline.spec import load_pipeline


class PrefectPublisher:
    """Stage tables, notes and progress as Prefect artifacts (keys: lowercase, digits, dashes)."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self._progress_id: Any = None

    def _key(self, key: str) -> str:
        return f"{self.stage}-{key}".lower().replace("_", "-")

    def table(self, key: str, rows: list[dict[str, Any]], description: str = "") -> None:
        create_table_artifact(table=canonical(rows), key=self._key(key), description=description)

    def markdown(self, key: str, text: str, description: str = "") -> None:
        create_markdown_artifact(markdown=text, key=self._key(key), description=description)

    def progress(self, fraction: float, description: str = "") -> None:
        percent = max(0.0, min(100.0, 100.0 * fraction))
        if self._progress_id is None:
            self._progress_id = create_progress_artifact(progress=percent, description=description or self.stage)
        else:
            update_progress_artifact(self._progress_id, progress=percent)


def stage_fingerprint(root: Path, name: str) -> str:
    """xxh3 of what decides a stage's result: its code files, its validated params, its inputs'
    content and the content of the files its params point at."""
    pipeline = load_pipeline(root)
    stage = pipeline.stages[name]
    raw = read_params_file(root)
    inputs = resolve_inputs(root, stage, raw)
    cache = HashCache(root / STATE_DIR / HASH_CACHE)
    files = file_fingerprints(root, stage, raw, cache)
    cache.save()
    return hash_json(
        {
            "stage": name,
            "code": {path: hash_file(root / path) for path in stage.code},
            "params": canonical(load_stage_params(root, pipeline, name)),
            "inputs": {key: hash_tree(inputs[key]) for key in stage.inputs},
            "files": files,
        }
    )


def _cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return stage_fingerprint(Path(parameters["root"]), parameters["name"])


@task(cache_key_fn=_cache_key, persist_result=True, result_serializer="json")
def stage_task(root: str, name: str) -> dict[str, Any] | State:
    """Run one stage; return its manifest (cached by the stage fingerprint). An expected stop
    (a missing input, too many rejects...) fails the task with its one-line message, no traceback."""
    try:
        return run_stage(Path(root), name, publish=PrefectPublisher(name))
    except StopRun as e:
        return Failed(message=f"{name}: {e}")


def outputs_intact(root: Path, manifest: dict[str, Any]) -> bool:
    """True when every output recorded in the manifest is on disk with the same content hash."""
    return all(hash_tree(root / path) == digest for path, digest in manifest["outputs"].items())


@flow(name="loraforge", log_prints=True)
def pipeline_flow(root: str, force: bool = False) -> dict[str, str] | State:
    """Run every stage in pipeline order; return `{stage: "computed" | "cached"}`, or the failed
    stage's state (the flow fails with its message)."""
    project = Path(root)
    pipeline = load_pipeline(project)
    statuses: dict[str, str] = {}
    for name in pipeline.stages:
        runner = stage_task.with_options(name=f"stage-{name}", refresh_cache=force)
        state = runner(root, name, return_state=True)
        if state.is_failed():
            return Failed(message=state.message)  # the flow fails with the stage's one-line message
        manifest = state.result()
        cached = state.name == "Cached"
        if cached and not outputs_intact(project, manifest):
            print(f"{name}: cached outputs were changed on disk; recomputing")
            state = runner.with_options(refresh_cache=True)(root, name, return_state=True)
            state.result()
            cached = False
        statuses[name] = "cached" if cached else "computed"
    return statuses


def run_pipeline(root: Path, force: bool = False) -> dict[str, str]:
    """Entry point for `loraforge run`: the flow, with cached manifests kept in the project's
    `.loraforge/prefect-results` (so each project has its own cache, beside its item store)."""
    root = Path(root).resolve()
    load_all_params(root, load_pipeline(root))  # every section valid before the server starts or a stage runs
    with temporary_settings(updates={PREFECT_RESULTS_LOCAL_STORAGE_PATH: root / STATE_DIR / "prefect-results"}):
        state = pipeline_flow(str(root), force=force, return_state=True)
    if state.is_failed():
        raise StopRun(state.message or "the pipeline flow failed")
    return state.result()
