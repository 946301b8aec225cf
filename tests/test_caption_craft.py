"""Caption craft: tag pruning (the 003 guide's `navel`), the tag-frequency table, the trigger's
position options and the check that every caption carries the trigger."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from loraforge.data.images import read_jsonl, write_jsonl
from loraforge.pipeline.params import ModelParams
from loraforge.pipeline.runner import Paths, StageEnv
from loraforge.store.items import ItemStore
from stages.caption import Params, insert_trigger, normalize_tag, remove_tags, run, tag_frequency
from tests.helpers import RecordingPublisher

MODEL = ModelParams(base="builtin:tiny-sdxl", device="cpu")


def manifest(folder: Path, captions: list[str | None]) -> Path:
    """An ingest manifest with sidecar captions (None: no sidecar, camera file name)."""
    rows = [
        {
            "id": f"{i:016x}",
            "file": f"images/{i:016x}.png",
            "source": f"IMG_{i:04d}.png",
            "width": 32,
            "height": 32,
            "repeats": 1,
            "class_token": "",
            "caption": c,
            "caption_source": "sidecar" if c else None,
            "pixel_hash": f"{i:032x}",
        }
        for i, c in enumerate(captions)
    ]
    write_jsonl(folder / "manifest.jsonl", rows)
    return folder


def caption(
    images: Path, work: Path, state_dir: Path, publish: Any = None, **overrides: Any
) -> tuple[dict[str, Any], Path]:
    out = work / "captions"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = StageEnv(
        store=ItemStore(work / "store"),
        state_dir=state_dir,
        show_progress=False,
        publish=publish or RecordingPublisher(),
    )
    return run(Params(model=MODEL, **overrides), Paths(images=images), Paths(captions=out), env), out


def test_remove_tags_matches_case_and_underscores() -> None:
    # The 003 guide prunes `navel` (and traces a jacket-like artefact to `collarbone`).
    assert remove_tags("1girl, navel, Collar_Bone, crop top", ("navel", "collar bone")) == "1girl, crop top"
    assert remove_tags("a woman, navel piercing", ("navel",)) == "a woman, navel piercing"  # whole tags only
    assert remove_tags("as is,  kept", ()) == "as is,  kept"
    assert normalize_tag(" Long_Hair ") == "long hair"


def test_tag_frequency_counts_each_image_once() -> None:
    table = tag_frequency(["t, navel, red", "t, navel, navel", "t, blue"])
    assert table[:2] == [{"tag": "t", "count": 3, "share": 1.0}, {"tag": "navel", "count": 2, "share": 0.6667}]
    assert [r["tag"] for r in table[2:]] == ["blue", "red"]  # ties by name


def test_trigger_position_none_only_fills_placeholders() -> None:
    assert insert_trigger("a {trigger} dog", "sks", "none") == "a sks dog"
    assert insert_trigger("a dog", "sks", "none") == "a dog"
    assert insert_trigger("a dog", "sks", "first") == "sks, a dog"


def test_stage_prunes_tags_and_publishes_the_frequency_table(tmp_path: Path, state_dir: Path) -> None:
    images = manifest(
        tmp_path / "images", ["1girl, navel, red dress", "1girl, navel, blue dress", "1girl, {trigger}, hat"]
    )
    publisher = RecordingPublisher()
    summary, out = caption(images, tmp_path / "work", state_dir, publisher, trigger="jnx", remove_tags=("navel",))
    assert [r["caption"] for r in read_jsonl(out / "manifest.jsonl")] == [
        "jnx, 1girl, red dress",
        "jnx, 1girl, blue dress",
        "1girl, jnx, hat",
    ]
    assert summary["removed_tags"] == ["navel"]
    counts = {r["tag"]: (r["count"], r["share"]) for r in summary["tags"]}
    assert (
        counts["jnx"] == (3, 1.0)
        and counts["1girl"] == (3, 1.0)
        and counts["hat"] == (1, 0.3333)
        and "navel" not in counts
    )
    assert publisher.tables["tag-frequency"] == summary["tags"]


def test_stage_stops_naming_captions_without_the_trigger(tmp_path: Path, state_dir: Path) -> None:
    images = manifest(tmp_path / "images", ["a {trigger} cat", "a plain dog", "another dog"])
    with pytest.raises(
        ValueError,
        match=r"2 caption\(s\) lack the trigger 'sks' \(`caption.require_trigger`\): IMG_0001.png, IMG_0002.png",
    ):
        caption(images, tmp_path / "work", state_dir, trigger="sks", trigger_position="none", sources=("sidecar",))
    summary, out = caption(
        images,
        tmp_path / "work",
        state_dir,
        trigger="sks",
        trigger_position="none",
        sources=("sidecar",),
        require_trigger=False,
    )
    assert [r["caption"] for r in read_jsonl(out / "manifest.jsonl")] == ["a sks cat", "a plain dog", "another dog"]
    with pytest.raises(ValueError, match="`caption.remove_tags` lists the trigger 'sks'"):
        caption(images, tmp_path / "work", state_dir, trigger="sks", remove_tags=("SKS",))


def test_prefix_and_suffix_frame_every_caption_and_the_trigger_goes_by_them(tmp_path: Path, state_dir: Path) -> None:
    images = manifest(tmp_path / "images", ["red dress", "jnx, hat"])
    _, out = caption(images, tmp_path / "work", state_dir, None, trigger="jnx", prefix="masterpiece,", suffix=", 4k")
    assert [r["caption"] for r in read_jsonl(out / "manifest.jsonl")] == [
        "jnx, masterpiece, red dress , 4k",
        "masterpiece, jnx, hat , 4k",
    ]
