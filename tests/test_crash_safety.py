"""issue 10: byte-identical reruns, and kill -9 in the middle of a stage under real `dvc repro`:
the next `dvc repro` finishes with the same final LoRA bytes, reuses the per-item work done before
the kill, and leaves no partial file in the item store."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from loraforge.store.fingerprint import hash_tree
from loraforge.store.items import TEMP_NAME, process_alive
from tests.helpers import env_with_venv, make_project, run

pytestmark = pytest.mark.slow


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def report(project: Path, stage: str) -> dict:
    return json.loads((project / "reports" / f"{stage}.json").read_text())


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, str]:
    """A finished demo run and the sha256 of its final LoRA."""
    # six saved epochs: the kill at the first one lands while five are still to train, even on a busy CI machine
    params = {"finetune": {"epochs": 6, "save_every_n_epochs": 1, "batch_size": 2}}
    project = make_project(tmp_path_factory.mktemp("crash") / "project", params)
    run(["dvc", "repro"], project)
    return project, sha256(project / "models" / "lora.safetensors")


def store_entries(project: Path, kind: str) -> list[Path]:
    return sorted((project / ".loraforge" / "store" / kind).rglob("*"))


def partial_files(project: Path) -> list[str]:
    """Temp files left in the item store, each with what its owner process is now (a kept temp
    file's owner must be a live process: `ItemStore.sweep` removes those of dead ones)."""
    found = []
    for path in (project / ".loraforge" / "store").rglob(".tmp-*"):
        owner = TEMP_NAME.match(path.name)
        pid = owner["pid"] if owner else "?"
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
            cmdline = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
        except OSError:
            state, cmdline = "gone", ""
        found.append(f"{path} (pid {pid}: {state} {cmdline[:120]})")
    return found


def wait_until_gone(pids: list[int], timeout: float = 120) -> None:
    """Until every killed process has exited: SIGKILL lands only when a process leaves the kernel
    (an fsync on a busy disk can hold it there), and until then its temp files count as being written."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while process_alive(pid):
            assert time.monotonic() < deadline, f"process {pid} still runs {timeout} s after SIGKILL"
            time.sleep(0.05)


def stage_processes(stage: str) -> list[str]:
    out = subprocess.run(["pgrep", "-f", f"loraforge stage {stage}"], capture_output=True, text=True)
    return out.stdout.split()


def kill_mid_stage(project: Path, stage: str, started: callable, timeout: float = 600) -> None:
    """`dvc repro -f <stage>` in the background; SIGKILL its `loraforge stage` process as soon as
    `started()` says part of the work is done (and before the stage finishes)."""
    dvc = subprocess.Popen(["dvc", "repro", "-f", "-s", stage], cwd=project, env=env_with_venv(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        # the stage's process must be running first: until DVC has deleted the old outputs and
        # started it, `started()` may see the previous run's files
        while not ((out := stage_processes(stage)) and started()):
            assert dvc.poll() is None, f"the stage finished before it could be killed:\n{dvc.stdout.read()}"
            assert time.monotonic() < deadline, "the stage never started its work"
            time.sleep(0.02)
        for pid in out:
            os.kill(int(pid), signal.SIGKILL)
        assert dvc.wait(timeout=120) != 0  # DVC saw its stage die
        wait_until_gone([int(pid) for pid in out])
    finally:
        if dvc.poll() is None:
            dvc.kill()


def test_a_forced_rerun_writes_the_same_lora_bytes(project):
    root, reference = project
    run(["dvc", "repro", "-f"], root)
    assert sha256(root / "models" / "lora.safetensors") == reference


def test_kill_during_latents_then_repro_reuses_the_latents_made_and_gives_the_same_lora(project):
    root, reference = project
    before = hash_tree(root / "data" / "latents")
    shutil.rmtree(root / ".loraforge" / "store" / "latent")
    kill_mid_stage(root, "latents", lambda: len([p for p in store_entries(root, "latent") if p.is_file()]) >= 2)
    made = len([p for p in store_entries(root, "latent") if p.suffix == ".safetensors"])
    # --no-run-cache: the fixture's run already made these outputs from the same deps, and DVC's run
    # cache would check them out instead of running the stage; the point here is the stage's own reuse
    run(["dvc", "repro", "--no-run-cache"], root)
    latents = report(root, "latents")
    assert latents["reused"] >= made >= 1 and latents["computed"] == latents["items"] - latents["reused"]
    assert hash_tree(root / "data" / "latents") == before  # the same latent bytes, whoever wrote them
    assert sha256(root / "models" / "lora.safetensors") == reference
    assert partial_files(root) == []


def test_kill_during_finetune_then_repro_gives_the_same_lora(project):
    root, reference = project
    before = hash_tree(root / "models" / "checkpoints")
    kill_mid_stage(root, "finetune", lambda: (root / "models" / "checkpoints" / "epoch-0001").is_dir())
    assert not (root / "models" / "checkpoints" / "epoch-0006").exists()  # killed mid-training
    run(["dvc", "repro"], root)
    assert hash_tree(root / "models" / "checkpoints") == before
    assert sha256(root / "models" / "lora.safetensors") == reference
    assert partial_files(root) == []


def test_kill_during_evaluate_then_repro_reuses_the_images_rendered(project):
    root, reference = project
    best = (root / "reports" / "eval" / "best.json").read_text()
    shutil.rmtree(root / ".loraforge" / "store" / "eval-image")
    kill_mid_stage(
        root, "evaluate", lambda: len([p for p in store_entries(root, "eval-image") if p.suffix == ".png"]) >= 3
    )
    rendered = len([p for p in store_entries(root, "eval-image") if p.suffix == ".png"])
    run(["dvc", "repro", "--no-run-cache"], root)  # the stage itself, not DVC's run cache (see above)
    evaluate = report(root, "evaluate")
    assert evaluate["reused"] >= rendered >= 3
    assert (root / "reports" / "eval" / "best.json").read_text() == best
    assert sha256(root / "models" / "lora.safetensors") == reference
    assert partial_files(root) == []
