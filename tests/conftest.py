"""Test session setup: offline, private Prefect home, analytics off, tiny models only."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Set before anything imports huggingface_hub or prefect.
_session_tmp = Path(tempfile.mkdtemp(prefix="loraforge-tests-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HOME"] = str(_session_tmp / "hf")
os.environ["PREFECT_HOME"] = str(_session_tmp / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ.pop("PREFECT_API_URL", None)
os.environ["TQDM_DISABLE"] = "1"

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """loraforge's state folder for one test module: each builtin model is built once per module."""
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    return _session_tmp


from tests.s3server import s3_server  # noqa: E402, F401  (a real S3 server: SeaweedFS `weed mini`)
