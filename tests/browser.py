"""A headless Chromium driven through chromedriver's W3C WebDriver HTTP API (no Python deps).

Used by the report tests: open a local page, check every image loaded, read the console log,
take a screenshot. `find_chromium()` returns None when Chromium or chromedriver is missing, so
the tests can skip with the install line.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

INSTALL_HINT = "apt-get install -y chromium chromium-driver"
IMAGES_SCRIPT = (
    "return Array.from(document.images).map(i => ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0}));"
)


def find_chromium() -> tuple[str, str] | None:
    """(chromium binary, chromedriver binary), or None when either is missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """One headless Chromium session.

    Args:
        browser: the chromium binary.
        driver: the chromedriver binary.
    """

    def __init__(self, browser: str, driver: str) -> None:
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [driver, f"--port={self.port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._wait_ready()
        caps = {
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": browser,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--window-size=1400,1000",
                    "--allow-file-access-from-files",
                ],
            },
        }
        self.session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})["sessionId"]

    def _wait_ready(self) -> None:
        for _ in range(100):
            try:
                self._call("GET", "/status")
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("chromedriver did not start")

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as resp:
            return json.loads(resp.read())["value"]

    def _session(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._call(method, f"/session/{self.session}{path}", body)

    def open(self, page: Path) -> None:
        """Navigate to a local file (waits for the load event: every image settled)."""
        self._session("POST", "/url", {"url": Path(page).resolve().as_uri()})

    def images(self) -> list[dict[str, Any]]:
        """Every <img>: its src and whether it loaded."""
        return self._session("POST", "/execute/sync", {"script": IMAGES_SCRIPT, "args": []})

    def console(self) -> list[dict[str, Any]]:
        """The browser console log entries since the last call (level, message)."""
        return self._session("POST", "/se/log", {"type": "browser"})

    def screenshot(self, path: Path) -> Path:
        """Save a PNG screenshot of the viewport to `path`."""
        Path(path).write_bytes(base64.b64decode(self._session("GET", "/screenshot")))
        return Path(path)

    def close(self) -> None:
        """End the session and stop chromedriver."""
        try:
            self._session("DELETE", "")
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=30)
