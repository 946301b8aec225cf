"""The same pipeline as a real Prefect flow (ephemeral server): cached reruns and cache safety.

The module fixture runs the flow once on a fresh project; every test starts from that finished
run and leaves the project finished, so each passes alone and in any order."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import make_project, run

pytestmark = pytest.mark.slow
ALL = ["ingest", "upscale", "caption", "latents", "finetune", "extract", "resize", "evaluate"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A project after its first flow run, and that run's statuses."""
    from flows.pipeline import run_pipeline

    project = make_project(tmp_path_factory.mktemp("prefect") / "project", git=False)
    return project, run_pipeline(project)


@pytest.fixture
def project(first_run) -> Path:
    return first_run[0]


def test_first_run_computes_and_second_run_is_cached_for_every_stage(first_run):
    from flows.pipeline import run_pipeline

    project, first = first_run
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
    assert run_pipeline(project) == {name: "cached" for name in ALL}  # leaves a finished, cached project


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


def test_an_expected_stop_under_the_flow_is_one_line_with_no_traceback(tmp_path):
    """issue 10: `loraforge run` stops like `loraforge stage`: one line naming the key, exit 2."""
    project = make_project(tmp_path / "p", params={"ingest": {"source": "no-such-folder"}}, git=False)
    result = run(["loraforge", "run"], project, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("loraforge:")]
    assert lines == [f"loraforge: ingest: `ingest.source` folder {project / 'no-such-folder'} does not exist"]
    assert not (project / "data" / "ingested" / "manifest.jsonl").exists()
