"""`loraforge du`: the item store's entries and bytes by kind, read from a real run's store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from loraforge.pipeline.runner import run_stage
from loraforge.store.usage import human, store_usage
from tests.helpers import FAST_MODEL, env_with_venv, make_project


def test_du_counts_each_kind_s_entries_and_bytes_and_what_the_outputs_link(tmp_path: Path):
    project = make_project(tmp_path / "p", {"model": FAST_MODEL}, git=False)
    run_stage(project, "ingest")
    store = project / ".loraforge" / "store"
    usage = store_usage(store)
    images = (project / "data" / "ingested" / "manifest.jsonl").read_text().splitlines()
    ingested = usage["ingested-image"]
    assert ingested.entries == len(images) > 0
    files = [p for p in (store / "ingested-image").glob("*/*") if p.is_file()]
    assert ingested.files == len(files) and ingested.size == sum(p.stat().st_size for p in files)
    assert 0 < ingested.linked <= ingested.size  # the stage's outputs are hard links to entries
    assert usage["image-metrics"].linked == 0  # measurements are in no output folder
    result = subprocess.run(
        [sys.executable, "-m", "loraforge", "du"], cwd=project, capture_output=True, text=True, env=env_with_venv()
    )
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("ingested-image"))
    assert row.split()[1] == str(len(images)) and human(ingested.size) in row
    assert result.stdout.splitlines()[-1].startswith("total")


def test_du_of_a_project_with_nothing_cached_says_so(tmp_path: Path):
    project = make_project(tmp_path / "p", {"model": FAST_MODEL}, git=False)
    result = subprocess.run(
        [sys.executable, "-m", "loraforge", "du"], cwd=project, capture_output=True, text=True, env=env_with_venv()
    )
    assert result.returncode == 0 and "empty (nothing cached yet)" in result.stdout


def test_human_sizes():
    assert [human(n) for n in (0, 1023, 1024, 1536, 5 * 2**20, 3 * 2**40)] == [
        "0 B", "1023 B", "1 KiB", "1.5 KiB", "5 MiB", "3 TiB",
    ]  # fmt: skip
