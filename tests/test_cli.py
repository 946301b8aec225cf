"""The command line: `ui` binds to 127.0.0.1 unless told otherwise and its UI talks to its own
server; `check` validates without running anything."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from loraforge import cli


def test_ui_starts_the_prefect_server_on_loopback_only(monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(cli.os, "execve", lambda path, command, env: seen.update(command=command, env=env))
    assert cli.main(["ui", "--port", "4321"]) == 0
    command = seen["command"]
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--port") + 1] == "4321"
    assert seen["env"]["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert seen["env"]["PREFECT_UI_API_URL"] == "http://127.0.0.1:4321/api"
    assert "export PREFECT_API_URL=http://127.0.0.1:4321/api" in capsys.readouterr().out


def test_check_reports_a_valid_params_file(repo_root):
    result = subprocess.run([sys.executable, "-m", "loraforge", "check"], cwd=repo_root, capture_output=True, text=True)
    assert result.returncode == 0 and "valid for every stage" in result.stdout


def test_commands_outside_a_project_say_so(tmp_path):
    result = subprocess.run([sys.executable, "-m", "loraforge", "check"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0 and "no pipeline.yaml" in result.stderr


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict | None:
    """The JSON at `url`, or None while nothing answers there."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def test_the_ui_on_another_port_hands_the_browser_the_api_of_its_own_server(repo_root, tmp_path):
    """A real `loraforge ui --port N`: the settings endpoint the browser reads names port N's API."""
    port = free_port()
    log = (tmp_path / "ui.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "loraforge", "ui", "--port", str(port)],
        cwd=repo_root,
        stdout=log,
        stderr=log,
        start_new_session=True,  # its own process group: the teardown stops every process it started
    )
    try:
        deadline, settings = time.monotonic() + 240, None
        while settings is None and time.monotonic() < deadline and server.poll() is None:
            time.sleep(1)
            settings = get_json(f"http://127.0.0.1:{port}/ui-settings")
        assert settings is not None, (tmp_path / "ui.log").read_text()[-2000:]
        assert settings["api_url"] == f"http://127.0.0.1:{port}/api"
        assert get_json(f"http://127.0.0.1:{port}/api/health") is True  # and that API answers
    finally:
        server.terminate()  # `loraforge ui` became the server (exec): this reaches it
        try:
            server.wait(timeout=60)
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
            log.close()
    assert server.returncode is not None
