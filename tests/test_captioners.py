"""Model captioners: a tiny random BLIP and a tiny ONNX tagger with the real WD14 signature,
loaded through the real code; WD14 preprocessing and tag selection; the caption stage's merge
modes, per-image cache and errors that name the param."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import pytest
from PIL import Image

from loraforge.captioning.blip import BlipCaptioner, BlipSettings
from loraforge.captioning.captioners import locate_model, model_files
from loraforge.captioning.wd14 import Tag, Wd14Settings, Wd14Tagger, read_selected_tags, select_tags, wd14_preprocess
from loraforge.data.images import pixel_hash, read_jsonl, save_png, write_jsonl
from loraforge.pipeline.params import ModelParams, validate_stage
from loraforge.pipeline.runner import Paths, StageEnv
from loraforge.pipeline.spec import load_pipeline
from loraforge.store.items import ItemStore
from stages.caption import Params, merge_caption, run
from tests.helpers import RecordingPublisher

MODEL = ModelParams(base="builtin:tiny-sdxl", device="cpu")
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)

# ---------------------------------------------------------------------------------------------
# A tiny WD14 tagger: mean colour (BGR, 0..255) -> one logit per tag -> sigmoid, built with onnx.helper.
# Logit = w · (B, G, R) / 255 + bias, so pure colours give known scores.

TAGS = [  # name, category, (wB, wG, wR), bias
    ("general", 9, (0, 0, 2), 0.0),  # red: sigmoid(2) = 0.88
    ("sensitive", 9, (2, 0, 0), 0.0),  # blue: 0.88
    ("explicit", 9, (0, 0, 0), -3.0),
    ("red_theme", 0, (0, 0, 8), -4.0),  # red: 0.982, blue: 0.018
    ("blue_theme", 0, (8, 0, 0), -4.0),
    ("long_hair", 0, (0, 0, 0), 0.0),  # always 0.5
    ("^_^", 0, (0, 0, 0), 1.0),  # always 0.731 (kaomoji: underscore kept)
    ("white_background", 0, (0, 8, 0), -7.0),
    ("hatsune_miku", 4, (0, 0, 8), -6.0),  # red: sigmoid(2) = 0.881
    ("kirisame_marisa", 4, (8, 0, 0), -7.0),  # blue: sigmoid(1) = 0.731
]


def build_tagger(folder: Path, size: int = 32, bias_shift: float = 0.0) -> Path:
    """Write `model.onnx` (input `input_1:0` (batch, size, size, 3), output `predictions_sigmoid`)
    and `selected_tags.csv` into `folder`, as in the SmilingWolf/wd-v1-4-* repos."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    weights = np.array([t[2] for t in TAGS], np.float32).T / 255.0  # (3, n_tags)
    bias = np.array([t[3] + bias_shift for t in TAGS], np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input_1:0", "axes"], ["mean"], keepdims=0),  # (N, 3)
            helper.make_node("MatMul", ["mean", "W"], ["scaled"]),
            helper.make_node("Add", ["scaled", "b"], ["logits"]),
            helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
        ],
        "tiny-wd14",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", len(TAGS)])],
        initializer=[
            numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
            numpy_helper.from_array(weights, "W"),
            numpy_helper.from_array(bias, "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    rows = [
        "tag_id,name,category,count",
        *(f"{1000 + i},{name},{cat},{100 - i}" for i, (name, cat, _, _) in enumerate(TAGS)),
    ]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


# ---------------------------------------------------------------------------------------------
# A tiny random BLIP with a BERT tokenizer from a small vocab, saved as from_pretrained reads it.

WORDS = "a an the of picture photo red blue green circle square cat dog on in with and sitting small big".split()


def build_blip(folder: Path) -> Path:
    """A seeded, randomly initialised BlipForConditionalGeneration + BlipProcessor in `folder`."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(vocab))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # BLIP's decoder start token, as in Salesforce's repos
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "eos_token_id": tokenizer.sep_token_id,
    }
    config = BlipConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "encoder_hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 128,
            **ids,
        },
        projection_dim=32,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).eval().save_pretrained(folder)
    BlipProcessor(BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tagger(tmp_path_factory.mktemp("wd14"))


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_blip(tmp_path_factory.mktemp("blip"))


def solid(color: tuple[int, int, int], size: tuple[int, int] = (40, 40)) -> Image.Image:
    return Image.new("RGB", size, color)


# ---------------------------------------------------------------------------------------------
# WD14


def test_wd14_preprocess_pads_on_white_resizes_and_swaps_to_bgr() -> None:
    array = wd14_preprocess(solid(RED, (40, 20)), 32)  # wide: padded top and bottom
    assert array.shape == (32, 32, 3) and array.dtype == np.float32
    assert array[0, 16].tolist() == [255, 255, 255]  # white padding
    assert array[16, 16].tolist() == [0, 0, 255]  # red in BGR order
    assert array.max() == 255 and array.min() == 0  # 0..255, not normalised
    clear = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent: composited on white
    assert wd14_preprocess(clear, 8).tolist() == np.full((8, 8, 3), 255, np.float32).tolist()


def test_tagger_reads_input_side_and_scores_in_batches(tmp_path: Path, tagger_dir: Path) -> None:
    tagger = Wd14Tagger(build_tagger(tmp_path / "t24", size=24), Wd14Settings(), "cpu")
    scores = tagger.scores([solid(RED), solid(BLUE, (30, 50))])
    assert tagger.size == 24 and scores.shape == (2, len(TAGS)) and scores.dtype == np.float32
    names = [t[0] for t in TAGS]
    assert scores[0, names.index("red_theme")] == pytest.approx(1 / (1 + np.exp(-4)), abs=1e-5)
    assert scores[0, names.index("long_hair")] == pytest.approx(0.5)
    # The 30×50 blue image is padded with white to 50×50: 2/5 of the pixels are white (bicubic
    # edges blur that a little); unpadded, the score would be sigmoid(-7) = 0.0009.
    assert scores[1, names.index("white_background")] == pytest.approx(1 / (1 + np.exp(-(8 * 0.4 - 7))), abs=1e-3)
    one = Wd14Tagger(tagger_dir, Wd14Settings(), "cpu")
    assert one.scores([solid(RED)]).tolist() == one.scores([solid(RED), solid(BLUE)])[:1].tolist()
    assert one.size == 32


def test_select_tags_thresholds_order_rating_and_names(tagger_dir: Path) -> None:
    tags = read_selected_tags(tagger_dir / "selected_tags.csv")
    assert tags[0] == Tag("general", 9) and len(tags) == len(TAGS)
    tagger = Wd14Tagger(tagger_dir, Wd14Settings(), "cpu")
    red, blue = tagger.scores([solid(RED), solid(BLUE)])

    def pick(scores: np.ndarray, **settings: Any) -> str:
        return select_tags(scores, tags, Wd14Settings(**settings))

    assert pick(red) == "hatsune miku, red theme, ^_^, long hair"  # character first, by falling score
    assert pick(blue) == "blue theme, ^_^, long hair"  # kirisame_marisa (0.73) is under 0.85
    assert pick(blue, character_threshold=0.7) == "kirisame marisa, blue theme, ^_^, long hair"
    assert pick(red, general_threshold=0.6) == "hatsune miku, red theme, ^_^"
    assert pick(red, character_threshold=0.9) == "red theme, ^_^, long hair"
    assert pick(red, include_rating=True) == "general, hatsune miku, red theme, ^_^, long hair"
    assert pick(blue, include_rating=True) == "sensitive, blue theme, ^_^, long hair"
    assert pick(red, undesired_tags=("Long_Hair", "red theme")) == "hatsune miku, ^_^"
    assert pick(red, character_first=False) == "red theme, ^_^, long hair, hatsune miku"
    assert pick(red, replace_underscores=False) == "hatsune_miku, red_theme, ^_^, long_hair"
    with pytest.raises(ValueError, match="2 scores but selected_tags.csv lists"):
        select_tags(red[:2], tags, Wd14Settings())


def test_tagger_caption_round_trips_raw_scores(tagger_dir: Path) -> None:
    tagger = Wd14Tagger(tagger_dir, Wd14Settings(general_threshold=0.6), "cpu")
    raw = tagger.run([solid(RED)])
    assert len(raw) == 1 and tagger.caption(raw[0]) == "hatsune miku, red theme, ^_^"
    assert tagger.identity() == {}  # scores do not depend on the selection settings


def test_missing_tagger_files_name_the_path_and_param(tmp_path: Path, tagger_dir: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"`caption.captioner_path`.*{missing}"):
        locate_model("wd14", str(missing), tmp_path)
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(tagger_dir / "selected_tags.csv", half)
    with pytest.raises(FileNotFoundError, match=rf"`caption.captioner_path`.*{half / 'model.onnx'}"):
        model_files("wd14", locate_model("wd14", str(half), tmp_path))
    # A relative folder is taken from the project root; a hub id is tried only when no such folder exists.
    assert locate_model("wd14", tagger_dir.name, tagger_dir.parent) == tagger_dir
    with pytest.raises(FileNotFoundError, match=r"`caption.captioner_path` = 'nobody/no-tagger'.*Hugging Face"):
        locate_model("wd14", "nobody/no-tagger", tmp_path)  # HF_HUB_OFFLINE=1: nothing cached


# ---------------------------------------------------------------------------------------------
# BLIP


def test_blip_captions_are_strings_and_deterministic(blip_dir: Path) -> None:
    captioner = BlipCaptioner(blip_dir, BlipSettings(min_length=3, max_length=8), "cpu")
    images = [solid(RED), solid(BLUE, (24, 48))]
    first = [captioner.caption(r) for r in captioner.run(images)]
    assert all(isinstance(c, str) and c for c in first) and len(first) == 2
    assert [captioner.caption(r) for r in captioner.run(images)] == first
    assert set(" ".join(first).split()) <= set(WORDS)  # decoded from the tiny vocab, special tokens dropped


@pytest.mark.parametrize(("decoding", "prompt"), [("beam", ""), ("nucleus", ""), ("beam", "a picture of")])
def test_blip_lengths_are_new_tokens(blip_dir: Path, decoding: str, prompt: str) -> None:
    images = [solid(RED), solid(BLUE)]
    exact = BlipCaptioner(blip_dir, BlipSettings(decoding=decoding, min_length=6, max_length=6, prompt=prompt), "cpu")
    assert [len(ids) for ids in exact.generate_ids(images)] == [6, 6]  # prompt tokens are not counted
    ranged = BlipCaptioner(blip_dir, BlipSettings(decoding=decoding, min_length=2, max_length=4, prompt=prompt), "cpu")
    assert all(2 <= len(ids) <= 4 for ids in ranged.generate_ids(images))


def test_blip_beam_and_nucleus_settings_reach_generate(blip_dir: Path) -> None:
    beam = BlipSettings(decoding="beam", num_beams=4)
    assert beam.generate_kwargs() == {"min_new_tokens": 5, "max_new_tokens": 75, "do_sample": False, "num_beams": 4}
    nucleus = BlipSettings(decoding="nucleus", top_p=0.5)
    assert nucleus.generate_kwargs()["do_sample"] is True and nucleus.generate_kwargs()["top_p"] == 0.5
    # Only what changes the caption goes into its cache key.
    assert "top_p" not in beam.identity() and "num_beams" not in nucleus.identity() and "seed" in nucleus.identity()

    red, blue = solid(RED), solid(BLUE)
    sample = {
        seed: BlipCaptioner(blip_dir, BlipSettings(decoding="nucleus", seed=seed, min_length=8, max_length=8), "cpu")
        for seed in (1, 2, 3)
    }
    alone = sample[1].generate_ids([red])[0]
    assert sample[1].generate_ids([blue, red])[1] == alone  # seeded per image: the batch does not matter
    assert len({tuple(s.generate_ids([red])[0]) for s in sample.values()}) > 1  # the seed matters
    greedy = BlipCaptioner(blip_dir, BlipSettings(num_beams=1, min_length=8, max_length=8), "cpu").generate_ids([red])[
        0
    ]
    assert len({tuple(greedy), *(tuple(s.generate_ids([red])[0]) for s in sample.values())}) > 1  # sampling ≠ greedy


def test_missing_blip_files_name_the_path_and_param(tmp_path: Path, blip_dir: Path) -> None:
    folder = tmp_path / "blip"
    folder.mkdir()
    shutil.copy(blip_dir / "vocab.txt", folder)
    with pytest.raises(FileNotFoundError, match=rf"`caption.captioner_path`.*{folder / 'config.json'}"):
        model_files("blip", folder)
    shutil.copy(blip_dir / "config.json", folder)
    with pytest.raises(FileNotFoundError, match=rf"`caption.captioner_path`.*no .safetensors weights in {folder}"):
        model_files("blip", folder)
    names = [p.name for p in model_files("blip", blip_dir)]
    assert "model.safetensors" in names and "config.json" in names and "vocab.txt" in names


# ---------------------------------------------------------------------------------------------
# The caption stage with a captioner


def make_images(folder: Path, items: list[tuple[str, tuple[int, int, int], str | None]]) -> Path:
    """Real PNGs and an ingest-style manifest: (source name, colour, sidecar caption or None)."""
    rows = []
    for i, (source, color, sidecar) in enumerate(items):
        image_id = f"{i + 1:016x}"
        img = solid(color, (40, 32))
        (folder / "images").mkdir(parents=True, exist_ok=True)
        save_png(img, folder / "images" / f"{image_id}.png")
        rows.append(
            {
                "id": image_id,
                "file": f"images/{image_id}.png",
                "source": source,
                "width": 40,
                "height": 32,
                "repeats": 1,
                "class_token": "",
                "caption": sidecar,
                "caption_source": "sidecar" if sidecar else None,
                "pixel_hash": pixel_hash(img),
            }
        )
    write_jsonl(folder / "manifest.jsonl", rows)
    return folder


def caption(
    images: Path, work: Path, state_dir: Path, **overrides: Any
) -> tuple[dict[str, Any], dict[str, tuple[str, str]]]:
    """Run the stage as the runner would; returns the report and {source: (caption, caption_source)}."""
    out = work / "captions"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = StageEnv(
        store=ItemStore(work / "store"), state_dir=state_dir, show_progress=False, publish=RecordingPublisher()
    )
    summary = run(Params(model=MODEL, **overrides), Paths(images=images), Paths(captions=out), env)
    return summary, {m["source"]: (m["caption"], m["caption_source"]) for m in read_jsonl(out / "manifest.jsonl")}


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return make_images(
        tmp_path / "ingested",
        [
            ("red.png", RED, "a red thing, long_hair"),  # sidecar
            ("IMG_0001.png", BLUE, None),  # camera name: falls to the template
            ("a crimson square.png", RED, None),  # file-name caption
        ],
    )


def test_merge_caption_modes() -> None:
    assert merge_caption(("a, b", "sidecar"), "b, c", "keep", "wd14") == ("a, b", "sidecar")
    assert merge_caption(("{trigger}", "template"), "b, c", "keep", "wd14") == ("b, c", "wd14")
    assert merge_caption(("a, b", "sidecar"), "b, c", "replace", "wd14") == ("b, c", "wd14")
    assert merge_caption(("a, Long_Hair", "sidecar"), "long hair, c", "append", "wd14") == (
        "a, Long_Hair, c",
        "sidecar+wd14",
    )
    assert merge_caption(("a", "sidecar"), "", "replace", "wd14") == ("a", "sidecar")  # nothing above threshold
    assert merge_caption(None, "b", "append", "blip") == ("b", "blip")
    assert merge_caption(None, "", "keep", "blip") is None


@pytest.mark.parametrize(
    ("merge", "expected", "asked"),
    [
        (
            "keep",
            {
                "red.png": ("lfxstyle, a red thing, long_hair", "sidecar"),
                "IMG_0001.png": ("lfxstyle, blue theme, ^_^, long hair", "wd14"),
                "a crimson square.png": ("lfxstyle, a crimson square", "filename"),
            },
            1,
        ),
        (
            "replace",
            {
                "red.png": ("lfxstyle, hatsune miku, red theme, ^_^, long hair", "wd14"),
                "IMG_0001.png": ("lfxstyle, blue theme, ^_^, long hair", "wd14"),
                "a crimson square.png": ("lfxstyle, hatsune miku, red theme, ^_^, long hair", "wd14"),
            },
            3,
        ),
        (
            "append",
            {
                "red.png": ("lfxstyle, a red thing, long_hair, hatsune miku, red theme, ^_^", "sidecar+wd14"),
                "IMG_0001.png": ("lfxstyle, blue theme, ^_^, long hair", "template+wd14"),
                "a crimson square.png": (
                    "lfxstyle, a crimson square, hatsune miku, red theme, ^_^, long hair",
                    "filename+wd14",
                ),
            },
            3,
        ),
    ],
)
def test_stage_merges_wd14_tags(
    images: Path,
    tmp_path: Path,
    state_dir: Path,
    tagger_dir: Path,
    merge: str,
    expected: dict[str, tuple[str, str]],
    asked: int,
) -> None:
    summary, got = caption(
        images, tmp_path / "work", state_dir, captioner="wd14", captioner_path=str(tagger_dir), merge=merge
    )
    assert got == expected
    assert summary["captioner"] == "wd14" and summary["merge"] == merge
    assert summary["machine_captioned"] == summary["generated"] == asked and summary["reused"] == 0
    assert summary["computed"] == summary["items"] == 3


def test_stage_reuses_cached_tagger_output(
    images: Path, tmp_path: Path, state_dir: Path, tagger_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real_run = Wd14Tagger.run
    monkeypatch.setattr(Wd14Tagger, "run", lambda self, ims: calls.append(len(ims)) or real_run(self, ims))
    settings = {"captioner": "wd14", "captioner_path": str(tagger_dir), "merge": "replace"}
    first, captions = caption(images, tmp_path / "work", state_dir, **settings)
    assert calls == [3] and first["generated"] == 3

    again, same = caption(images, tmp_path / "work", state_dir, **settings)
    assert calls == [3] and same == captions  # the model ran on no image
    assert again["generated"] == 0 and again["reused"] == 3 and again["computed"] == 0

    # A threshold only re-selects tags from the cached scores: new captions, no model run.
    stricter, changed = caption(images, tmp_path / "work", state_dir, **settings, wd14_general_threshold=0.6)
    assert calls == [3] and stricter["generated"] == 0
    assert changed["red.png"] == ("lfxstyle, hatsune miku, red theme, ^_^", "wd14")

    # Another model (same folder, other weights) is another identity: every image runs again.
    build_tagger(tmp_path / "other", bias_shift=0.5)
    other, _ = caption(images, tmp_path / "work", state_dir, **{**settings, "captioner_path": str(tmp_path / "other")})
    assert calls == [3, 3] and other["generated"] == 3

    # A changed image runs alone.
    with Image.open(images / "images" / f"{2:016x}.png") as img:
        pixels = np.asarray(img).copy()
    pixels[0, 0] = (1, 2, 3)
    edited = Image.fromarray(pixels)
    save_png(edited, images / "images" / f"{2:016x}.png")
    rows = read_jsonl(images / "manifest.jsonl")
    rows[1]["pixel_hash"] = pixel_hash(edited)
    write_jsonl(images / "manifest.jsonl", rows)
    edited_run, _ = caption(images, tmp_path / "work", state_dir, **settings)
    assert calls == [3, 3, 1] and edited_run["generated"] == 1 and edited_run["reused"] == 2


def test_stage_with_blip(images: Path, tmp_path: Path, state_dir: Path, blip_dir: Path) -> None:
    settings = {
        "captioner": "blip",
        "captioner_path": str(blip_dir),
        "merge": "keep",
        "blip_min_length": 3,
        "blip_max_length": 6,
    }
    summary, got = caption(images, tmp_path / "work", state_dir, **settings)
    assert summary["generated"] == 1 and got["red.png"] == ("lfxstyle, a red thing, long_hair", "sidecar")
    text, source = got["IMG_0001.png"]
    assert source == "blip" and text.startswith("lfxstyle, ") and 3 <= len(text.split()) - 1 <= 6
    assert caption(images, tmp_path / "work", state_dir, **settings)[0]["generated"] == 0
    # top_p does not change beam search: still cached; the number of beams does.
    assert caption(images, tmp_path / "work", state_dir, **settings, blip_top_p=0.5)[0]["generated"] == 0
    assert caption(images, tmp_path / "work", state_dir, **settings, blip_num_beams=1)[0]["generated"] == 1
    summary, got = caption(images, tmp_path / "work", state_dir, **{**settings, "merge": "replace"})
    assert summary["machine_captioned"] == 3 and {s for _, s in got.values()} == {"blip"}


def test_stage_missing_model_names_path_and_param(images: Path, tmp_path: Path, state_dir: Path) -> None:
    missing = tmp_path / "no-tagger"
    with pytest.raises(FileNotFoundError, match=rf"`caption.captioner_path`.*{missing}"):
        caption(images, tmp_path / "work", state_dir, captioner="wd14", captioner_path=str(missing))
    missing.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"`caption.captioner_path`.*{missing / 'model.onnx'}"):
        caption(images, tmp_path / "work", state_dir, captioner="wd14", captioner_path=str(missing))


def test_captioner_params_are_validated(repo_root: Path) -> None:
    with pytest.raises(pydantic.ValidationError, match="blip_max_length"):
        Params(model=MODEL, blip_min_length=10, blip_max_length=5)
    with pytest.raises(pydantic.ValidationError, match="wd14_general_threshold"):
        Params(model=MODEL, wd14_general_threshold=1.5)
    stage = load_pipeline(repo_root).stages["caption"]
    _, problems = validate_stage(stage, {"caption": {"merge": "prepend"}})
    assert len(problems) == 1 and problems[0].startswith("`caption.merge`")
    _, problems = validate_stage(stage, {"caption": {"captioner": "clip"}})
    assert len(problems) == 1 and problems[0].startswith("`caption.captioner`")
    _, problems = validate_stage(stage, {"caption": {"blip_min_length": 9, "blip_max_length": 4}})
    assert (
        len(problems) == 1 and problems[0].startswith("`caption.blip_max_length`") and "blip_min_length" in problems[0]
    )
