"""Stage `ingest` on real files: layout, captions, repeats, rejects, duplicates, caching, safety."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import pytest
import yaml
from PIL import Image

from loraforge.errors import InputError, MissingInput
from loraforge.data.images import read_jsonl
from loraforge.pipeline.params import DatasetParams
from loraforge.pipeline.runner import run_stage
from loraforge.data.sources import folder_convention
from stages.ingest import Params
from tests.helpers import RecordingPublisher
from tests.helpers import run_ingest as ingest

MANIFEST_KEYS = [
    "id",
    "file",
    "source",
    "width",
    "height",
    "repeats",
    "class_token",
    "caption",
    "caption_source",
    "pixel_hash",
    "tile",
]


def picture(path: Path, size: tuple[int, int] = (24, 16), seed: int = 0, **save: Any) -> Image.Image:
    """Write a small random RGB image to `path` (format from the suffix) and return it."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **save)
    return img


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Root images (one captioned), a `3_shapes` repeats folder, a plain folder, notes."""
    src = tmp_path / "src"
    picture(src / "b.png", seed=1)
    picture(src / "a red circle.jpg", seed=2, quality=95)
    (src / "b.txt").write_text("a {trigger} square\n", encoding="utf-8")
    picture(src / "3_shapes" / "one.png", (16, 32), seed=3)
    picture(src / "3_shapes" / "nested" / "two.png", seed=4)
    (src / "3_shapes" / "nested" / "two.caption").write_text("\ufeffstar  \n", encoding="utf-8")
    picture(src / "misc" / "c.png", seed=5)
    (src / "README.md").write_text("notes", encoding="utf-8")
    (src / "lonely.txt").write_text("no image here", encoding="utf-8")
    (src / ".DS_Store").write_bytes(b"\0\1")
    return src


def test_manifest_layout_captions_and_repeats(dataset: Path, tmp_path: Path) -> None:
    summary, out = ingest(dataset, tmp_path / "work")
    rows = read_jsonl(out / "manifest.jsonl")
    assert [r["source"] for r in rows] == [
        "3_shapes/nested/two.png",
        "3_shapes/one.png",
        "a red circle.jpg",
        "b.png",
        "misc/c.png",
    ]
    assert all(list(r) == MANIFEST_KEYS for r in rows)
    by_source = {r["source"]: r for r in rows}
    assert by_source["b.png"]["caption"] == "a {trigger} square"
    assert by_source["b.png"]["caption_source"] == "sidecar"
    assert by_source["3_shapes/nested/two.png"]["caption"] == "star"  # BOM and whitespace stripped
    assert by_source["a red circle.jpg"]["caption"] is None and by_source["a red circle.jpg"]["caption_source"] is None
    assert (by_source["3_shapes/one.png"]["repeats"], by_source["3_shapes/one.png"]["class_token"]) == (3, "shapes")
    assert (by_source["3_shapes/nested/two.png"]["repeats"], by_source["3_shapes/nested/two.png"]["class_token"]) == (
        3,
        "shapes",
    )
    assert (by_source["misc/c.png"]["repeats"], by_source["misc/c.png"]["class_token"]) == (1, "")
    assert (by_source["3_shapes/one.png"]["width"], by_source["3_shapes/one.png"]["height"]) == (16, 32)
    for r in rows:
        assert r["id"] == r["pixel_hash"][:16] and r["file"] == f"images/{r['id']}.png"
        img = Image.open(out / r["file"])
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (r["width"], r["height"])
    # Lossless sources come through pixel-exact.
    assert np.array_equal(
        np.asarray(Image.open(out / by_source["b.png"]["file"])), np.asarray(picture(tmp_path / "x.png", seed=1))
    )

    assert summary["items"] == 5 and summary["kept"] == 5 and summary["computed"] == 5 and summary["reused"] == 0
    assert summary["rejects"] == 0 and summary["duplicates"] == 0 and summary["captions"] == 2
    assert summary["samples_per_epoch"] == 3 + 3 + 1 + 1 + 1
    assert summary["folders"]["3_shapes"] == {"repeats": 3, "class_token": "shapes", "images": 2}
    assert summary["folders"]["misc"] == {"repeats": 1, "class_token": "", "images": 1}
    assert summary["folders"]["."]["images"] == 2
    assert summary["ignored"] == [".DS_Store", "README.md", "lonely.txt"]  # hidden, notes, orphan captions
    assert summary["orphan_captions"] == ["lonely.txt"]
    assert read_jsonl(out / "rejects.jsonl") == [] and read_jsonl(out / "duplicates.jsonl") == []


def test_outputs_are_hard_links_into_the_store(dataset: Path, tmp_path: Path) -> None:
    _, out = ingest(dataset, tmp_path / "work")
    stored = {p.stat().st_ino for p in (tmp_path / "work" / "store").rglob("*.png")}
    assert {p.stat().st_ino for p in (out / "images").iterdir()} <= stored


def test_bad_files_are_rejected_with_reasons(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(3):
        picture(src / f"good{i}.png", seed=i)
    (src / "empty.png").touch()
    (src / "story.jpg").write_text("once upon a time", encoding="utf-8")
    picture(tmp_path / "full.png", (64, 64), seed=9)
    data = (tmp_path / "full.png").read_bytes()
    (src / "cut.png").write_bytes(data[: len(data) // 2])
    picture(src / "latin1.png", seed=7)
    (src / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))

    publisher = RecordingPublisher()
    summary, out = ingest(src, tmp_path / "work", publisher, max_reject_ratio=1.0)
    reasons = {r["source"]: r["reason"] for r in read_jsonl(out / "rejects.jsonl")}
    assert reasons["empty.png"] == "empty file"
    assert reasons["story.jpg"].startswith("not an image")
    assert reasons["cut.png"].startswith("cannot decode")
    assert "not UTF-8" in reasons["latin1.png"]
    assert len(reasons) == 4
    assert summary["rejects"] == 4 and summary["kept"] == 3 and summary["items"] == 7
    assert summary["reject_ratio"] == round(4 / 7, 4)
    assert {r["source"] for r in summary["rejected"]} == set(reasons)
    assert {r["source"] for r in publisher.tables["ingest-rejects"]} == set(reasons)
    assert len(read_jsonl(out / "manifest.jsonl")) == 3


def test_too_many_rejects_stops_the_run(tmp_path: Path) -> None:
    src = tmp_path / "src"
    picture(src / "good0.png", seed=0)
    picture(src / "good1.png", seed=1)
    (src / "empty.png").touch()
    (src / "story.jpg").write_text("once upon a time", encoding="utf-8")
    publisher = RecordingPublisher()
    with pytest.raises(ValueError) as e:
        ingest(src, tmp_path / "work", publisher, max_reject_ratio=0.2)
    message = str(e.value)
    assert "`ingest.max_reject_ratio` = 0.2" in message
    assert "2 of 4" in message and "0.500" in message and str(src) in message
    assert "empty.png: empty file" in message and "story.jpg: not an image" in message
    rejects = tmp_path / "work" / "out" / "rejects.jsonl"
    assert str(rejects) in message
    assert len(read_jsonl(rejects)) == 2  # written before stopping
    assert len(publisher.tables["ingest-rejects"]) == 2


def test_exact_duplicates_are_dropped(tmp_path: Path) -> None:
    src = tmp_path / "src"
    img = picture(src / "a.png", seed=3)
    img.save(src / "b_copy.png", pnginfo=None, compress_level=9)  # other bytes, same pixels
    Image.fromarray(np.asarray(img)).save(src / "c.bmp")  # other format, same pixels
    picture(src / "d.png", seed=4)
    summary, out = ingest(src, tmp_path / "work")
    assert [r["source"] for r in read_jsonl(out / "manifest.jsonl")] == ["a.png", "d.png"]
    exact = {"tile": None, "kept_tile": None, "distance": 0}
    dropped = [{"source": "b_copy.png", "kept": "a.png", **exact}, {"source": "c.bmp", "kept": "a.png", **exact}]
    assert read_jsonl(out / "duplicates.jsonl") == dropped
    assert summary["duplicates_dropped"] == dropped and summary["duplicates"] == 2 and summary["kept"] == 2
    assert len(list((out / "images").iterdir())) == 2

    # Same pixels also hash alike perceptually: keeping copies needs both checks off.
    summary, out = ingest(src, tmp_path / "work", dedupe=False, dataset=DatasetParams(near_duplicate_distance=-1))
    rows = read_jsonl(out / "manifest.jsonl")
    assert summary["duplicates"] == 0 and len(rows) == 4
    ids = [r["id"] for r in rows[:3]]
    assert ids[1:] == [f"{ids[0]}-2", f"{ids[0]}-3"]  # one file per manifest line
    assert len({r["file"] for r in rows}) == 4 and all((out / r["file"]).is_file() for r in rows)


def test_rerun_reuses_and_new_image_is_the_only_work(dataset: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    first, out = ingest(dataset, work)
    manifest = (out / "manifest.jsonl").read_text(encoding="utf-8")
    second, out = ingest(dataset, work)
    assert (second["computed"], second["reused"]) == (0, 5)
    assert (out / "manifest.jsonl").read_text(encoding="utf-8") == manifest  # identical output

    picture(dataset / "misc" / "new.png", seed=42)
    third, _ = ingest(dataset, work)
    assert (third["computed"], third["reused"], third["kept"]) == (1, 5, 6)

    # A caption edit changes the manifest without re-decoding the image.
    (dataset / "b.txt").write_text("edited", encoding="utf-8")
    fourth, out = ingest(dataset, work)
    assert fourth["computed"] == 0
    assert {r["source"]: r["caption"] for r in read_jsonl(out / "manifest.jsonl")}["b.png"] == "edited"

    # The background colour is part of every key.
    fifth, _ = ingest(dataset, work, background="#000000")
    assert fifth["computed"] == 6


def test_incomplete_store_entry_is_recomputed(dataset: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    ingest(dataset, work)
    metas = sorted((work / "store" / "ingested-image").rglob("*.json"))
    metas[0].unlink()  # as if killed between the PNG and its JSON
    metas[1].write_text("{broken", encoding="utf-8")
    summary, _ = ingest(dataset, work)
    assert (summary["computed"], summary["reused"]) == (2, 3)


def test_output_names_never_come_from_user_names(tmp_path: Path) -> None:
    src = tmp_path / "deep" / "src"
    # "/" cannot be in a file name on POSIX; backslashes and dots can (names starting with "."
    # are hidden files, skipped like in the fingerprint).
    picture(src / "a" / "b" / "x\\..\\..\\evil.png", seed=1)
    picture(src / "a" / "b" / "~evil..png", seed=2)
    picture(src / "1_..", seed=3, format="PNG")
    work = tmp_path / "deep" / "work"
    before = {p for p in tmp_path.rglob("*") if "work" not in p.parts}
    summary, out = ingest(src, work)
    assert summary["kept"] == 3
    after = {p for p in tmp_path.rglob("*") if "work" not in p.parts}
    assert after == before  # nothing written next to the source
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    rows = read_jsonl(out / "manifest.jsonl")
    assert written == sorted(
        ["dropped.jsonl", "duplicates.jsonl", "manifest.jsonl", "rejects.jsonl", *(r["file"] for r in rows)]
    )
    for r in rows:
        assert r["file"] == f"images/{r['id']}.png" and all(c in "0123456789abcdef" for c in r["id"])
    assert {r["source"] for r in rows} == {"a/b/x\\..\\..\\evil.png", "a/b/~evil..png", "1_.."}


def test_folder_convention() -> None:
    assert folder_convention("3_shapes") == (3, "shapes")
    assert folder_convention("10_sks dog") == (10, "sks dog")
    assert folder_convention("shapes") == (1, "")
    assert folder_convention(".") == (1, "")
    with pytest.raises(ValueError, match="repeats must be ≥ 1"):
        folder_convention("0_never")


def test_source_problems_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(MissingInput, match="`ingest.source` folder .*missing does not exist"):
        ingest(tmp_path / "missing", tmp_path / "work")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(InputError, match="`ingest.source` must be a folder, got the file"):
        ingest(tmp_path / "a-file", tmp_path / "work")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="`ingest.source` .* holds no image files"):
        ingest(tmp_path / "empty", tmp_path / "work")


def test_params_are_validated() -> None:
    with pytest.raises(pydantic.ValidationError, match="background"):
        Params(background="white")
    with pytest.raises(pydantic.ValidationError, match="max_reject_ratio"):
        Params(max_reject_ratio=1.5)
    assert Params(background="#A0b0C0").background == "#A0b0C0"


def test_run_stage_writes_report(dataset: Path, tmp_path: Path, repo_root: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(repo_root / "pipeline.yaml", project / "pipeline.yaml")
    shutil.copytree(dataset, project / "photos")
    (project / "params.yaml").write_text(yaml.safe_dump({"ingest": {"source": "photos", "max_reject_ratio": 0.5}}))
    manifest = run_stage(project, "ingest")
    report = json.loads((project / "reports" / "ingest.json").read_text(encoding="utf-8"))
    assert report["stage"] == "ingest" and report["items"] == 5 and report["computed"] == 5
    assert "seconds" in report and report["rejects"] == 0
    assert "data/ingested" in manifest["outputs"]
    assert len(read_jsonl(project / "data" / "ingested" / "manifest.jsonl")) == 5
    again = run_stage(project, "ingest")
    assert again["report"]["reused"] == 5
    assert again["outputs"]["data/ingested"] == manifest["outputs"]["data/ingested"]  # same bytes


def test_demo_data(repo_root: Path, tmp_path: Path) -> None:
    demo = repo_root / "data" / "demo"
    files = [p for p in demo.rglob("*") if p.is_file()]
    assert all(p.stat().st_size < 50_000 for p in files)
    assert sum(p.stat().st_size for p in files) < 400_000
    images = [p for p in files if p.suffix in (".png", ".jpg")]
    summary, out = ingest(demo, tmp_path / "work")
    # every demo image is clean: none rejected, duplicated or dropped, so all are kept
    assert summary["rejects"] == 0 and summary["duplicates"] == 0 and summary["dropped"] == []
    assert summary["kept"] == summary["items"] == len(images)
    in_shapes = len([p for p in images if p.parent.name == "3_shapes"])
    assert summary["folders"]["3_shapes"]["repeats"] == 3 and summary["folders"]["3_shapes"]["images"] == in_shapes
    rows = read_jsonl(out / "manifest.jsonl")
    sides = [min(r["width"], r["height"]) for r in rows]
    assert any(s < 128 for s in sides) and any(s >= 128 for s in sides)
    assert any(r["width"] > r["height"] for r in rows) and any(r["width"] < r["height"] for r in rows)
    assert any(r["caption"] and "{trigger}" in r["caption"] for r in rows)
    assert any(r["caption"] is None for r in rows)
    assert {Path(r["source"]).suffix for r in rows} == {".png", ".jpg"}
    rotated = next(r for r in rows if r["source"] == "img_004.jpg")
    assert (rotated["width"], rotated["height"]) == (160, 240)  # EXIF orientation applied
    assert summary["ignored"] == ["README.md"]


def test_hidden_files_are_skipped(tmp_path: Path) -> None:
    src = tmp_path / "src"
    picture(src / "a.png")
    picture(src / ".hidden" / "b.png", seed=1)
    (src / "._a.png").write_bytes(b"\0\5\26\7")  # macOS resource fork
    summary, _ = ingest(src, tmp_path / "work")
    assert summary["items"] == 1 and summary["rejects"] == 0
    assert os.listdir(tmp_path / "work" / "out" / "images")
