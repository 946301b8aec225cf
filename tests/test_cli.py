"""The command line: `ui` binds to 127.0.0.1 only; `check` validates without running anything."""

from __future__ import annotations

import subprocess
import sys

from loraforge import cli


def test_ui_starts_the_prefect_server_on_loopback_only(monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(cli.subprocess, "call", lambda command, env: seen.update(command=command, env=env) or 0)
    assert cli.main(["ui", "--port", "4321"]) == 0
    command = seen["command"]
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--port") + 1] == "4321"
    assert seen["env"]["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert "export PREFECT_API_URL=http://127.0.0.1:4321/api" in capsys.readouterr().out


def test_check_reports_a_valid_params_file(repo_root):
    result = subprocess.run([sys.executable, "-m", "loraforge", "check"], cwd=repo_root, capture_output=True, text=True)
    assert result.returncode == 0 and "valid for every stage" in result.stdout


def test_commands_outside_a_project_say_so(tmp_path):
    result = subprocess.run([sys.executable, "-m", "loraforge", "check"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0 and "no pipeline.yaml" in result.stderr
