"""`pipeline.yaml`: the one declaration of the DAG, read into typed stage specs.

Imports no torch: the DVC generator, the params schema and the Prefect flow all start here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from loraforge.errors import InputError
from loraforge.pipeline.codedeps import code_dependencies, installed_code_root

PIPELINE_FILE = "pipeline.yaml"
PARAMS_FILE = "params.yaml"
STAGE_ORDER = ("ingest", "upscale", "caption", "latents", "finetune", "extract", "resize", "evaluate")
_PARAM_REF = re.compile(r"^\$\{([a-z_][a-z0-9_.]*)\}$")


class SpecError(InputError):
    """pipeline.yaml is malformed; the message names the stage and key."""


@dataclass(frozen=True)
class OutputSpec:
    """One stage output: a path, and how DVC should treat it.

    Attributes:
        path: project-relative path (file or folder).
        cache: False for bulky intermediates DVC should track but not copy into its cache.
        kind: `out` (plain), `metrics` or `plots` (also declared as such in dvc.yaml).
    """

    path: str
    cache: bool = True
    kind: Literal["out", "metrics", "plots"] = "out"


@dataclass(frozen=True)
class StageSpec:
    """One stage of pipeline.yaml.

    Attributes:
        name: stage name, also its `params.yaml` section.
        module: path of the stage's module, e.g. `stages/latents.py`.
        code: the stage module, then every project file it imports, transitively (derived from
            the code by `loraforge.pipeline.codedeps`, never written by hand): its DVC deps and part of its
            Prefect cache key. Project-relative; absolute paths of the installed loraforge when
            the project holds no copy of the code (a folder with just the YAML files and data).
        inputs: named input paths; `${section.key}` refers to a params.yaml value.
        files: named files or folders that params point at (`${upscale.model_path}`), each
            optional (null = not used): their content, not just the path, decides a rerun. The
            runner hands the stage the ones that exist under `inputs`, as absolute paths.
        outputs: named outputs.
        params: params.yaml sections the stage reads (its own first).
        gpu: whether the stage benefits from a GPU.
        description: one line for the README table and the CLI.
    """

    name: str
    module: str
    code: tuple[str, ...]
    inputs: dict[str, str]
    files: dict[str, str]
    outputs: dict[str, OutputSpec]
    params: tuple[str, ...]
    gpu: bool = False
    description: str = ""

    @property
    def module_name(self) -> str:
        """Dotted import name of the stage module (`stages.latents`)."""
        return self.module.removesuffix(".py").replace("/", ".")

    @property
    def params_module_name(self) -> str:
        """Dotted import name of the stage's params schema (`stages.latents_params`): the stage's
        `Params`, importable without torch or the stage's code."""
        return f"{self.module_name}_params"

    @property
    def uses(self) -> tuple[str, ...]:
        """The files of `code` other than the stage module."""
        return self.code[1:]

    @property
    def report(self) -> str:
        """Where the stage's summary report goes."""
        return f"reports/{self.name}.json"


@dataclass(frozen=True)
class Pipeline:
    """All stages in execution order."""

    stages: dict[str, StageSpec] = field(default_factory=dict)

    def upstream(self, name: str) -> list[str]:
        """Stages whose outputs `name` reads."""
        produced = {o.path: s.name for s in self.stages.values() for o in s.outputs.values()}
        return [produced[p] for p in self.stages[name].inputs.values() if p in produced]

    def downstream(self, name: str) -> list[str]:
        """Every stage that depends on `name`, directly or not, in pipeline order."""
        found: set[str] = {name}
        for stage in self.stages:
            if any(u in found for u in self.upstream(stage)):
                found.add(stage)
        return [s for s in self.stages if s in found and s != name]


def param_ref(value: str) -> str | None:
    """`ingest.source` for the input `${ingest.source}`, else None."""
    m = _PARAM_REF.match(value)
    return m.group(1) if m else None


def _output(stage: str, key: str, raw: Any) -> OutputSpec:
    if isinstance(raw, str):
        return OutputSpec(path=raw)
    if isinstance(raw, dict) and "path" in raw:
        unknown = set(raw) - {"path", "cache", "kind"}
        if unknown:
            raise SpecError(f"{PIPELINE_FILE}: stage `{stage}` output `{key}` has unknown keys {sorted(unknown)}")
        return OutputSpec(path=raw["path"], cache=bool(raw.get("cache", True)), kind=raw.get("kind", "out"))
    raise SpecError(f"{PIPELINE_FILE}: stage `{stage}` output `{key}` must be a path or a mapping with `path`")


def _stage(root: Path, name: str, raw: Any) -> StageSpec:
    if not isinstance(raw, dict):
        raise SpecError(f"{PIPELINE_FILE}: stage `{name}` must be a mapping")
    allowed = {"module", "inputs", "files", "outputs", "params", "gpu", "description"}
    if "uses" in raw:
        raise SpecError(
            f"{PIPELINE_FILE}: stage `{name}` lists `uses`; it is derived from the module's imports now, remove it"
        )
    unknown = set(raw) - allowed
    if unknown:
        raise SpecError(
            f"{PIPELINE_FILE}: stage `{name}` has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}"
        )
    for required in ("module", "outputs", "params"):
        if required not in raw:
            raise SpecError(f"{PIPELINE_FILE}: stage `{name}` lacks `{required}`")
    params = tuple(raw["params"])
    if not params or params[0] != name:
        raise SpecError(f"{PIPELINE_FILE}: stage `{name}` must list its own section `{name}` first in `params`")
    return StageSpec(
        name=name,
        module=raw["module"],
        code=_code_files(root, name, raw["module"]),
        inputs={k: str(v) for k, v in (raw.get("inputs") or {}).items()},
        files=_files(name, raw.get("files") or {}),
        outputs={k: _output(name, k, v) for k, v in raw["outputs"].items()},
        params=params,
        gpu=bool(raw.get("gpu", False)),
        description=str(raw.get("description", "")),
    )


def _files(name: str, raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict) or not all(isinstance(v, str) and param_ref(v) for v in raw.values()):
        raise SpecError(f"{PIPELINE_FILE}: stage `{name}` `files` must map names to `${{section.key}}` param refs")
    return dict(raw)


def _code_files(root: Path, name: str, module: str) -> tuple[str, ...]:
    base = root if (root / module).is_file() else installed_code_root(module)
    if base is None:
        raise SpecError(f"{PIPELINE_FILE}: stage `{name}` module `{module}` not found in {root} nor installed")
    files = (module, *code_dependencies(base, module))
    return files if base == root else tuple((base / f).as_posix() for f in files)


def find_root(start: Path | None = None) -> Path:
    """The project folder: the nearest folder at or above `start` holding pipeline.yaml."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / PIPELINE_FILE).is_file():
            return folder
    raise SystemExit(f"loraforge: no {PIPELINE_FILE} in {here} or any parent folder")


def load_pipeline(root: Path) -> Pipeline:
    """Read and check `<root>/pipeline.yaml`: stages in dependency order, every path declared once."""
    path = Path(root) / PIPELINE_FILE
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise SpecError(f"{path}: needs a non-empty `stages` mapping")
    pipeline = Pipeline({name: _stage(Path(root), name, body) for name, body in stages_raw.items()})
    _check_graph(pipeline)
    return pipeline


def _check_graph(pipeline: Pipeline) -> None:
    all_outputs = {o.path: s.name for s in pipeline.stages.values() for o in s.outputs.values()}
    seen_outputs: dict[str, str] = {}
    for stage in pipeline.stages.values():
        for dep in stage.inputs.values():
            if dep in all_outputs and dep not in seen_outputs:
                raise SpecError(
                    f"{PIPELINE_FILE}: stage `{stage.name}` reads `{dep}`, which `{all_outputs[dep]}` writes "
                    "later; list stages in dependency order"
                )
        for out in stage.outputs.values():
            if out.path in seen_outputs:
                raise SpecError(
                    f"{PIPELINE_FILE}: `{out.path}` is written by both `{seen_outputs[out.path]}` and `{stage.name}`"
                )
            seen_outputs[out.path] = stage.name
