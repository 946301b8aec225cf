"""The item store shared through S3: a real server (SeaweedFS `weed mini`, `tests/s3server.py`)
and real s3fs. Two machines are two local folders over the same `s3://bucket/prefix`."""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from loraforge.errors import InputError
from loraforge.store.fingerprint import hash_tree
from loraforge.pipeline.params import ParamsError, load_settings
from loraforge.store.remote import RemoteStore, open_store
from loraforge.pipeline.runner import run_stage
from loraforge.store.items import ItemStore
from loraforge.data.craft import _derived
from tests.helpers import env_with_venv, make_project, set_params
from tests.s3server import S3Server, free_ports

NO_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


@pytest.fixture
def creds(monkeypatch: pytest.MonkeyPatch, s3_server: S3Server) -> S3Server:
    """The server's credentials in the environment (where users keep them); no stray endpoint."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    return s3_server


@pytest.fixture
def url(creds: S3Server) -> str:
    """A prefix of the test bucket no other test uses."""
    return creds.url(f"store-{uuid.uuid4().hex[:12]}")


def machine(root: Path, url: str, server: S3Server) -> ItemStore:
    """One machine's store: its own local folder, the shared remote."""
    return ItemStore(root, RemoteStore(url, server.endpoint))


def no_make(path: Path) -> None:
    raise AssertionError("recomputed an entry the shared store has")


def test_what_one_machine_puts_the_other_gets_without_recomputing(tmp_path, url, creds):
    a, b = machine(tmp_path / "a", url, creds), machine(tmp_path / "b", url, creds)
    path_a, made = a.cached("upscaled", {"image": "p1"}, ".png", lambda p: p.write_bytes(b"upscaled pixels"))
    assert made and path_a.parent.is_relative_to(tmp_path / "a")
    path_b, made = b.cached("upscaled", {"image": "p1"}, ".png", no_make)
    assert not made and path_b.parent.is_relative_to(tmp_path / "b") and path_b.read_bytes() == b"upscaled pixels"

    entry = a.item("ingested-image", source="s1", background="#fff")
    entry.put_bytes(".png", b"png")
    entry.put_bytes(".json", b'{"width": 1}')
    key = f"{url.removeprefix('s3://')}/ingested-image/{entry.key[:2]}/{entry.key}"
    assert sorted(creds.filesystem().ls(key.rsplit("/", 1)[0])) == [f"{key}.json", f"{key}.png"]
    other = b.item("ingested-image", source="s1", background="#fff")
    assert other.get(".png").read_bytes() == b"png" and other.get(".json").read_bytes() == b'{"width": 1}'
    third = machine(tmp_path / "c", url, creds).item("ingested-image", source="s1", background="#fff")
    assert third.path(".json").read_bytes() == b'{"width": 1}', "`path` fetches what only the remote has"
    assert b.item("upscaled", image="never made").get(".png") is None
    assert not list((tmp_path / "b").rglob(".tmp-*")) and not list((tmp_path / "c").rglob(".tmp-*"))


def test_the_store_pickles_without_its_connection_and_works_in_another_process(tmp_path, url, creds):
    store = machine(tmp_path / "a", url, creds)
    assert store.remote._fs is None, "the filesystem is made on first use, not in __init__"
    entry = store.item("upscaled", image="p1")
    entry.put_bytes(".png", b"pixels")
    assert store.remote._fs is not None
    data = pickle.dumps(store.item("upscaled", image="p1"))
    assert creds.env["AWS_SECRET_ACCESS_KEY"].encode() not in data, "credentials never travel in the pickle"
    assert pickle.loads(data).store.remote._fs is None

    (tmp_path / "item.pickle").write_bytes(
        pickle.dumps(machine(tmp_path / "worker", url, creds).item("upscaled", image="p1"))
    )
    worker = "import pickle, sys; print(pickle.load(open(sys.argv[1], 'rb')).get('.png').read_bytes().decode())"
    out = subprocess.run(
        [sys.executable, "-c", worker, str(tmp_path / "item.pickle")],
        capture_output=True, text=True, env=env_with_venv(), check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "pixels"


# Makes a derived image the way ingest does (`.png`, then the `.json` that marks it complete) and
# stalls while writing the `.json`: the `.png` is uploaded, the `.json` never is.
STALLED_PAIR = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from loraforge.store.remote import RemoteStore
    from loraforge.store.items import ItemStore

    def stall(path):
        print("uploaded the png", flush=True)
        time.sleep(600)

    entry = ItemStore(Path(sys.argv[1]), RemoteStore(sys.argv[2], sys.argv[3])).item("cleaned-image", image="i1")
    entry.put_bytes(".png", b"first pixels")
    entry.put(".json", stall)
    """
)


def test_a_pair_whose_upload_was_killed_after_the_first_file_counts_as_absent_and_is_redone(tmp_path, url, creds):
    child = subprocess.Popen(
        [sys.executable, "-c", STALLED_PAIR, str(tmp_path / "killed"), url, creds.endpoint],
        stdout=subprocess.PIPE, text=True, env=env_with_venv(),
    )  # fmt: skip
    assert child.stdout.readline().strip() == "uploaded the png"
    child.send_signal(signal.SIGKILL)
    child.wait()
    entry = machine(tmp_path / "b", url, creds).item("cleaned-image", image="i1")
    fs, key = creds.filesystem(), f"{url.removeprefix('s3://')}/cleaned-image/{entry.key[:2]}/{entry.key}"
    assert fs.cat(f"{key}.png") == b"first pixels" and not fs.exists(f"{key}.json")

    from PIL import Image

    made = []

    def make() -> tuple[Image.Image, dict]:
        made.append(1)
        return Image.new("RGB", (4, 4), "red"), {"psnr": 40.0}

    png, meta, reused = _derived(entry, make)  # the stage code's own check: both files or redo
    assert not reused and made == [1] and meta["psnr"] == 40.0
    assert fs.exists(f"{key}.json") and fs.cat(f"{key}.png") == png.read_bytes() != b"first pixels"
    again = machine(tmp_path / "c", url, creds).item("cleaned-image", image="i1")
    assert _derived(again, make)[2] and made == [1], "complete now: a third machine reuses it"


@pytest.mark.slow
def test_a_fresh_project_sharing_the_store_computes_nothing(tmp_path, url, creds):
    store = {"store": {"url": url, "endpoint_url": creds.endpoint}}
    a = make_project(tmp_path / "a", store, git=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = a / ".loraforge" / "store" / "upscaled" / "00" / f".tmp-{_host()}-{dead.stdout.strip()}-abcdefgh.png"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half")
    first = {name: run_stage(a, name)["report"] for name in ("ingest", "upscale")}
    assert not leftover.exists(), "run_stage sweeps the temp files of dead processes first"
    assert first["ingest"]["computed"] == first["ingest"]["items"] > 0 and first["upscale"]["computed"] > 0

    b = make_project(tmp_path / "b", store, git=False)
    second = {name: run_stage(b, name)["report"] for name in ("ingest", "upscale")}
    assert second["ingest"]["computed"] == 0 and second["ingest"]["reused"] == first["ingest"]["items"]
    assert second["upscale"]["computed"] == 0 and second["upscale"]["reused"] == first["upscale"]["computed"]
    assert hash_tree(b / "data" / "upscaled") == hash_tree(a / "data" / "upscaled")


def _host() -> str:
    from loraforge.store.items import hostname

    return hostname()


def test_bad_store_urls_stop_with_the_key_named(tmp_path):
    project = make_project(tmp_path / "p", git=False)
    for bad in ("gs://bucket/x", "s3://B/x", "s3://"):
        set_params(project, {"store": {"url": bad}})
        with pytest.raises(ParamsError, match=r"`store\.url` = "):
            load_settings(project)
        with pytest.raises(InputError, match=r"`store\.url` = "):
            RemoteStore(bad)
    set_params(project, {"store": {"url": "s3://bucket/x", "endpoint_url": "localhost:8333"}})
    with pytest.raises(ParamsError, match=r"`store\.endpoint_url` = 'localhost:8333'"):
        load_settings(project)
    assert load_settings(make_project(tmp_path / "q", git=False))["store"].url is None
    settings = load_settings(project.parent / "q")["store"]
    assert open_store(tmp_path / "s", settings.url, settings.endpoint_url).remote is None


def test_an_unreachable_endpoint_stops_the_stage_before_its_outputs_are_touched(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    closed = f"http://127.0.0.1:{free_ports(1)[0]}"
    with pytest.raises(InputError, match=r"`store\.endpoint_url` http://127\.0\.0\.1:\d+: the S3 endpoint does not"):
        RemoteStore("s3://bucket/x", closed).check()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "not-a-url")
    with pytest.raises(InputError, match="AWS_ENDPOINT_URL"):
        RemoteStore("s3://bucket/x").check()

    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)  # the endpoint from the environment this time
    project = make_project(tmp_path / "p", {"store": {"url": "s3://bucket/x"}}, git=False)
    kept = project / "data" / "ingested" / "earlier.txt"
    kept.parent.mkdir(parents=True)
    kept.write_text("an earlier run's output")
    with pytest.raises(InputError, match=r"`store\.endpoint_url` \(from AWS_ENDPOINT_URL\) http://127"):
        run_stage(project, "ingest")
    assert kept.read_text() == "an earlier run's output"


def test_missing_or_refused_credentials_and_a_missing_bucket_name_the_setting(tmp_path, monkeypatch, s3_server):
    for name in NO_CREDENTIALS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))  # nor ~/.aws, nor an instance role
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    remote = RemoteStore(s3_server.url("x"), s3_server.endpoint)
    with pytest.raises(InputError, match=r"`store\.url` s3://.*: no S3 credentials .* AWS_ACCESS_KEY_ID"):
        remote.check()

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.env["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(InputError, match=r"`store\.url` .*: access refused by http://127\.0\.0\.1"):
        RemoteStore(s3_server.url("x"), s3_server.endpoint).check()

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.env["AWS_SECRET_ACCESS_KEY"])
    RemoteStore(s3_server.url("x"), s3_server.endpoint).check()
    with pytest.raises(InputError, match=r"`store\.url` s3://no-such-bucket/x: bucket `no-such-bucket` does not exist"):
        RemoteStore("s3://no-such-bucket/x", s3_server.endpoint).check()
