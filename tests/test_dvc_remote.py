"""A DVC remote on S3 (a real SeaweedFS server): a fresh clone pulls a finished run and
recomputes nothing, checkpoints and extracted LoRAs included (they are cached DVC outputs, hard
links to DVC's cache: no second copy on disk)."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import pytest

from tests.helpers import make_project, ran_stages, run
from tests.s3server import S3Server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # a whole training run, on shared CPUs
GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
# The fewest renders that still run evaluate for real: the remote is what is tested here.
SMALL_EVAL = {"evaluate": {"prompts": ["{trigger}"], "weights": [0.0, 1.0], "random_prompts": 0, "caption_prompts": 0}}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cache_inodes(project: Path) -> set[int]:
    return {p.stat().st_ino for p in (project / ".dvc" / "cache").rglob("*") if p.is_file()}


def test_a_clone_pulls_the_run_from_the_s3_remote_and_reruns_nothing(tmp_path, monkeypatch, s3_server: S3Server):
    for name, value in s3_server.env.items():  # credentials through the environment, never in .dvc/config
        monkeypatch.setenv(name, value)
    first = make_project(tmp_path / "first", SMALL_EVAL)
    assert ran_stages(run(["dvc", "repro"], first).stdout)[-1] == "evaluate"
    cached = cache_inodes(first)
    for folder in ("models/checkpoints", "models/extracted", "data/latents"):
        files = [p for p in (first / folder).rglob("*") if p.is_file()]
        assert files and all(p.stat().st_ino in cached for p in files), f"{folder}: copies, not links to the cache"
    latent = next((first / "data" / "latents").glob("*.safetensors"))
    assert latent.stat().st_nlink >= 3, "output, item store entry and DVC cache: one file on disk"
    run(["dvc", "remote", "add", "-d", "storage", s3_server.url(f"dvc-{uuid.uuid4().hex[:12]}")], first)
    run(["dvc", "remote", "modify", "storage", "endpointurl", s3_server.endpoint], first)
    run([*GIT, "add", "-A"], first)
    run([*GIT, "commit", "-qm", "a finished run"], first)
    pushed = run(["dvc", "push", "--run-cache"], first).stdout
    assert "pushed" in pushed, pushed
    assert s3_server.env["AWS_SECRET_ACCESS_KEY"] not in (first / ".dvc" / "config").read_text()

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(first), str(clone)], tmp_path)
    assert not (clone / "models").exists() and not (clone / ".loraforge").exists()
    run(["dvc", "pull", "--run-cache"], clone)
    assert sorted(p.name for p in (clone / "models" / "checkpoints").iterdir()) == sorted(
        p.name for p in (first / "models" / "checkpoints").iterdir()
    )
    result = run(["dvc", "repro"], clone)
    assert ran_stages(result.stdout) == [], result.stdout
    assert sha256(clone / "models" / "lora.safetensors") == sha256(first / "models" / "lora.safetensors")
    assert json.loads(run(["dvc", "status", "--json"], clone).stdout) == {"check": ["always changed"]}  # the guard
