"""Stage `caption`: captions from file names, trigger placement, source precedence, the stage's
files and manifest, token overflow, class tokens from `N_name` folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import pytest
from PIL import Image

from loraforge.data.images import read_jsonl, write_jsonl
from loraforge.models.loading import load_tokenizers, resolve_model
from loraforge.pipeline.params import ModelParams, validate_stage
from loraforge.pipeline.runner import Paths, StageEnv
from loraforge.pipeline.spec import load_pipeline
from loraforge.store.items import ItemStore
from stages import ingest as ingest_stage
from stages.caption import Params, caption_from_filename, choose_caption, count_tokens, insert_trigger, run
from tests.helpers import RecordingPublisher

MODEL = ModelParams(base="builtin:tiny-sdxl", device="cpu")
MANIFEST_KEYS = ["id", "caption", "caption_source", "tokens", "trigger", "source"]


@pytest.fixture(scope="module")
def tokenizer(state_dir: Path) -> Any:
    return load_tokenizers(resolve_model(MODEL, state_dir))[0]


def params(**overrides: Any) -> Params:
    return Params(model=MODEL, **overrides)


def row(
    source: str, caption: str | None = None, class_token: str = "", image_id: str = "0123456789abcdef"
) -> dict[str, Any]:
    """A manifest row as ingest writes it (the fields caption reads)."""
    return {
        "id": image_id,
        "file": f"images/{image_id}.png",
        "source": source,
        "width": 32,
        "height": 32,
        "repeats": 1,
        "class_token": class_token,
        "caption": caption,
        "caption_source": "sidecar" if caption is not None else None,
        "pixel_hash": image_id * 2,
    }


def caption(
    images: Path, work: Path, state_dir: Path, publish: Any = None, **overrides: Any
) -> tuple[dict[str, Any], Path]:
    """Run the stage as the runner would, on the manifest in `images`."""
    out = work / "captions"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = StageEnv(store=ItemStore(work / "store"), state_dir=state_dir, show_progress=False)
    if publish is not None:
        env.publish = publish
    summary = run(params(**overrides), Paths(images=images), Paths(captions=out), env)
    return summary, out


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("a red circle.png", "a red circle"),
        ("a red circle_02.png", "a red circle"),
        ("cat (2).jpg", "cat"),
        ("cat_003.png", "cat"),
        ("dog-12.webp", "dog"),
        ("3_shapes/nested/a_blue_square.png", "a blue square"),
        ("  two   spaces .png", "two spaces"),
        ("ab.png", "ab"),
    ],
)
def test_caption_from_filename(source: str, expected: str) -> None:
    assert caption_from_filename(source) == expected


@pytest.mark.parametrize(
    "source",
    [
        "IMG_0042.jpg",
        "img_0042.JPG",
        "00042.png",
        "DSC01234.JPG",
        "DSC_0042.jpg",
        "DSCN0042.jpg",
        "image (3).png",
        "Screenshot_1234.png",
        "PXL_20230615_101112345.jpg",
        "IMG_20230101_123456.jpg",
        "IMG_0042 (2).jpg",
        "photo-12-3.png",
        "1234_5678.png",
        "x1.png",
        "folder/2024.png",
    ],
)
def test_camera_and_export_names_give_no_caption(source: str) -> None:
    assert caption_from_filename(source) is None


def test_insert_trigger() -> None:
    assert insert_trigger("a {trigger} square", "lfx", "first") == "a lfx square"
    assert insert_trigger("a {trigger} square", "lfx", "last") == "a lfx square"  # the placeholder wins
    assert insert_trigger("{trigger}, {trigger} again", "lfx", "first") == "lfx, lfx again"
    assert insert_trigger("a red circle", "lfx", "first") == "lfx, a red circle"
    assert insert_trigger("a red circle", "lfx", "last") == "a red circle, lfx"
    assert insert_trigger("lfx, a red circle", "lfx", "last") == "lfx, a red circle"  # already there
    assert insert_trigger("a red circle, lfx", "lfx", "first") == "a red circle, lfx"
    assert insert_trigger("a (lfx) circle", "lfx", "first") == "a (lfx) circle"
    assert insert_trigger("a lfxstyle circle", "lfx", "first") == "lfx, a lfxstyle circle"  # a longer word is not it
    assert insert_trigger("", "lfx", "first") == "lfx"
    assert insert_trigger("", "lfx", "last") == "lfx"
    assert insert_trigger("woman in red", "femme ewpp", "first") == "femme ewpp, woman in red"
    assert insert_trigger("a femme ewpp in red", "femme ewpp", "last") == "a femme ewpp in red"


def test_choose_caption_follows_sources_order() -> None:
    sidecar_and_name = row("a red circle.png", caption="  a {trigger} square \n", class_token="shapes")
    assert choose_caption(sidecar_and_name, params()) == ("a {trigger} square", "sidecar")
    assert choose_caption(sidecar_and_name, params(sources=("filename", "sidecar", "template"))) == (
        "a red circle",
        "filename",
    )
    assert choose_caption(sidecar_and_name, params(sources=("template", "sidecar"))) == ("{trigger} shapes", "template")

    name_only = row("a red circle.png", class_token="shapes")
    assert choose_caption(name_only, params()) == ("a red circle", "filename")
    assert choose_caption(name_only, params(sources=("sidecar", "template"))) == ("{trigger} shapes", "template")
    assert choose_caption(row("b.png", caption=""), params()) == ("{trigger}", "template")  # blank sidecar: next

    camera = row("IMG_0042.jpg", class_token="shapes")
    assert choose_caption(camera, params()) == ("{trigger} shapes", "template")
    assert choose_caption(camera, params(template="photo of {class_token}, {trigger}")) == (
        "photo of shapes, {trigger}",
        "template",
    )
    assert choose_caption(row("IMG_0042.jpg"), params(template="{trigger}, {class_token}")) == ("{trigger}", "template")
    with pytest.raises(ValueError, match=r"IMG_0042\.jpg.*`caption.sources`"):
        choose_caption(camera, params(sources=("sidecar", "filename")))


def test_params_are_validated(repo_root: Path) -> None:
    for bad in [(), ("sidecar", "sidecar"), ("filename", "template", "filename")]:
        with pytest.raises(pydantic.ValidationError, match="sources"):
            params(sources=bad)
    with pytest.raises(pydantic.ValidationError, match="sources"):
        params(sources=("sidecar", "wd14"))
    with pytest.raises(pydantic.ValidationError, match="trigger"):
        params(trigger="")
    with pytest.raises(pydantic.ValidationError, match="max_tokens"):
        params(max_tokens=0)
    assert params(sources=["template"]).sources == ("template",)

    # As the runner reports it: the key named with its section.
    stage = load_pipeline(repo_root).stages["caption"]
    _, problems = validate_stage(stage, {"caption": {"sources": ["sidecar", "sidecar"]}})
    assert len(problems) == 1 and problems[0].startswith("`caption.sources`")
    _, problems = validate_stage(stage, {"caption": {"sources": ["sidecar", "blip"]}})
    assert problems and all(p.startswith("`caption.sources") for p in problems)


def test_run_writes_one_caption_file_per_image(tmp_path: Path, state_dir: Path, tokenizer: Any) -> None:
    images = tmp_path / "images"
    rows = [
        row("b.png", caption="a {trigger} square", image_id="1" * 16),
        row("a red circle.png", image_id="2" * 16),
        row("IMG_0042.jpg", image_id="3" * 16),
        row("3_shapes/DSC01234.png", class_token="shapes", image_id="4" * 16),
    ]
    write_jsonl(images / "manifest.jsonl", rows)
    publisher = RecordingPublisher()
    summary, out = caption(images, tmp_path / "work", state_dir, publisher)

    expected = {
        "b.png": ("a lfxstyle square", "sidecar"),
        "a red circle.png": ("lfxstyle, a red circle", "filename"),
        "IMG_0042.jpg": ("lfxstyle", "template"),
        "3_shapes/DSC01234.png": ("lfxstyle shapes", "template"),
    }
    manifest = read_jsonl(out / "manifest.jsonl")
    assert [m["source"] for m in manifest] == [r["source"] for r in rows]
    for m, r in zip(manifest, rows):
        assert list(m) == MANIFEST_KEYS
        assert (m["caption"], m["caption_source"]) == expected[r["source"]]
        assert m["id"] == r["id"] and m["trigger"] == "lfxstyle"
        assert m["tokens"] == count_tokens(tokenizer, m["caption"]) > 0
        assert (out / f"{r['id']}.txt").read_text(encoding="utf-8") == m["caption"] + "\n"
    assert sorted(p.name for p in out.iterdir()) == sorted([*(f"{r['id']}.txt" for r in rows), "manifest.jsonl"])
    assert summary["items"] == summary["computed"] == 4 and summary["reused"] == 0
    assert summary["by_source"] == {"sidecar": 1, "filename": 1, "template": 2}
    assert summary["overflow"] == [] and summary["trigger"] == "lfxstyle" and summary["max_tokens"] == 75
    assert [t["caption"] for t in publisher.tables["captions"]] == [m["caption"] for m in manifest]

    # The trigger is a parameter: a new one rewrites every caption, placed as asked.
    summary, out = caption(images, tmp_path / "work", state_dir, trigger="ohwx", trigger_position="last")
    assert [m["caption"] for m in read_jsonl(out / "manifest.jsonl")] == [
        "a ohwx square",
        "a red circle, ohwx",
        "ohwx",
        "ohwx shapes",
    ]


def test_token_count_grows_with_the_caption(tokenizer: Any) -> None:
    short, long = count_tokens(tokenizer, "a red circle"), count_tokens(tokenizer, "a red circle on a blue square")
    assert short == len(tokenizer.tokenize("a red circle"))  # BPE pieces, without BOS/EOS
    assert long == len(tokenizer.tokenize("a red circle on a blue square")) and long > short
    assert count_tokens(tokenizer, "") == 0  # BOS/EOS are not counted


def test_long_caption_is_reported_and_kept(
    tmp_path: Path, state_dir: Path, tokenizer: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images"
    long_text = ", ".join(["a red circle on a blue square"] * 12)
    rows = [row("long.png", caption=long_text, image_id="a" * 16), row("short.png", caption="a dot", image_id="b" * 16)]
    write_jsonl(images / "manifest.jsonl", rows)
    summary, out = caption(images, tmp_path / "work", state_dir)
    tokens = count_tokens(tokenizer, f"lfxstyle, {long_text}")
    assert tokens > 75
    assert summary["overflow"] == [{"id": "a" * 16, "source": "long.png", "tokens": tokens}]
    printed = capsys.readouterr().out
    assert "warning" in printed and "long.png" in printed and str(tokens) in printed and "short.png" not in printed
    # Reported, never truncated: the caption file holds the whole text.
    assert (out / f"{'a' * 16}.txt").read_text(encoding="utf-8") == f"lfxstyle, {long_text}\n"

    summary, _ = caption(images, tmp_path / "work", state_dir, max_tokens=3)
    assert [o["source"] for o in summary["overflow"]] == ["long.png", "short.png"]
    assert summary["max_tokens"] == 3


def test_class_token_from_repeats_folder_lands_in_template_captions(tmp_path: Path, state_dir: Path) -> None:
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for name in ("3_shapes/IMG_0001.png", "3_shapes/DSC01234.png", "3_shapes/a green star.png", "misc/00042.png"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(src / name)
    (src / "3_shapes" / "DSC01234.txt").write_text("a {trigger} hexagon", encoding="utf-8")
    images = tmp_path / "ingested"
    images.mkdir()
    env = StageEnv(store=ItemStore(tmp_path / "store"), state_dir=state_dir, show_progress=False)
    ingest_stage.run(ingest_stage.Params(source=str(src)), Paths(source=src), Paths(images=images), env)

    summary, out = caption(images, tmp_path / "work", state_dir, template="{trigger}, a photo of {class_token}")
    got = {m["source"]: (m["caption"], m["caption_source"]) for m in read_jsonl(out / "manifest.jsonl")}
    assert got == {
        "3_shapes/IMG_0001.png": ("lfxstyle, a photo of shapes", "template"),
        "3_shapes/DSC01234.png": ("a lfxstyle hexagon", "sidecar"),
        "3_shapes/a green star.png": ("lfxstyle, a green star", "filename"),
        "misc/00042.png": ("lfxstyle, a photo of", "template"),  # no `N_name` folder: no class token
    }
    assert summary["by_source"] == {"sidecar": 1, "filename": 1, "template": 2}
    ids = {m["id"] for m in read_jsonl(out / "manifest.jsonl")}
    assert ids == {r["id"] for r in read_jsonl(images / "manifest.jsonl")}
    assert json.loads(json.dumps(summary)) == summary  # the report is plain JSON
