"""One run at a time per project: `loraforge stage`, `loraforge run` (and what else changes the
outputs) hold `.loraforge/lock` while they work.

The lock is an exclusive `flock` on that file, so the kernel drops it when its holder dies in any
way (kill -9 included): a dead run's lock is taken over by the next one with no cleanup step.
The holder writes who it is (pid, host, command, start time) into the file, and a run that finds
the project locked stops at once with one line naming that holder, or waits for it (`--wait`).

Within one `loraforge run` the flow's stages run under the flow's lock (they call `run_stage`,
not the command line). Between two stages of `dvc repro` (each a `loraforge stage` process) the
lock is free for a moment; DVC's own lock keeps a second `dvc repro` out.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Iterator

from loraforge.errors import StopRun

LOCK_FILE = "lock"  # under the project's state folder (.loraforge)


class ProjectLocked(StopRun, BlockingIOError):
    """Another loraforge process holds the project's lock."""


def holder_record(command: str) -> dict[str, object]:
    """Who holds the lock: pid, host, the command and when it started (UTC, ISO 8601).

    Args:
        command: the command line that took the lock.
    """
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def describe_holder(handle: IO[str]) -> str:
    """The holder line of a lock file held by another process ("an unknown process" when it has
    not written itself in yet).

    Args:
        handle: the lock file, open for reading.
    """
    handle.seek(0)
    try:
        who = json.loads(handle.read() or "null")
    except ValueError:
        who = None
    if not isinstance(who, dict):
        return "an unknown process"
    return f"pid {who.get('pid')} on {who.get('host')} (`{who.get('command')}`) since {who.get('since')}"


def write_holder(handle: IO[str], command: str) -> None:
    """Replace the lock file's content with this process's holder record.

    Args:
        handle: the lock file, locked by this process.
        command: the command line that took the lock.
    """
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(holder_record(command)) + "\n")
    handle.flush()


@contextmanager
def project_lock(state_dir: Path, command: str, wait: bool = False) -> Iterator[None]:
    """Hold the project's lock for the `with` body.

    Args:
        state_dir: the project's `.loraforge` folder (created when missing).
        command: the command line, for the holder line others see.
        wait: wait for the holder to finish instead of stopping.

    Raises:
        ProjectLocked: the project is locked and `wait` is False; the message names the holder.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOCK_FILE
    with open(path, "a+", encoding="utf-8") as handle:
        acquire(handle, path, wait)
        try:
            write_holder(handle, command)
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def acquire(handle: IO[str], path: Path, wait: bool) -> None:
    """Take the exclusive lock on `handle`, at once or (with `wait`) when its holder lets go.

    Args:
        handle: the lock file.
        path: its path (for the message).
        wait: block until the lock is free.
    """
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        holder = describe_holder(handle)
    if not wait:
        raise ProjectLocked(f"{path}: the project is busy: {holder} is running; wait for it, stop it, or pass --wait")
    print(f"loraforge: waiting for {holder} to finish ({path})", file=sys.stderr, flush=True)
    started = time.monotonic()
    fcntl.flock(handle, fcntl.LOCK_EX)
    print(f"loraforge: got the project lock after {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
