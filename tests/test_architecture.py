"""The house rules, checked on the code itself: short modules and functions, the library never
reaching up into a stage, no import cycles, and stage deps read off the imports."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
import yaml

from loraforge.codedeps import PROJECT_PACKAGES, code_dependencies, imported_files
from loraforge.spec import SpecError, load_pipeline

REPO = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def project_sources() -> list[Path]:
    return sorted(p for pkg in (*PROJECT_PACKAGES, "benchmarks", "scripts") for p in (REPO / pkg).rglob("*.py"))


def test_no_module_over_400_lines():
    long = {
        p.relative_to(REPO).as_posix(): n for p in project_sources() if (n := len(p.read_text().splitlines())) > 400
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_over_60_lines():
    long = {}
    for path in project_sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(REPO).as_posix()}:{node.name}"] = length
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_library_never_imports_a_stage():
    upward = {}
    for path in sorted((REPO / "loraforge").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        stages = sorted(f for f in imported_files(REPO, rel) if f.startswith("stages/"))
        if stages:
            upward[rel] = stages
    assert not upward, f"loraforge modules importing stage code: {upward}"


def test_no_import_cycles():
    graph = {
        p.relative_to(REPO).as_posix(): imported_files(REPO, p.relative_to(REPO).as_posix())
        for pkg in PROJECT_PACKAGES
        for p in (REPO / pkg).rglob("*.py")
    }
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycle = trail[trail.index(dep) :] + [dep] if dep in trail else [node, dep]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, [*trail, dep])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])


def test_stage_deps_are_the_modules_imports_transitively():
    pipeline = load_pipeline(REPO)
    finetune = pipeline.stages["finetune"]
    assert finetune.code[0] == "stages/finetune.py"
    assert "stages/finetune_params.py" in finetune.uses  # defaults of the schema are results too
    assert "loraforge/training/losses.py" in finetune.uses
    assert "loraforge/runner.py" not in finetune.uses  # plumbing: when a stage runs, not what it computes
    resize = pipeline.stages["resize"]
    assert "loraforge/captioners.py" not in resize.uses


def _toy_project(tmp_path: Path) -> Path:
    for name in ("pipeline.yaml", "params.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "loraforge", tmp_path / "loraforge", ignore=shutil.ignore_patterns("__pycache__", "assets"))
    shutil.copytree(REPO / "stages", tmp_path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_a_new_import_becomes_a_dep_and_annotations_do_not(tmp_path):
    project = _toy_project(tmp_path)
    (project / "loraforge" / "extra_helper.py").write_text("VALUE = 1\n")
    (project / "loraforge" / "only_typed.py").write_text("class T: ...\n")
    module = project / "stages" / "resize.py"
    module.write_text(
        module.read_text()
        + "\n\ndef _late():\n    from loraforge.extra_helper import VALUE\n\n    return VALUE\n"
        + "\nif TYPE_CHECKING:\n    from loraforge.only_typed import T\n"
    )
    deps = code_dependencies(project, "stages/resize.py")
    assert "loraforge/extra_helper.py" in deps  # a function-local import counts
    assert "loraforge/only_typed.py" not in deps  # TYPE_CHECKING-only imports do not


def test_a_hand_kept_uses_list_is_refused(tmp_path):
    project = _toy_project(tmp_path)
    spec = yaml.safe_load((project / "pipeline.yaml").read_text())
    spec["stages"]["resize"]["uses"] = ["loraforge/lora.py"]
    (project / "pipeline.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(SpecError, match="stage `resize` lists `uses`; it is derived"):
        load_pipeline(project)
