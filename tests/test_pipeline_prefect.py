"""The same pipeline as a real Prefect flow (ephemeral server): cached reruns and cache safety."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import make_project, run

pytestmark = pytest.mark.slow
ALL = ["ingest", "upscale", "caption", "latents", "finetune", "extract", "resize", "evaluate"]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("prefect") / "project", git=False)


def test_second_run_is_cached_for_every_stage(project):
    from flows.pipeline import run_pipeline

    first = run_pipeline(project)
    assert first == {name: "computed" for name in ALL}
    assert (project / "models" / "lora.safetensors").is_file()
    second = run_pipeline(project)
    assert second == {name: "cached" for name in ALL}


def test_deleted_outputs_are_recomputed_not_trusted(project):
    from flows.pipeline import run_pipeline

    shutil.rmtree(project / "models" / "loras")
    statuses = run_pipeline(project)
    assert statuses["resize"] == "computed"
    assert statuses["extract"] == "cached"
    assert (project / "models" / "loras").is_dir()


def test_cli_run_prints_one_line_per_stage(project):
    result = run(["loraforge", "run"], project)
    lines = [line.split() for line in result.stdout.splitlines() if line.split()[:1] and line.split()[0] in ALL]
    assert lines == [[name, "cached"] for name in ALL], result.stdout


def test_stages_publish_tables_to_the_prefect_ui(project):
    """The first run's stages published their tables as Prefect artifacts."""
    import asyncio

    from prefect.client.orchestration import get_client

    async def keys() -> set[str]:
        async with get_client() as client:
            return {a.key for a in await client.read_artifacts() if a.key}

    found = asyncio.run(keys())
    assert {"caption-captions", "latents-buckets", "finetune-plan", "finetune-epoch-loss", "evaluate-metrics"} <= found
