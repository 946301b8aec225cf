"""One run at a time per project: a second `loraforge stage` / `loraforge run` stops at once naming
the holder, or waits with `--wait`; a killed holder's lock is taken over (real processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loraforge.pipeline.lock import ProjectLocked, project_lock
from tests.helpers import FAST_MODEL, env_with_venv, make_project

HOLD = """
import sys, time
from pathlib import Path
from loraforge.pipeline.lock import project_lock
with project_lock(Path(sys.argv[1]), "loraforge run"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "p", {"model": FAST_MODEL}, git=False)


def hold(project: Path, seconds: float) -> subprocess.Popen:
    """A process holding the project's lock for `seconds` (returns once it holds it)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(project / ".loraforge"), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
        env=env_with_venv(),
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def loraforge(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loraforge", *args], cwd=project, capture_output=True, text=True, env=env_with_venv()
    )


def test_a_second_run_stops_at_once_naming_the_holder_and_touches_nothing(project):
    holder = hold(project, 120)
    try:
        for args in (["stage", "ingest"], ["run"]):
            result = loraforge(project, *args)
            assert result.returncode == 2, result.stderr
            line = result.stderr.strip().splitlines()[-1]
            assert f"pid {holder.pid} on " in line and "(`loraforge run`) since " in line and "--wait" in line
        assert not (project / "data" / "ingested").exists()  # the stage never started
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_run_is_taken_over(project):
    holder = hold(project, 120)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    result = loraforge(project, "stage", "ingest")
    assert result.returncode == 0, result.stderr
    assert (project / "data" / "ingested" / "manifest.jsonl").is_file()


def test_wait_runs_once_the_holder_finishes(project):
    holder = hold(project, 3)
    started = time.monotonic()
    result = loraforge(project, "stage", "ingest", "--wait")
    assert result.returncode == 0, result.stderr
    assert f"waiting for pid {holder.pid}" in result.stderr and holder.wait() == 0
    assert time.monotonic() - started >= 2  # it did wait for the holder's sleep


def test_the_lock_is_exclusive_within_a_process_too_and_free_after(tmp_path):
    with project_lock(tmp_path, "loraforge stage ingest"):
        with pytest.raises(ProjectLocked, match="loraforge stage ingest"):
            with project_lock(tmp_path, "loraforge run"):
                pass
    with project_lock(tmp_path, "loraforge run"):  # released: taken again
        assert '"command": "loraforge run"' in (tmp_path / "lock").read_text()
    assert (tmp_path / "lock").read_text() == ""  # no holder left behind
