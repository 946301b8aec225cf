"""The house rules, checked on the code itself: the library in packages by concern whose imports
point one way (each package's `__init__.py` declares `MAY_IMPORT`), never reaching up into a stage,
no import cycles, and stage deps read off the imports.

Module and function length are guidance (docs/development.md), not rules: modules are cut where
concepts part."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
import yaml

from loraforge.pipeline.codedeps import PROJECT_PACKAGES, code_dependencies, imported_files
from loraforge.pipeline.spec import SpecError, load_pipeline

REPO = Path(__file__).resolve().parents[1]
# modules at the package's root: the ground floor every package may import, and the command line on top
GROUND = frozenset({"errors"})
TOP = frozenset({"cli", "__main__", "__init__"})


def declared_layers(root: Path) -> dict[str, tuple[str, ...]]:
    """{package: MAY_IMPORT} read (not imported) from each `loraforge/<package>/__init__.py`."""
    layers = {}
    for init in sorted((root / "loraforge").glob("*/__init__.py")):
        tree = ast.parse(init.read_text())
        assert ast.get_docstring(tree), f"{init.relative_to(root)} has no docstring saying what the package is for"
        values = [
            node.value
            for node in tree.body
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "MAY_IMPORT" for t in node.targets)
        ]
        assert values, f"{init.relative_to(root)} does not declare MAY_IMPORT"
        layers[init.parent.name] = tuple(ast.literal_eval(values[0]))
    return layers


def room(path: str) -> str:
    """`store` for `loraforge/store/items.py`, `errors` for `loraforge/errors.py`."""
    parts = path.split("/")
    return parts[1].removesuffix(".py")


def layering_violations(root: Path) -> list[str]:
    """Each runtime import of a library module that its package's MAY_IMPORT does not allow."""
    layers = declared_layers(root)
    found = []
    for path in sorted((root / "loraforge").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        here = room(rel)
        if here in TOP:
            continue
        allowed = {here, *GROUND, *layers.get(here, ())}
        if here not in layers and here not in GROUND:
            found.append(f"{rel}: a module outside every package (put it in the package of its concern)")
            continue
        for dep in sorted(imported_files(root, rel)):
            if dep.startswith("loraforge/") and room(dep) not in allowed:
                found.append(f"{rel} imports {dep}: `{here}` may import {sorted(allowed - {here})}")
    return found


def test_every_package_says_what_it_is_for_and_the_layers_are_acyclic():
    layers = declared_layers(REPO)
    assert {"store", "pipeline", "models", "data", "lora", "training", "evaluation", "planning"} <= set(layers)
    for package, allowed in layers.items():
        unknown = set(allowed) - set(layers)
        assert not unknown, f"loraforge/{package}/__init__.py: MAY_IMPORT names unknown packages {unknown}"
    order: list[str] = []  # a topological order exists iff the declared relation has no cycle
    while len(order) < len(layers):
        ready = sorted(p for p, allowed in layers.items() if p not in order and set(allowed) <= set(order))
        assert ready, f"MAY_IMPORT has a cycle among {sorted(set(layers) - set(order))}"
        order.extend(ready)


def test_imports_point_down_the_declared_layers():
    violations = layering_violations(REPO)
    assert not violations, "\n".join(violations)


def test_an_upward_import_is_reported(tmp_path):
    project = _toy_project(tmp_path)
    items = project / "loraforge" / "store" / "items.py"
    items.write_text(items.read_text() + "\n\ndef _up():\n    from loraforge.training.losses import LossSettings\n")
    (project / "loraforge" / "loose.py").write_text("VALUE = 1\n")
    violations = layering_violations(project)
    assert any(v.startswith("loraforge/store/items.py imports loraforge/training/losses.py") for v in violations)
    assert any(v.startswith("loraforge/loose.py: a module outside every package") for v in violations)


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
    assert "loraforge/pipeline/runner.py" not in finetune.uses  # plumbing: when a stage runs, not what it computes
    resize = pipeline.stages["resize"]
    assert "loraforge/captioning/captioners.py" not in resize.uses


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
    spec["stages"]["resize"]["uses"] = ["loraforge/lora/format.py"]
    (project / "pipeline.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(SpecError, match="stage `resize` lists `uses`; it is derived"):
        load_pipeline(project)
