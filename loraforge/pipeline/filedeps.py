"""Files that params point at (`upscale.model_path`, `model.base`, `finetune.reg_images`...): real inputs.

DVC tracks a param's value, so replacing the file behind an unchanged path would rerun nothing.
pipeline.yaml lists such params per stage under `files:`; their content hashes decide reruns:

- under `dvc repro`, the always-run `check` stage writes `reports/inputs/<stage>.json` (the
  hashes), a DVC dep of that stage: its bytes change exactly when one of its files does;
- under `loraforge run`, the same hashes are part of the stage's Prefect cache key.

A param that is null, or names no existing path (a Hugging Face id, `builtin:tiny-sdxl`), counts
by its value, which DVC already tracks. A shipped builtin (`builtin:shapes-sdxl`: trained weights
in `loraforge/assets/builtin/`) counts by its folder's content, like a local model folder. Hashes
are cached by (path, size, mtime) in `.loraforge/hashcache.json`, so a 7 GB checkpoint is read
once, not on every run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loraforge.store.fingerprint import hash_json, iter_files
from loraforge.pipeline.spec import StageSpec, param_ref

INPUTS_DIR = "reports/inputs"
BUILTIN_PREFIX = "builtin:"
SHIPPED_MODELS = Path(__file__).resolve().parents[1] / "assets" / "builtin"  # the trained builtins' folders


def param_value(raw_params: dict[str, Any], ref: str) -> Any:
    """The params.yaml value at `section.key` (None when absent)."""
    node: Any = raw_params
    for part in ref.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def existing_path(root: Path, value: Any) -> Path | None:
    """`value` as an existing file or folder (relative to the project, or absolute; a shipped
    builtin's folder), else None."""
    if not isinstance(value, str) or not value:
        return None
    if value.startswith(BUILTIN_PREFIX):
        shipped = SHIPPED_MODELS / value.removeprefix(BUILTIN_PREFIX)
        return shipped if (shipped / "model_index.json").is_file() else None
    path = (Path(root) / value).resolve()
    return path if path.exists() else None


def stage_files(root: Path, stage: StageSpec, raw_params: dict[str, Any]) -> dict[str, Path]:
    """The stage's `files` that exist, by name, as absolute paths (what the runner hands the stage)."""
    found = {}
    for name, ref in stage.files.items():
        path = existing_path(root, param_value(raw_params, param_ref(ref) or ""))
        if path is not None:
            found[name] = path
    return found


def hash_path(path: Path, cache: Any) -> str:
    """Content hash of a file, or of a folder's relative names and file contents (hidden files skipped)."""
    if path.is_file():
        return cache.hash(path)
    return hash_json({f.relative_to(path).as_posix(): cache.hash(f) for f in iter_files(path)})


def file_fingerprints(root: Path, stage: StageSpec, raw_params: dict[str, Any], cache: Any) -> dict[str, str]:
    """`{param: content hash}` for the stage's file params that name an existing path.

    Args:
        root: the project folder.
        stage: the stage spec (its `files`).
        raw_params: the params.yaml mapping.
        cache: a `HashCache` (hashes by path, size and mtime).
    """
    found = stage_files(root, stage, raw_params)
    return {param_ref(stage.files[name]) or name: hash_path(path, cache) for name, path in sorted(found.items())}


def write_fingerprints(root: Path, stages: list[StageSpec], raw_params: dict[str, Any], cache: Any) -> None:
    """Write `reports/inputs/<stage>.json` for every stage (unchanged bytes when nothing changed)."""
    folder = Path(root) / INPUTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        text = json.dumps({"files": file_fingerprints(root, stage, raw_params, cache)}, sort_keys=True) + "\n"
        target = folder / f"{stage.name}.json"
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")
