"""Shared test helpers: a throw-away copy of the project in a temp git + DVC repo."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any, Iterator

import yaml

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("pipeline.yaml", "params.yaml", "dvc.yaml", ".gitignore")
PROJECT_DIRS = ("stages", "loraforge", "flows", "data/demo", "data/demo-reg", "data/demo-val")

# Smallest settings that still exercise every stage for real: the seeded random tiny model, whatever
# params.yaml's base (the learned `builtin:shapes-sdxl` has its own tests, tests/test_learned_model.py).
FAST_MODEL: dict[str, Any] = {"base": "builtin:tiny-sdxl"}
FAST_PARAMS: dict[str, dict[str, Any]] = {
    "finetune": {"epochs": 2, "save_every_n_epochs": 1, "batch_size": 2},
    "evaluate": {"seeds": [1], "steps": 2, "size": 64},
}
# What params.yaml holds for the learned demo, put back as the tiny random model wants it: under a
# test's own keys of the same section (a test's section replaces FAST_PARAMS' whole section, as before).
TINY_MODEL_PARAMS: dict[str, dict[str, Any]] = {
    "caption": {"trigger": "lfxstyle", "trigger_position": "first", "template": "{trigger} {class_token}"},
    "finetune": {
        "epochs": 4,
        "save_every_n_epochs": 2,
        "lr": 0.0003,
        "train_text_encoder": True,
        "unet_layers": "all",
        "reg_images": None,
        "validation_folder": None,
    },
    "extract": {"conv_dim": 0},
    "resize": {"rank": 8},
    "evaluate": {
        "prompts": ["{trigger}", "{trigger} riding a bicycle on the moon, detailed"],
        "random_template": "{trigger}, {subject}",
        "steps": 6,
    },
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


@contextlib.contextmanager
def captured_messages() -> Iterator[list[str]]:
    """Collect warnings and WARNING+ log records of diffusers, transformers and peft."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers", "peft")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages += [str(w.message) for w in caught]
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def run_ingest(source: Path, work: Path, publish: Any = None, **params: Any) -> tuple[dict[str, Any], Path]:
    """Run the ingest stage as the runner would: fresh output folder, a store that persists in `work`."""
    from loraforge.pipeline.runner import Paths, StageEnv
    from loraforge.store.items import ItemStore
    from stages import ingest as ingest_stage

    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = StageEnv(store=ItemStore(work / "store"), state_dir=work / "state", show_progress=False)
    if publish is not None:
        env.publish = publish
    summary = ingest_stage.run(
        ingest_stage.Params(source=str(source), **params), Paths(source=source), Paths(images=out), env
    )
    return summary, out


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from loraforge.lora.extraction import ExtractSettings, extract_component

    def status(field):  # bytes, from this process's own memory map (ru_maxrss would carry the parent's peak over exec)
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    torch.linalg.svd(torch.randn(64, 64)); torch.svd_lowrank(torch.randn(300, 300), q=20)  # load LAPACK first
    before = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    settings = ExtractSettings(dim=int(sys.argv[3]), svd="lowrank", save_dtype="float16")
    tensors, _ = extract_component("sd15", "unet", [Path(sys.argv[1])], [Path(sys.argv[2])], settings,
                                   log=lambda s: None)
    peak = status("VmHWM")
    print(json.dumps({"growth": peak - before, "before": before, "layers": len(tensors) // 3,
                      "lora_bytes": sum(t.numel() * t.element_size() for t in tensors.values())}))
    """
)


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


def make_project(
    dest: Path, params: dict[str, dict[str, Any]] | None = None, git: bool = True, learned: bool = False
) -> Path:
    """Copy the project's declaration, code and demo data into `dest`; a git + DVC repo.

    The tiny random model with the fast settings, under `params`; `learned`: params.yaml's own
    demo (the learned `builtin:shapes-sdxl`) under `params`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        shutil.copy(REPO / name, dest / name)
    for name in PROJECT_DIRS:
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    (dest / ".dvc").mkdir()
    for name in ("config", ".gitignore"):
        shutil.copy(REPO / ".dvc" / name, dest / ".dvc" / name)
    params = dict(params or {})
    if not learned:
        params["model"] = {**FAST_MODEL, **params.get("model", {})}  # a test's model keys on top of the tiny base
        params = {**FAST_PARAMS, **params}
        for section, values in TINY_MODEL_PARAMS.items():
            params[section] = {**values, **params.get(section, {})}
    set_params(dest, params)
    if git:
        run(["git", "init", "-q"], dest)
        run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], dest)
        run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "project"], dest)
    return dest


def ran_stages(dvc_output: str, guard: bool = False) -> list[str]:
    """Stage names `dvc repro` actually ran (its "Running stage 'x':" lines); the params guard
    stage `check` (which reruns whenever params.yaml changes) only with `guard`."""
    ran = [line.split("'")[1] for line in dvc_output.splitlines() if line.startswith("Running stage '")]
    return ran if guard else [name for name in ran if name != "check"]


def one_torch_thread() -> Iterator[None]:
    """A module fixture's body: one torch thread while the module's tests run (small forwards and
    steps; on a shared machine more threads only contend), the old count after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
