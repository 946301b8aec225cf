"""Per-item work in chunks: in the stage's process, or as tasks on a Dask cluster.

A per-item stage (latents, upscale, caption...) plans its items, groups the ones missing from
the item store into chunks, and calls `FanOut.map(work, context, chunks)`. `work(context, chunk)`
is a module-level function: it computes the chunk's items and puts them in the item store, then
returns a small summary. Results never travel back as tensors or images; the stage reads the
store afterwards, exactly as it does for items cached by an earlier run.

- `runner.task_runner: local` (default): chunks run one after the other in this process.
- `runner.task_runner: dask`: chunks are tasks on a Dask cluster (`runner.address`, or a local
  cluster of `runner.workers` processes started for the stage). Under `loraforge run` they go
  through Prefect's `DaskTaskRunner` (each chunk a task in the Prefect UI); under `dvc repro`,
  straight to `dask.distributed`. A worker that dies mid-chunk has its chunk run again
  elsewhere (Dask reschedules it; store writes are atomic, so nothing half-done is ever read).

Results are bitwise identical wherever a chunk runs for the same torch thread count
(`runner.threads`; CPU float reductions depend on it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

T = TypeVar("T")
Work = Callable[[Any, list[Any]], Any]


def chunked(items: Sequence[T], size: int) -> list[list[T]]:
    """`items` in consecutive chunks of at most `size`."""
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def run_chunk(work: Work, context: Any, chunk: list[Any], threads: int | None) -> Any:
    """Run one chunk (in whatever process it landed), with a fixed torch thread count if asked."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    return work(context, chunk)


@dataclass(frozen=True)
class FanOut:
    """Where chunks run (the `runner` section of params.yaml).

    Attributes:
        task_runner: `local` or `dask`.
        address: Dask scheduler address, or None for a local cluster.
        workers: processes of the local cluster.
        chunk_size: items per chunk.
        threads: torch threads per chunk; None = torch's default (Dask workers: 1).
    """

    task_runner: str = "local"
    address: str | None = None
    workers: int = 2
    chunk_size: int = 16
    threads: int | None = None

    def map(self, work: Work, context: Any, chunks: list[list[Any]], progress: Callable[[int], None]) -> list[Any]:
        """`work(context, chunk)` for every chunk, in chunk order.

        Args:
            work: a module-level function (it is pickled to Dask workers).
            context: what every chunk needs (params, paths, the item store); picklable.
            chunks: the work, from `chunked`.
            progress: called with each chunk's result as it finishes (work functions return the
                number of items they did, so this can drive a progress bar).
        """
        if not chunks:
            return []
        if self.task_runner == "local":
            results = []
            for chunk in chunks:
                results.append(run_chunk(work, context, chunk, self.threads))
                progress(results[-1])
            return results
        if _in_prefect_run():
            return self._prefect_map(work, context, chunks, progress)
        return self._dask_map(work, context, chunks, progress)

    def _cluster_kwargs(self) -> dict[str, Any]:
        return {"n_workers": self.workers, "threads_per_worker": 1, "processes": True, "host": "127.0.0.1",
                "dashboard_address": None}  # fmt: skip

    def _dask_map(self, work: Work, context: Any, chunks: list[list[Any]], progress: Callable[[int], None]) -> list:
        from distributed import Client, LocalCluster, as_completed

        cluster = None if self.address else LocalCluster(**self._cluster_kwargs())
        try:
            with Client(self.address or cluster) as client:
                # the (small) context travels inside each task, not scattered once: a scattered value lost
                # with a dead worker cancels every chunk that needs it ("already forgotten")
                futures = [client.submit(run_chunk, work, context, c, self.threads, pure=False) for c in chunks]
                for done in as_completed(futures):
                    progress(done.result())  # re-raises a chunk's error here
                return client.gather(futures)
        finally:
            if cluster is not None:
                cluster.close()

    def _prefect_map(self, work: Work, context: Any, chunks: list[list[Any]], progress: Callable[[int], None]) -> list:
        from prefect import flow, task
        from prefect.cache_policies import NO_CACHE
        from prefect_dask import DaskTaskRunner

        # one Prefect task per chunk; a worker lost mid-chunk is rescheduled by Dask itself
        chunk_task = task(run_chunk, name="chunk", cache_policy=NO_CACHE, persist_result=False)
        runner = DaskTaskRunner(address=self.address) if self.address else DaskTaskRunner(
            cluster_kwargs=self._cluster_kwargs())  # fmt: skip

        @flow(name="fan-out", task_runner=runner, log_prints=True)
        def fan_out() -> list[Any]:
            futures = [chunk_task.submit(work, context, c, self.threads) for c in chunks]
            results = []
            for future in futures:
                results.append(future.result())
                progress(results[-1])
            return results

        return fan_out()


def _in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None
