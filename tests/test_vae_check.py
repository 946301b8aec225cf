"""The VAE reconstruction check (003 guide): the worst-window search, the side-by-side sheet, and
the latents stage measuring decode(encode(x)) per image with the training VAE, cached per latent."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from loraforge.evaluation import html_report as htmlreport
from loraforge.data.measures import psnr
from loraforge.data.images import read_jsonl, resize_cover_crop
from loraforge.models.loading import load_vae, resolve_model
from loraforge.pipeline.params import ModelParams
from loraforge.pipeline.runner import Paths, StageEnv
from loraforge.store.items import ItemStore
from loraforge.data.vae_check import MAX_DB, decode_latent, side_by_side, window_mse, worst_window
from stages.latents import Params, run
from tests.helpers import RecordingPublisher
from tests.test_latents import ingest, picture, write_images

SD15 = ModelParams(base="builtin:tiny-sd15", device="cpu")


def smooth(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize(size, Image.Resampling.BILINEAR)


# ---------------------------------------------------------------------------------------------
# Pure helpers


def test_window_mse_matches_a_brute_force_mean_at_every_position() -> None:
    error = np.random.default_rng(0).random((13, 17))
    means = window_mse(error, 5)
    assert means.shape == (9, 13)
    for top in range(9):
        for left in range(13):
            assert means[top, left] == pytest.approx(error[top : top + 5, left : left + 5].mean())


def test_worst_window_finds_the_damaged_patch_and_its_psnr() -> None:
    original = smooth((96, 64), 1)
    damaged = np.asarray(original).copy()
    damaged[40:56, 20:36] = 255 - damaged[40:56, 20:36]  # a 16x16 patch the "VAE" lost
    box, db = worst_window(original, Image.fromarray(damaged), 16)
    assert box == (20, 40, 36, 56)
    diff = np.asarray(original, dtype=np.float64)[40:56, 20:36] - damaged[40:56, 20:36]
    assert db == pytest.approx(10 * math.log10(255**2 / np.mean(diff**2)))
    assert worst_window(original, original, 16)[1] == MAX_DB  # identical: a finite, JSON-safe ceiling
    assert worst_window(original, Image.fromarray(damaged), 500)[0] == (0, 0, 64, 64)  # clipped to the image


def test_the_sheet_is_original_reconstruction_and_error_enlarged() -> None:
    original = smooth((64, 64), 2)
    changed = np.asarray(original).copy()
    changed[0:8, 0:8] = 0
    sheet = side_by_side(original, Image.fromarray(changed), (0, 0, 32, 32))
    scale = 6  # 32 px enlarged to at least 192
    assert sheet.size == (3 * 32 * scale + 8, 32 * scale)
    panel = lambda i: np.asarray(sheet)[:, i * (32 * scale + 4) : i * (32 * scale + 4) + 32 * scale]  # noqa: E731
    assert np.array_equal(panel(0)[::scale, ::scale], np.asarray(original)[:32, :32])
    assert np.array_equal(panel(1)[::scale, ::scale], changed[:32, :32])
    error = panel(2)[::scale, ::scale, 0]
    assert error[8:, 8:].max() == 0 and error[:8, :8].min() > 0  # the error panel lights up only where pixels changed


# ---------------------------------------------------------------------------------------------
# The stage


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return write_images(tmp_path / "src")


def latents(
    images: Path, work: Path, state_dir: Path, publish: Any = None, **params: Any
) -> tuple[dict[str, Any], Path, Path]:
    out, check = work / "latents", work / "vae_check"
    for folder in (out, check):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    env = StageEnv(store=ItemStore(work / "store"), state_dir=state_dir, show_progress=False)
    if publish is not None:
        env.publish = publish
    params = {"bucket_step": 32, "vae_check": True, "vae_check_worst": 2, "vae_check_window": 32, **params}
    summary = run(Params(model=SD15, **params), Paths(images=images), Paths(latents=out, vae_check=check), env)
    return summary, out, check


def test_psnr_per_image_is_decode_of_the_cached_latent_against_its_crop(
    dataset: Path, tmp_path: Path, state_dir: Path
) -> None:
    work = tmp_path / "work"
    images = ingest(dataset, work, state_dir)
    publish = RecordingPublisher()
    summary, out, check = latents(images, work, state_dir, publish=publish)
    section = summary["vae_check"]
    assert (section["images"], section["computed"], section["reused"]) == (4, 4, 0)
    vae = load_vae(resolve_model(SD15, state_dir), torch.device("cpu"))
    rows = {r["id"]: r for r in read_jsonl(images / "manifest.jsonl")}
    manifest = {r["id"]: r for r in read_jsonl(out / "manifest.jsonl")}
    for entry in section["per_image"]:
        m = manifest[entry["id"]]
        with Image.open(images / rows[entry["id"]]["file"]) as img:
            crop = resize_cover_crop(img.convert("RGB"), *m["bucket"])[0]
        reconstruction = decode_latent(vae, load_file(out / m["file"])["latent"])
        assert reconstruction.size == crop.size
        assert entry["psnr_db"] == pytest.approx(psnr(crop, reconstruction), abs=0.01)
        assert entry["worst_window_psnr_db"] <= entry["psnr_db"] + 0.01  # the worst window is no better than the mean
        left, top, right, bottom = entry["worst_window"]
        assert right - left == bottom - top == min(32, *crop.size)
    dbs = [e["psnr_db"] for e in section["per_image"]]
    assert dbs == sorted(dbs) and section["min_psnr_db"] == dbs[0]
    assert section["mean_psnr_db"] == pytest.approx(sum(dbs) / 4, abs=0.01)
    # The worst two are on disk, named by rank, listed in index.json and the report.
    assert [w["id"] for w in section["worst"]] == [e["id"] for e in section["per_image"][:2]]
    assert sorted(p.name for p in check.iterdir()) == sorted(
        ["index.json", *[Path(w["sheet"]).name for w in section["worst"]]]
    )
    assert json.loads((check / "index.json").read_text()) == section
    for w in section["worst"]:
        with Image.open(check / Path(w["sheet"]).name) as sheet:
            assert sheet.height >= 192 and sheet.width > 3 * sheet.height
    assert [r["source"] for r in publish.tables["vae-reconstruction"]] == [e["source"] for e in section["per_image"]]


def test_the_check_reruns_only_for_new_images_and_a_changed_window(
    dataset: Path, tmp_path: Path, state_dir: Path
) -> None:
    work = tmp_path / "work"
    images = ingest(dataset, work, state_dir)
    first = latents(images, work, state_dir)[0]["vae_check"]

    again = latents(images, work, state_dir)[0]
    assert (again["computed"], again["vae_check"]["computed"], again["vae_check"]["reused"]) == (0, 0, 4)
    assert again["vae_check"]["per_image"] == first["per_image"]

    picture(dataset / "extra.png", (100, 100), seed=7)
    images = ingest(dataset, work, state_dir)
    more = latents(images, work, state_dir)[0]
    assert (more["computed"], more["vae_check"]["computed"], more["vae_check"]["reused"]) == (1, 1, 4)

    wider = latents(images, work, state_dir, vae_check_window=48)[0]
    assert (wider["computed"], wider["vae_check"]["computed"]) == (0, 5)  # latents reused, windows measured again
    assert {e["psnr_db"] for e in wider["vae_check"]["per_image"]} == {
        e["psnr_db"] for e in more["vae_check"]["per_image"]
    }


def test_off_by_default_writes_an_empty_index_and_decodes_nothing(
    dataset: Path, tmp_path: Path, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stages.latents as latents_stage

    def fail(*args: Any) -> None:
        raise AssertionError("decoded with vae_check off")

    monkeypatch.setattr(latents_stage, "decode_latent", fail)
    work = tmp_path / "work"
    summary, _, check = latents(ingest(dataset, work, state_dir), work, state_dir, vae_check=False)
    assert summary["vae_check"]["enabled"] is False and summary["vae_check"]["images"] == 0
    assert [p.name for p in check.iterdir()] == ["index.json"]


def test_the_evaluation_page_shows_the_worst_sheets_with_their_psnr() -> None:
    report = {
        "vae_check": {
            "images": 5,
            "mean_psnr_db": 21.5,
            "worst": [
                {"source": "cat.png", "psnr_db": 12.25, "worst_window_psnr_db": 8.5, "sheet": "vae_check/01-abc.png"}
            ],
        }
    }
    html = htmlreport.vae_section(report)
    assert "What the VAE loses" in html and 'src="../vae_check/01-abc.png"' in html
    assert "cat.png: 12.25 dB (worst window 8.5 dB)" in html and "21.5 dB over 5 images" in html
    assert htmlreport.vae_section({"vae_check": {"worst": []}}) == "" and htmlreport.vae_section({}) == ""


def test_a_cold_run_reads_each_image_once_for_encoding_and_checking(
    dataset: Path, tmp_path: Path, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stages.latents as latents_stage

    real, calls = latents_stage.crop_for, {"n": 0}

    def counting(*args: Any) -> Any:
        calls["n"] += 1
        return real(*args)

    work = tmp_path / "work"
    images = ingest(dataset, work, state_dir)
    monkeypatch.setattr(latents_stage, "crop_for", counting)
    summary = latents(images, work, state_dir)[0]
    assert summary["computed"] == summary["vae_check"]["computed"] == 4 and calls["n"] == 4  # the check reuses the crop
    calls["n"] = 0
    assert latents(images, work, state_dir, vae_check_window=48)[0]["vae_check"]["computed"] == 4 and calls["n"] == 4
