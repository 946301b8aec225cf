"""Per-item work in chunks (issue 12): the same bytes in one process and on a real Dask
LocalCluster of 2 worker processes, a worker killed mid-chunk survived, and chunks as Prefect
tasks through DaskTaskRunner."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import pytest

from loraforge.store.fanout import FanOut, chunked
from loraforge.data.images import read_jsonl
from loraforge.pipeline.params import ModelParams
from loraforge.pipeline.runner import Paths, StageEnv
from loraforge.store.items import ItemStore
from stages import latents as latents_stage
from tests.fanout_work import die_once_mid_write
from tests.test_latents import ingest, picture

MODEL = ModelParams(base="builtin:tiny-sdxl", device="cpu")


def test_chunked_and_local_map_keep_order():
    assert chunked(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    seen: list[int] = []
    out = FanOut("local").map(lambda ctx, c: [ctx * x for x in c], 10, chunked([1, 2, 3], 2), seen.append)
    assert out == [[10, 20], [30]] and seen == [[10, 20], [30]]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, state_dir: Path) -> Path:
    """Twelve small pictures of three shapes (three buckets), ingested."""
    src = tmp_path_factory.mktemp("src")
    sizes = [(150, 150), (210, 120), (120, 200)]
    for i in range(12):
        picture(src / f"img_{i:02d}.png", sizes[i % 3], seed=i)
    return ingest(src, tmp_path_factory.mktemp("ingest"), state_dir)


def encode(images: Path, work: Path, state_dir: Path, fan_out: FanOut) -> tuple[dict[str, Any], dict[str, str]]:
    """The latents stage (with the VAE check) into a fresh store; its summary and the sha256 of
    every output file."""
    out, checks = work / "latents", work / "vae_check"
    out.mkdir(parents=True)
    checks.mkdir()
    env = StageEnv(store=ItemStore(work / "store"), state_dir=state_dir, show_progress=False, fan_out=fan_out)
    params = latents_stage.Params(model=MODEL, bucket_step=32, batch_size=2, vae_check=True)
    summary = latents_stage.run(params, Paths(images=images), Paths(latents=out, vae_check=checks), env)
    digests = {p.relative_to(work).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in sorted(work.rglob("*")) if p.is_file() and "store" not in p.parts}  # fmt: skip
    return summary, digests


@pytest.fixture(scope="module")
def single_process(images: Path, tmp_path_factory: pytest.TempPathFactory, state_dir: Path) -> tuple:
    return encode(images, tmp_path_factory.mktemp("local"), state_dir, FanOut("local", chunk_size=4, threads=1))


@pytest.mark.slow
def test_two_dask_workers_write_the_same_bytes_as_one_process(images, single_process, tmp_path, state_dir):
    summary, digests = encode(images, tmp_path, state_dir, FanOut("dask", workers=2, chunk_size=4, threads=1))
    local_summary, local_digests = single_process
    assert summary["computed"] == local_summary["computed"] == 12
    assert summary["vae_check"]["computed"] == 12
    assert len([f for f in digests if f.endswith(".safetensors")]) == 12
    assert digests == local_digests  # manifests, every latent, the VAE-check sheets and index


class DyingFanOut(FanOut):
    """A FanOut whose first chunk kills its worker mid-write (see tests/fanout_work.py)."""

    marker: Path = Path("/nonexistent")

    def map(self, work, context, chunks, progress):  # type: ignore[override]
        return super().map(functools.partial(die_once_mid_write, self.marker, work), context, chunks, progress)


@pytest.mark.slow
def test_a_worker_killed_mid_chunk_is_survived_and_its_chunk_redone(images, single_process, tmp_path, state_dir):
    fan_out = DyingFanOut("dask", workers=2, chunk_size=4, threads=1)
    object.__setattr__(fan_out, "marker", tmp_path / "killed")
    summary, digests = encode(images, tmp_path / "work", state_dir, fan_out)
    assert (tmp_path / "killed").exists()  # a worker really died
    assert summary["computed"] == 12 and digests == single_process[1]
    rows = read_jsonl(tmp_path / "work" / "latents" / "manifest.jsonl")
    assert len(rows) == 12


@pytest.mark.slow
def test_under_a_prefect_flow_chunks_are_prefect_tasks_on_the_dask_task_runner(
    images, single_process, tmp_path, state_dir
):
    import asyncio

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    @flow(name="latents-on-dask")
    def stage_flow() -> tuple:
        return encode(images, tmp_path, state_dir, FanOut("dask", workers=2, chunk_size=4, threads=1))

    summary, digests = stage_flow()
    assert summary["computed"] == 12 and digests == single_process[1]

    async def chunk_states() -> list[str]:
        async with get_client() as client:
            runs = await client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="chunk")))
            return [run.state.name for run in runs]

    # 12 images in 3 buckets of 4, batches of 2, chunks of 4 images: 3 chunk tasks, all completed
    assert asyncio.run(chunk_states()) == ["Completed"] * 3
