"""The item store's local folder: atomic puts, temp files that name their owner, and the sweep
that removes those of killed processes (a real child killed with SIGKILL mid-put) and never a
live process's."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from loraforge.store.items import TEMP_NAME, ItemStore, hostname, process_alive, temp_file
from tests.helpers import env_with_venv

# Puts one entry whose `write` stalls after writing part of the file, as a long save would.
STALLED_PUT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from loraforge.store.items import ItemStore

    def write(path):
        path.write_bytes(b"half a png")
        print(path.name, flush=True)
        time.sleep(600)

    ItemStore(Path(sys.argv[1])).item("upscaled", image=sys.argv[2]).put(".png", write)
    """
)


def stalled_put(root: Path, image: str) -> tuple[subprocess.Popen, Path]:
    """A child process stopped in the middle of `Item.put`; returns it and its temp file."""
    child = subprocess.Popen(
        [sys.executable, "-c", STALLED_PUT, str(root), image], stdout=subprocess.PIPE, text=True, env=env_with_venv()
    )
    name = child.stdout.readline().strip()
    assert name, "the child did not reach the write"
    (tmp,) = root.glob(f"*/*/{name}")
    return child, tmp


def test_put_is_atomic_and_leaves_no_temp_file(tmp_path):
    store = ItemStore(tmp_path / "store")
    entry = store.item("upscaled", image="a")
    assert entry.get(".png") is None
    path = entry.put_bytes(".png", b"png bytes")
    assert path == entry.path(".png") == entry.get(".png") and path.read_bytes() == b"png bytes"
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in path.parent.iterdir()] == [path.name]

    def failing(p: Path) -> None:
        p.write_bytes(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.item("upscaled", image="b").put(".png", failing)
    assert store.item("upscaled", image="b").get(".png") is None
    assert not list(store.root.glob("*/*/.tmp-*"))


def test_temp_files_name_host_and_process(tmp_path):
    tmp = temp_file(tmp_path / "x", ".safetensors")
    found = TEMP_NAME.match(tmp.name)
    assert found and found["host"] == hostname() and int(found["pid"]) == os.getpid()
    assert tmp.name.startswith(f".tmp-{hostname()}-{os.getpid()}-") and tmp.name.endswith(".safetensors")
    dashed = TEMP_NAME.match(".tmp-ip-10-0-0-1-4242-abc_1234.png")
    assert (dashed["host"], dashed["pid"]) == ("ip-10-0-0-1", "4242")


def test_a_put_killed_with_sigkill_leaves_a_temp_file_the_sweep_removes(tmp_path):
    store = ItemStore(tmp_path / "store")
    killed, killed_tmp = stalled_put(store.root, "killed")
    alive, alive_tmp = stalled_put(store.root, "alive")
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()  # reaped: its pid is gone (a zombie would count as dead too)
        assert killed_tmp.read_bytes() == b"half a png", "SIGKILL runs no `finally`: the partial file stays"
        assert not process_alive(killed.pid) and process_alive(alive.pid)
        other_host = killed_tmp.with_name(f".tmp-some-other-host-{killed.pid}-abcdefgh.png")
        other_host.write_bytes(b"")
        unknown = killed_tmp.with_name(".tmp-abcdefgh.png")  # mkstemp's old names tell no owner
        unknown.write_bytes(b"")

        assert store.sweep() == [killed_tmp]
        assert not killed_tmp.exists() and store.item("upscaled", image="killed").get(".png") is None
        assert alive_tmp.read_bytes() == b"half a png", "a live process's temp file is never swept"
        assert other_host.exists() and unknown.exists()
        assert store.sweep() == []
    finally:
        alive.kill()
        alive.wait()
    assert store.sweep() == [alive_tmp]


def test_the_sweep_keeps_this_process_own_temp_files(tmp_path):
    store = ItemStore(tmp_path / "store")
    mine = temp_file(store.root / "upscaled" / "ab", ".png")
    assert store.sweep() == [] and mine.exists()
    assert ItemStore(tmp_path / "nothing-yet").sweep() == []


def test_a_local_store_pickles(tmp_path):
    store = ItemStore(tmp_path / "store")
    entry = store.item("upscaled", image="a")
    entry.put_bytes(".png", b"x")
    again = pickle.loads(pickle.dumps(entry))
    assert again.get(".png").read_bytes() == b"x" and again.store.remote is None
