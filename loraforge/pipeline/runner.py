"""Runs one stage: validated params in, paths resolved, outputs cleaned, report written.

Both runners call `run_stage`: `dvc repro` through `loraforge stage NAME`, and the Prefect flow
as one task per stage. The stage itself never reads params.yaml, the environment or the working
directory: everything it needs arrives as arguments.
"""

from __future__ import annotations

import importlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from loraforge.errors import InputError
from loraforge.pipeline.filedeps import param_value, stage_files
from loraforge.store.fingerprint import canonical, hash_tree
from loraforge.store.fanout import FanOut
from loraforge.pipeline.params import RunnerParams, load_all_params, load_settings, read_params_file
from loraforge.store.remote import open_store
from loraforge.pipeline.spec import Pipeline, StageSpec, load_pipeline, param_ref
from loraforge.store.items import ItemStore

STATE_DIR = ".loraforge"  # item store, resolved builtin models, hash cache; git- and DVC-ignored
REQUIRED_SUMMARY_KEYS = ("items", "computed", "reused")


class Publisher(Protocol):
    """Where a stage shows tables and progress: the Prefect UI under `loraforge run`, nowhere under DVC."""

    def table(self, key: str, rows: list[dict[str, Any]], description: str = "") -> None: ...

    def markdown(self, key: str, text: str, description: str = "") -> None: ...

    def progress(self, fraction: float, description: str = "") -> None: ...


class NullPublisher:
    """Publishes nothing (the DVC runner; tests)."""

    def table(self, key: str, rows: list[dict[str, Any]], description: str = "") -> None:
        pass

    def markdown(self, key: str, text: str, description: str = "") -> None:
        pass

    def progress(self, fraction: float, description: str = "") -> None:
        pass


class Paths(dict):
    """Named paths of a stage (`inputs.images`, `outputs.report`), read by attribute or key."""

    def __getattr__(self, name: str) -> Path:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no path named `{name}` (have: {', '.join(self)})") from None


@dataclass
class StageEnv:
    """What the runner hands a stage besides params and paths.

    Attributes:
        store: the content-addressed item store for per-item caching.
        state_dir: loraforge's private folder (resolved builtin models live under it).
        publish: where tables and progress go (Prefect artifacts or nowhere).
        show_progress: whether to draw terminal progress bars.
        fan_out: where per-item chunks run (`runner` section: this process, or a Dask cluster).
        machine_rank: `loraforge stage --machine-rank` (multi-machine training), or None.
    """

    store: ItemStore
    state_dir: Path
    publish: Publisher = field(default_factory=NullPublisher)
    show_progress: bool = True
    fan_out: FanOut = field(default_factory=FanOut)
    machine_rank: int | None = None

    def bar(self, iterable: Any = None, **kwargs: Any) -> Any:
        """A tqdm progress bar; off when `show_progress` is False (TQDM_DISABLE=1 also turns it off)."""
        from tqdm import tqdm

        if not self.show_progress:
            kwargs["disable"] = True
        return tqdm(iterable, **kwargs)

    def tracker(self, total: int, desc: str, unit: str = "img") -> "Tracker":
        """Progress for chunked work: a terminal bar and the publisher's progress, advanced by counts."""
        return Tracker(self.bar(total=total, desc=desc, unit=unit), self.publish, total, desc)


class Tracker:
    """Counts work done (chunks report how many items they did) into a bar and the publisher.

    Args:
        bar: the tqdm bar (possibly disabled).
        publish: where progress fractions go.
        total: items in all.
        desc: what the work is, for the publisher.
    """

    def __init__(self, bar: Any, publish: Publisher, total: int, desc: str) -> None:
        self.bar, self.publish, self.total, self.desc, self.done = bar, publish, total, desc, 0

    def __call__(self, n: int) -> None:
        self.done += n
        self.bar.update(n)
        self.publish.progress(self.done / max(1, self.total), self.desc)

    def close(self) -> None:
        self.bar.close()


def resolve_inputs(root: Path, stage: StageSpec, raw_params: dict[str, Any]) -> Paths:
    """Input paths, with `${section.key}` taken from params.yaml and made absolute; plus the
    stage's `files` whose param names an existing file or folder."""
    resolved = Paths()
    for name, value in stage.inputs.items():
        ref = param_ref(value)
        if ref is not None:
            node = param_value(raw_params, ref)
            if not isinstance(node, str):
                raise InputError(
                    f"pipeline.yaml: stage `{stage.name}` input `{name}` needs params.yaml `{ref}` set to a path"
                )
            value = node
        resolved[name] = (root / value).resolve()
    resolved.update(stage_files(root, stage, raw_params))
    return resolved


def prepare_outputs(root: Path, stage: StageSpec) -> Paths:
    """Output paths, emptied first (as DVC does) so no stale file survives a rerun."""
    outputs = Paths()
    for name, out in stage.outputs.items():
        path = (root / out.path).resolve()
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        if not path.suffix:  # a folder output
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
        outputs[name] = path
    report = root / stage.report
    report.unlink(missing_ok=True)
    return outputs


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write a JSON report (sorted, indented, UTF-8)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(canonical(report), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def fan_out(runner: RunnerParams) -> FanOut:
    """The `runner` section as the stages' `FanOut`."""
    return FanOut(runner.task_runner, runner.address, runner.workers, runner.chunk_size, runner.threads)


def run_stage(
    root: Path,
    name: str,
    publish: Publisher | None = None,
    pipeline: Pipeline | None = None,
    machine_rank: int | None = None,
) -> dict[str, Any]:
    """Validate params, run stage `name`, write `reports/<name>.json`; return its manifest.

    The manifest is small (paths and content hashes of the outputs plus the report): it is what
    the Prefect task returns and caches, never tensors or images. With `machine_rank` > 0 (a
    secondary machine of a multi-machine training run) the outputs and the report go under
    `.loraforge/machine-<rank>/` instead: only machine 0 writes what DVC and the pipeline track.
    """
    root = Path(root).resolve()
    pipeline = pipeline or load_pipeline(root)
    if name not in pipeline.stages:
        raise KeyError(f"no stage `{name}` in pipeline.yaml (have: {', '.join(pipeline.stages)})")
    stage = pipeline.stages[name]
    params = load_all_params(root, pipeline)[name]  # the whole file is valid, or nothing is touched
    inputs = resolve_inputs(root, stage, read_params_file(root))
    shared = load_settings(root)["store"]
    store = open_store(root / STATE_DIR / "store", shared.url, shared.endpoint_url)  # a shared one answers first
    store.sweep()  # temp files of killed runs on this host
    out_root = root / STATE_DIR / f"machine-{machine_rank}" if machine_rank else root  # never machine 0's outputs
    outputs = prepare_outputs(out_root, stage)
    settings = load_settings(root)
    env = StageEnv(store=store, state_dir=root / STATE_DIR, publish=publish or NullPublisher(),
                   fan_out=fan_out(settings["runner"]), machine_rank=machine_rank)  # fmt: skip
    module = importlib.import_module(stage.module_name)

    started = time.perf_counter()
    summary = module.run(params, inputs, outputs, env)
    store.sweep()  # and of Dask workers that died during this one (their chunks were redone)
    missing = [k for k in REQUIRED_SUMMARY_KEYS if k not in summary]
    if missing:
        raise RuntimeError(f"stage `{name}` returned a summary without {missing}")
    report = {"stage": name, **summary, "seconds": round(time.perf_counter() - started, 3)}
    write_report(out_root / stage.report, report)
    return {
        "stage": name,
        "outputs": {
            path: hash_tree(out_root / path) for path in (*(o.path for o in stage.outputs.values()), stage.report)
        },
        "report": report,
    }
