"""Shared test helpers: a throw-away copy of the project in a temp git + DVC repo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("pipeline.yaml", "params.yaml", "dvc.yaml", ".gitignore")
PROJECT_DIRS = ("stages", "loraforge", "flows", "data/demo")

# Smallest settings that still exercise every stage for real.
FAST_PARAMS: dict[str, dict[str, Any]] = {
    "finetune": {"epochs": 2, "save_every_n_epochs": 1, "batch_size": 2},
    "evaluate": {"seeds": [1], "steps": 2, "size": 64},
}


class RecordingPublisher:
    """Keeps the tables a stage publishes (stands in for the Prefect publisher)."""

    def __init__(self) -> None:
        self.tables: dict[str, list[dict[str, Any]]] = {}

    def table(self, key: str, rows: list[dict[str, Any]], description: str = "") -> None:
        self.tables[key] = rows

    def markdown(self, key: str, text: str, description: str = "") -> None:
        pass

    def progress(self, fraction: float, description: str = "") -> None:
        pass


def env_with_venv() -> dict[str, str]:
    """The environment with this interpreter's bin folder first (so dvc finds `loraforge`)."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env_with_venv())
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def set_params(project: Path, overrides: dict[str, dict[str, Any]]) -> None:
    """Merge `overrides` into the project's params.yaml, section by section."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in overrides.items():
        params.setdefault(section, {}).update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def make_project(dest: Path, params: dict[str, dict[str, Any]] | None = None, git: bool = True) -> Path:
    """Copy the project's declaration, code and demo data into `dest`; a git + DVC repo."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        shutil.copy(REPO / name, dest / name)
    for name in PROJECT_DIRS:
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    (dest / ".dvc").mkdir()
    for name in ("config", ".gitignore"):
        shutil.copy(REPO / ".dvc" / name, dest / ".dvc" / name)
    set_params(dest, {**FAST_PARAMS, **(params or {})})
    if git:
        run(["git", "init", "-q"], dest)
        run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], dest)
        run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "project"], dest)
    return dest


def ran_stages(dvc_output: str) -> list[str]:
    """Stage names `dvc repro` actually ran (its "Running stage 'x':" lines)."""
    return [line.split("'")[1] for line in dvc_output.splitlines() if line.startswith("Running stage '")]
