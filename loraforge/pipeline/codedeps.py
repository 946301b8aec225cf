"""Which source files a stage's result depends on: its module and everything it imports.

A stage's DVC deps (and its Prefect cache key) must name every project file whose change can
change its outputs. Kept by hand, such lists drift; here they are read off the code: an AST walk
from the stage module through every `loraforge.*` and `stages.*` import, transitively, including
imports inside functions. Imports under `if TYPE_CHECKING:` are annotations only and are skipped.
Package `__init__.py` files count only when the package itself is imported by name.

The pipeline's own machinery (`PLUMBING`: reading pipeline.yaml, running a stage, this walk) is
left out, and not walked through: it decides when and where a stage runs, not what it computes.
The params schema (`loraforge/pipeline/params.py`, `stages/<name>_params.py`) is in: its defaults are results.

Imports nothing heavy: `loraforge.pipeline.spec` calls it while loading pipeline.yaml.
"""

from __future__ import annotations

import ast
import importlib.util
from functools import lru_cache
from pathlib import Path

PROJECT_PACKAGES = ("loraforge", "stages", "flows")
PLUMBING = frozenset({"loraforge/pipeline/spec.py", "loraforge/pipeline/codedeps.py", "loraforge/pipeline/runner.py"})


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of `tree` except the bodies of `if TYPE_CHECKING:` blocks."""
    found: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        found.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return found


def module_file(root: Path, dotted: str) -> str | None:
    """`loraforge/store/items.py` for `loraforge.store.items`, the package's `__init__.py` for a package,
    None when the name is not a file of the project."""
    if dotted.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = dotted.replace(".", "/")
    if (root / f"{base}.py").is_file():
        return f"{base}.py"
    if (root / base / "__init__.py").is_file():
        return f"{base}/__init__.py"
    return None


def imported_files(root: Path, path: str) -> set[str]:
    """Project files that `path` (project-relative) imports at run time, directly."""
    tree = ast.parse((root / path).read_text(encoding="utf-8"), filename=path)
    found: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from loraforge.training import resume` names a module; `from loraforge.store.items import X` a name
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [n for n in names if module_file(root, n)] or [node.module]
        else:
            continue
        found |= {f for f in (module_file(root, n) for n in names) if f}
    return found


def installed_code_root(module: str) -> Path | None:
    """The folder holding the importable copy of `module` (`stages/latents.py`), or None."""
    dotted = module.removesuffix(".py").replace("/", ".")
    try:
        spec = importlib.util.find_spec(dotted)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    origin = Path(spec.origin).resolve()
    return origin.parents[len(dotted.split(".")) - 1]


@lru_cache(maxsize=64)
def _closure(root: Path, module: str, stamp: tuple[tuple[str, float], ...]) -> tuple[str, ...]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        for dep in imported_files(root, todo.pop()) - seen - PLUMBING - {module}:
            seen.add(dep)
            todo.append(dep)
    return tuple(sorted(seen))


def code_dependencies(root: Path, module: str) -> tuple[str, ...]:
    """Sorted project files that `module` (e.g. `stages/latents.py`) imports, transitively.

    Args:
        root: the project folder.
        module: the stage module, project-relative.
    """
    root = Path(root).resolve()
    if not (root / module).is_file():
        raise FileNotFoundError(f"{root / module} not found")
    stamp = tuple(
        sorted((p.as_posix(), p.stat().st_mtime) for pkg in PROJECT_PACKAGES for p in (root / pkg).rglob("*.py"))
    )
    return _closure(root, module, stamp)
