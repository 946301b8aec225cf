"""`params.yaml` loaded into typed, frozen, validated per-stage params.

Each stage's `Params`, a frozen pydantic dataclass for its own section (built with `section`),
lives in `stages/<name>_params.py`, beside the stage and importable without torch. Shared
sections (`model`, `dataset`) are defined here and handed to every stage that lists them in
pipeline.yaml: the stage's params get them as a field of the same name.

Validation happens before any work; an unknown key, a wrong type or an out-of-range value raises
`ParamsError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import ConfigDict, Field

from loraforge.errors import InputError
from loraforge.pipeline.spec import PARAMS_FILE, Pipeline, StageSpec
from loraforge.store.remote import check_endpoint_url, parse_store_url

SECTION_CONFIG = ConfigDict(extra="forbid")


def section(cls: type) -> type:
    """Decorator: a frozen, validated params dataclass that rejects unknown keys."""
    return pydantic.dataclasses.dataclass(frozen=True, config=SECTION_CONFIG)(cls)


class ParamsError(InputError):
    """params.yaml failed validation; the message lists every problem."""


@section
class ModelParams:
    """The `model` section: which base model every stage uses.

    Attributes:
        base: `builtin:tiny-sdxl`, `builtin:tiny-sd15` (seeded random, for tests),
            `builtin:shapes-sdxl` (tiny, trained on the shapes world, shipped), a Hugging Face id
            (downloaded once), a local diffusers folder, or a single-file SD1.5/SDXL checkpoint
            (`.safetensors`, original layout as A1111/ComfyUI use it).
        config: for a single-file `base`: a diffusers folder (configs suffice) describing it;
            null = the SD1.5/SDXL configs loraforge ships, chosen from the checkpoint's keys.
        vae: a VAE replacing the base model's (a diffusers AutoencoderKL folder or one
            `.safetensors` file, diffusers or original layout); null = the base model's own.
        revision: Hugging Face revision (branch, tag or commit) when `base` is a hub id.
        allow_pickle: allow `.bin`/`.ckpt` weights (loaded with `weights_only=True`); off by default.
        device: `auto` picks CUDA when available, else CPU.
    """

    base: str = Field("builtin:tiny-sdxl", min_length=1)
    revision: str | None = None
    config: str | None = None
    vae: str | None = None
    allow_pickle: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"


@section
class TileParams:
    """One entry of `dataset.tile`: which source images to cut into sectors (000 guide's
    "precision method": one very high-resolution image cut into 16 sectors).

    Attributes:
        source: path of the image relative to `ingest.source`, or a glob (`styles/*.png`).
        rows: sectors down.
        cols: sectors across.
    """

    source: str = Field(min_length=1)
    rows: int = Field(4, ge=1, le=64)
    cols: int = Field(4, ge=1, le=64)


@section
class DatasetParams:
    """The `dataset` section: dataset craft applied by ingest (000 and 003 guides).

    Attributes:
        dsb_target: Dataset Saturation Balance sweet spot, the dominant side's share (000: 0.60).
        dsb_tolerance: half-width of the sweet spot (000: ± 0.05); the window is exclusive.
        dsb_enforce: drop the fewest images that bring the DSB inside the window (else only report them).
        tile: images to cut into rows × cols sectors (the originals are replaced by the sectors kept).
        tile_min_sharpness: sectors whose Laplacian variance (grey level²) is below this are dropped as blur.
        tile_max_clipped: sectors with more than this share of clipped (≤ 2 or ≥ 253) pixels are dropped as exposure.
        min_side: short side below which an image is flagged for upscaling; null = the model's
            native side from `model.base` (1024 SDXL, 512 SD1.x, 128 builtin tiny).
        near_duplicate_distance: images whose 64-bit dHashes differ in at most this many bits are
            near-duplicates (the larger is kept); -1 disables.
        min_sharpness: whole images with a Laplacian variance below this are dropped as blurred
            (listed in `dropped.jsonl`); 0 only reports the score.
    """

    dsb_target: float = Field(0.60, ge=0.5, le=1)
    dsb_tolerance: float = Field(0.05, gt=0, le=0.5)
    dsb_enforce: bool = False
    tile: tuple[TileParams, ...] = ()
    tile_min_sharpness: float = Field(50.0, ge=0)
    tile_max_clipped: float = Field(0.5, ge=0, le=1)
    min_side: int | None = Field(None, ge=1)
    near_duplicate_distance: int = Field(4, ge=-1, le=64)
    min_sharpness: float = Field(0.0, ge=0)


@section
class StoreParams:
    """The `store` section: where the content-addressed item store lives. Where an entry is
    stored never changes what it holds, so no stage reruns when this changes.

    Attributes:
        url: null = `<project>/.loraforge/store`; `s3://bucket/prefix` (S3 or an S3-compatible
            server, through fsspec's s3fs) = a store shared by workers and teammates (a local
            copy of what this machine used stays in `.loraforge/store`). Credentials come from
            the usual `AWS_*` variables (or ~/.aws), never from here.
        endpoint_url: the S3 endpoint of an S3-compatible server (MinIO, SeaweedFS, R2...);
            null = AWS (or `AWS_ENDPOINT_URL`). Only with `url`.
    """

    url: str | None = Field(None, min_length=1)
    endpoint_url: str | None = Field(None, min_length=1)

    @pydantic.field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None:
            parse_store_url(value)
        return value

    @pydantic.field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return value if value is None else check_endpoint_url(value)

    @pydantic.model_validator(mode="after")
    def _endpoint_needs_url(self) -> StoreParams:
        if self.endpoint_url is not None and self.url is None:
            raise ValueError("`store.endpoint_url` is set but `store.url` is null (the store is local)")
        return self


@section
class RunnerParams:
    """The `runner` section: where per-item work runs. Results are identical either way, so no
    stage reruns when this changes.

    Attributes:
        task_runner: `local` (in the stage's process) or `dask` (chunks of items as tasks on a
            Dask cluster, through Prefect's DaskTaskRunner under `loraforge run`).
        address: the Dask scheduler (`tcp://host:8786`); null with `dask` = a local cluster of
            `workers` processes started for the stage.
        workers: processes of the local cluster.
        chunk_size: items per task (a worker, e.g. one GPU, takes one chunk at a time).
        threads: torch threads per chunk; null = torch's default (all cores in the stage's
            process, 1 in a Dask worker). CPU results are bitwise identical for the same count.
    """

    task_runner: Literal["local", "dask"] = "local"
    address: str | None = Field(None, min_length=1)
    workers: int = Field(2, ge=1)
    chunk_size: int = Field(16, ge=1)
    threads: int | None = Field(None, ge=1)


SHARED_SECTIONS: dict[str, type] = {"model": ModelParams, "dataset": DatasetParams}
# Sections that configure how the pipeline runs, not what it computes: validated with the rest,
# handed to the runner, read by no stage (so DVC reruns nothing when they change).
SETTINGS_SECTIONS: dict[str, type] = {"store": StoreParams, "runner": RunnerParams}


def read_params_file(root: Path) -> dict[str, Any]:
    """The raw `params.yaml` mapping (safe_load)."""
    path = Path(root) / PARAMS_FILE
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path} not found") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must be a mapping of sections, got {type(raw).__name__}")
    return raw


def stage_params_class(stage: StageSpec) -> type:
    """The stage's `Params` class, from its params module (`stages/<name>_params.py`), which
    imports neither torch nor the stage's code."""
    module = importlib.import_module(stage.params_module_name)
    return module.Params


def _describe(err: dict[str, Any], cls: type) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        fields = cls.__dataclass_fields__  # type: ignore[attr-defined]
        known = ", ".join(sorted(f for f in fields if f not in SHARED_SECTIONS))
        return f"`{loc}` is not a known key (known: {known})"
    if err["type"] == "missing":
        return f"`{loc}` is required"
    return f"`{loc}` = {err['input']!r}: {err['msg']}"


def _validate(cls: type, data: Any, prefix: str) -> tuple[Any, list[str]]:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return None, [f"`{prefix}` must be a mapping, got {data!r}"]
    try:
        return pydantic.TypeAdapter(cls).validate_python(data), []
    except pydantic.ValidationError as e:
        problems = []
        for err in e.errors():
            err = {**err, "loc": (prefix, *err["loc"])}
            problems.append(_describe(err, cls))
        return None, problems


def validate_stage(stage: StageSpec, raw: dict[str, Any]) -> tuple[Any, list[str]]:
    """Validate one stage's sections; returns (params or None, problems)."""
    own = raw.get(stage.name) or {}
    if not isinstance(own, dict):
        return None, [f"`{stage.name}` must be a mapping, got {own!r}"]
    problems = []
    data = dict(own)
    for shared in stage.params[1:]:
        if shared in data:
            problems.append(f"`{stage.name}.{shared}`: set it in the top-level `{shared}` section instead")
        if shared not in SHARED_SECTIONS:
            problems.append(f"pipeline.yaml: stage `{stage.name}` reads unknown shared section `{shared}`")
            continue
        shared_params, shared_problems = _validate(SHARED_SECTIONS[shared], raw.get(shared), shared)
        problems += shared_problems
        data[shared] = shared_params
    if problems:
        return None, problems
    return _validate(stage_params_class(stage), data, stage.name)


def load_stage_params(root: Path, pipeline: Pipeline, name: str) -> Any:
    """Validated params for stage `name`; raises ParamsError listing every problem."""
    params, problems = validate_stage(pipeline.stages[name], read_params_file(root))
    if problems:
        raise ParamsError(f"{Path(root) / PARAMS_FILE}:\n  " + "\n  ".join(problems))
    return params


def load_settings(root: Path) -> dict[str, Any]:
    """The validated `store` and `runner` sections (defaults when absent)."""
    raw = read_params_file(root)
    settings, problems = {}, []
    for name, cls in SETTINGS_SECTIONS.items():
        settings[name], found = _validate(cls, raw.get(name), name)
        problems += found
    if problems:
        raise ParamsError(f"{Path(root) / PARAMS_FILE}:\n  " + "\n  ".join(problems))
    return settings


def load_all_params(root: Path, pipeline: Pipeline) -> dict[str, Any]:
    """Validated params for every stage; one error listing all problems across all sections
    (the `store` and `runner` settings included)."""
    raw = read_params_file(root)
    known = set(pipeline.stages) | set(SHARED_SECTIONS) | set(SETTINGS_SECTIONS)
    problems = [f"`{s}` is not a known section (known: {', '.join(sorted(known))})" for s in raw if s not in known]
    for name, cls in SETTINGS_SECTIONS.items():
        problems += _validate(cls, raw.get(name), name)[1]
    result = {}
    for name, stage in pipeline.stages.items():
        params, stage_problems = validate_stage(stage, raw)
        problems += [p for p in stage_problems if p not in problems]
        result[name] = params
    if problems:
        raise ParamsError(f"{Path(root) / PARAMS_FILE}:\n  " + "\n  ".join(problems))
    return result
