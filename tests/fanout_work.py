"""Work wrappers for the fan-out tests. They run inside Dask worker processes, so they live in an
importable module (workers import it by name), not inside a test function."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any


def die_once_mid_write(marker: Path, work: Any, job: Any, chunk: list[Any]) -> Any:
    """The first chunk to get here kills its own process with SIGKILL halfway through writing a
    real store entry (a half-written temp file is left behind, as a crash would); every later
    call (the rescheduled chunk included) just does the work."""
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        first = chunk[0][0] if isinstance(chunk[0], list) else chunk[0]
        from loraforge.store.items import Item

        def half_then_die(path: Path) -> None:
            path.write_bytes(b"half a latent")
            os.kill(os.getpid(), signal.SIGKILL)

        Item(job.store, "latent", first["key"]).put(".safetensors", half_then_die)
    return work(job, chunk)
