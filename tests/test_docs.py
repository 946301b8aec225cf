"""The manual: the params page is generated from the schemas and never stale; the site builds
strictly (a broken link fails); the front page is the README."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loraforge.errors import InputError
from loraforge.pipeline.params import SETTINGS_SECTIONS, SHARED_SECTIONS, section, stage_params_class
from loraforge.pipeline.params_doc import REFERENCE_FILE, attribute_docs, render_reference, section_rows
from loraforge.pipeline.spec import load_pipeline

REPO = Path(__file__).resolve().parents[1]
MKDOCS = shutil.which("mkdocs") or shutil.which("mkdocs", path=str(Path(sys.executable).parent))


def test_the_committed_params_page_matches_the_schemas():
    committed = (REPO / REFERENCE_FILE).read_text(encoding="utf-8")
    assert committed == render_reference(load_pipeline(REPO)), "docs/params.md is stale: run `loraforge sync-docs`"


def test_every_key_of_every_schema_is_on_the_page():
    page = (REPO / REFERENCE_FILE).read_text(encoding="utf-8")
    pipeline = load_pipeline(REPO)
    sections = {**SHARED_SECTIONS, **SETTINGS_SECTIONS}
    sections |= {name: stage_params_class(stage) for name, stage in pipeline.stages.items()}
    missing = [
        f"{name}.{field}"
        for name, cls in sections.items()
        for field in cls.__pydantic_fields__
        if field not in SHARED_SECTIONS and f"| `{name}.{field}` |" not in page
    ]
    assert not missing
    assert "| `resize.method` | `fixed` or `sv_ratio` or `sv_fro` or `sv_cumulative` | `fixed` |" in page
    assert "| `finetune.lr` | float | `1e-06` | > 0, ≤ 10 |" in page


def test_attribute_docs_join_continuation_lines():
    @section
    class Demo:
        """The demo section.

        Attributes:
            rank: the rank,
                over two lines.
            alpha: one line.
        """

        rank: int = 1
        alpha: float = 1.0

    assert attribute_docs(Demo) == {"rank": "the rank, over two lines.", "alpha": "one line."}
    assert section_rows(Demo, "demo")[0] == "| `demo.rank` | int | `1` |  | the rank, over two lines. |"


def test_a_field_without_a_description_stops_the_generation_naming_it():
    @section
    class Undocumented:
        """A section.

        Attributes:
            rank: the rank.
        """

        rank: int = 1
        secret: int = 2

    with pytest.raises(InputError, match=r"`demo\.secret` has no description"):
        section_rows(Undocumented, "demo")


def _docs_project(tmp_path: Path) -> Path:
    for name in ("pipeline.yaml", "params.yaml", "mkdocs.yml", "README.md"):
        shutil.copy(REPO / name, tmp_path / name)
    for folder in ("stages", "docs", "scripts"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_sync_docs_check_fails_on_a_stale_page_and_sync_docs_fixes_it(tmp_path):
    project = _docs_project(tmp_path)
    page = project / REFERENCE_FILE
    page.write_text(page.read_text().replace("`resize.rank`", "`resize.rnk`"))
    cli = [sys.executable, "-m", "loraforge"]
    stale = subprocess.run([*cli, "sync-docs", "--check"], cwd=project, capture_output=True, text=True)
    assert stale.returncode == 1 and "docs/params.md is stale" in stale.stderr
    subprocess.run([*cli, "sync-docs"], cwd=project, check=True, capture_output=True)
    assert page.read_text() == (REPO / REFERENCE_FILE).read_text()


@pytest.mark.skipif(MKDOCS is None, reason="mkdocs not installed (make install brings it)")
def test_the_site_builds_strictly_with_the_readme_as_front_page_and_a_broken_link_fails(tmp_path):
    project = _docs_project(tmp_path)
    build = [MKDOCS, "build", "--strict", "--site-dir", str(tmp_path / "site")]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    subprocess.run(build, cwd=project, check=True, capture_output=True, env=env)
    front = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    assert "Train Stable Diffusion LoRAs" in front and 'href="params/"' in front  # README, links made site-relative
    (project / "docs" / "benchmarks.md").write_text("# Benchmarks\n\nSee [the table](nowhere.md).\n")
    broken = subprocess.run(build, cwd=project, capture_output=True, text=True, env=env)
    assert broken.returncode != 0 and "nowhere.md" in broken.stderr
