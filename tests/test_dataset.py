"""Dataset craft (`loraforge.data.measures` and its use in ingest): DSB with the 000 guide's worked
example, precision tiling, quality gates (resolution, near-duplicates, blur), anti-AI-filter cleanup."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from loraforge.data import measures as craft
from loraforge.data.images import read_jsonl
from loraforge.pipeline.params import DatasetParams, TileParams
from tests.helpers import RecordingPublisher
from tests.helpers import run_ingest as ingest

# The 000 guide's worked example: "Image - White% / Black%: 1 - 30% / 70%, 2 - 5% / 95%,
# 3 - 40% / 60%, 4 - 55% / 45%, 5 - 15% / 85%" → "29%W | 71%B"; removing images 2 and 5 gives
# "(30 + 40 + 55) / 3 = 41% white | ... = 59% black" (41.7 / 58.3, the guide rounds).
GUIDE_SHARES = [0.30, 0.05, 0.40, 0.55, 0.15]


def noise_with_white_share(share: float, size: int = 40, seed: int = 0) -> Image.Image:
    """Grey noise with exactly `share` of its pixels in the two lighter tones (≥ 128)."""
    rng = np.random.default_rng(seed)
    n = size * size
    white = np.zeros(n, dtype=bool)
    white[rng.permutation(n)[: round(share * n)]] = True
    values = np.where(white, rng.integers(128, 256, n), rng.integers(0, 128, n)).astype(np.uint8)
    return Image.fromarray(values.reshape(size, size)).convert("RGB")


def noise(size: tuple[int, int], seed: int, low: int = 0, high: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, (size[1], size[0], 3), dtype=np.uint8)


# ---------------------------------------------------------------- DSB


def test_dsb_of_the_guides_worked_example() -> None:
    balance = craft.dataset_dsb(GUIDE_SHARES)
    assert balance.white == pytest.approx(0.29) and balance.black == pytest.approx(0.71)  # "29%W | 71%B"
    assert balance.side == "black" and balance.dominant == pytest.approx(0.71)
    assert not craft.dsb_inside(balance.dominant, 0.60, 0.05)  # "above 70%, mediocre"

    drop = craft.fewest_removals(GUIDE_SHARES, 0.60, 0.05)
    assert drop == [1, 4]  # the guide's images 2 (5%W) and 5 (15%W)
    after = craft.dataset_dsb([s for i, s in enumerate(GUIDE_SHARES) if i not in drop])
    assert after.white == pytest.approx(125 / 300) and after.black == pytest.approx(175 / 300)  # 41.7%W | 58.3%B
    assert craft.dsb_inside(after.dominant, 0.60, 0.05)
    # One removal is not enough: without image 2 alone the set sits on the edge, 35%W | 65%B.
    assert craft.dataset_dsb([0.30, 0.40, 0.55, 0.15]).black == pytest.approx(0.65)
    assert not craft.dsb_inside(0.65, 0.60, 0.05)


def test_fewest_removals_edge_cases() -> None:
    assert craft.fewest_removals([0.40, 0.42], 0.60, 0.05) == []  # 41%W | 59%B: already inside
    assert craft.fewest_removals([0.5, 0.5, 0.5], 0.60, 0.05) is None  # every subset stays at 50%
    # Light datasets count too: the dominant side is white here (80%W), drop the lightest.
    assert craft.fewest_removals([0.95, 0.9, 0.6, 0.62], 0.60, 0.05) == [0, 1]


def test_fewest_removals_on_a_large_set_uses_the_ends() -> None:
    # 400 images (beyond the exhaustive limit for k ≥ 2): 300 at 10%W, 100 at 50%W → 20%W | 80%B.
    shares = [0.1] * 300 + [0.5] * 100
    drop = craft.fewest_removals(shares, 0.60, 0.05)
    assert drop is not None and all(shares[i] == 0.1 for i in drop)
    kept = [s for i, s in enumerate(shares) if i not in set(drop)]
    assert craft.dsb_inside(craft.dataset_dsb(kept).dominant, 0.60, 0.05)
    # Fewest: one image less would still be outside (the darkest ones move the mean most).
    assert not craft.dsb_inside(craft.dataset_dsb([0.1] * (300 - len(drop) + 1) + [0.5] * 100).dominant, 0.60, 0.05)


def test_white_share_desaturates_then_posterizes_to_four_tones(tmp_path: Path) -> None:
    # Columns: 30 at grey 200 (tone 3), 10 at 130 (tone 2), 40 at 100 (tone 1), 20 at 10 (tone 0).
    cols = [200] * 30 + [130] * 10 + [100] * 40 + [10] * 20
    Image.fromarray(np.tile(np.array(cols, dtype=np.uint8), (50, 1))).save(tmp_path / "g.png")
    assert craft.dsb_white_share(Image.open(tmp_path / "g.png")) == pytest.approx(0.40)
    # Desaturation is luma: pure red (luma 76) is dark, pure yellow (luma 226) is light.
    half = np.zeros((10, 20, 3), dtype=np.uint8)
    half[:, :10] = (255, 0, 0)
    half[:, 10:] = (255, 255, 0)
    assert craft.dsb_white_share(Image.fromarray(half)) == pytest.approx(0.5)
    assert craft.dsb_white_share(noise_with_white_share(0.3)) == pytest.approx(0.3)


def test_ingest_reports_dsb_and_drops_only_when_enforced(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i, share in enumerate(GUIDE_SHARES, start=1):
        noise_with_white_share(share, seed=i).save(src / f"{i}.png")
    publisher = RecordingPublisher()
    summary, out = ingest(src, tmp_path / "work", publisher)
    dsb = summary["dsb"]
    assert (dsb["white"], dsb["black"], dsb["side"], dsb["inside"]) == (0.29, 0.71, "black", False)
    assert dsb["suggested_removals"] == [{"source": "2.png", "tile": None}, {"source": "5.png", "tile": None}]
    assert dsb["after_removals"]["white"] == pytest.approx(0.4167, abs=1e-4)
    assert [r["white"] for r in dsb["images"]] == GUIDE_SHARES
    assert [r["white"] for r in publisher.tables["dsb"]] == GUIDE_SHARES
    assert len(read_jsonl(out / "manifest.jsonl")) == 5 and read_jsonl(out / "dropped.jsonl") == []

    summary, out = ingest(src, tmp_path / "work", dataset=DatasetParams(dsb_enforce=True))
    assert [r["source"] for r in read_jsonl(out / "manifest.jsonl")] == ["1.png", "3.png", "4.png"]
    dropped = read_jsonl(out / "dropped.jsonl")
    assert [d["source"] for d in dropped] == ["2.png", "5.png"] and all(d["reason"].startswith("DSB") for d in dropped)
    assert summary["kept"] == 3 and summary["dsb"]["enforced"]


# ---------------------------------------------------------------- precision tiling


def test_tile_boxes_cover_the_image_exactly() -> None:
    boxes = craft.tile_boxes(1001, 777, 4, 4)
    assert len(boxes) == 16  # the 000 guide: "16 images for our dataset" from one image
    covered = np.zeros((777, 1001), dtype=int)
    for left, top, right, bottom in boxes:
        covered[top:bottom, left:right] += 1
    assert (covered == 1).all()
    with pytest.raises(ValueError, match="cannot be cut into 8 rows"):
        craft.tile_boxes(10, 4, 8, 2)


def test_blur_and_exposure_measures() -> None:
    sharp = Image.fromarray(noise((64, 64), 1))
    assert craft.laplacian_variance(sharp) > 10 * craft.laplacian_variance(sharp.filter(ImageFilter.GaussianBlur(2)))
    assert craft.laplacian_variance(Image.new("RGB", (8, 8), (90, 90, 90))) == 0.0
    # A 4-pixel checkerboard 0/255: Laplacian ±1020 everywhere → variance 1020².
    checker = ((np.indices((6, 6)).sum(axis=0) % 2) * 255).astype(np.uint8)
    assert craft.laplacian_variance(Image.fromarray(checker)) == pytest.approx(1020.0**2)
    assert craft.clipped_share(Image.fromarray(checker)) == 1.0
    assert craft.clipped_share(Image.new("RGB", (4, 4), (128, 128, 128))) == 0.0
    assert craft.sector_drop_reason(5.0, 0.0, 50.0, 0.5).startswith("blur")
    assert craft.sector_drop_reason(500.0, 0.9, 50.0, 0.5).startswith("exposure")
    assert craft.sector_drop_reason(500.0, 0.1, 50.0, 0.5) is None


def test_ingest_tiles_an_image_and_drops_empty_sectors(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    pixels = noise((64, 64), 7, 30, 226)  # sharp, nothing clipped
    pixels[:32, 32:] = 128  # r1c2: flat → blur
    pixels[32:, :32] = noise((32, 32), 8)[..., :1].repeat(3, axis=2) // 128 * 255  # r2c1: 0/255 → exposure
    Image.fromarray(pixels).save(src / "big.png")
    Image.fromarray(noise((40, 40), 9)).save(src / "other.png")
    ds = DatasetParams(tile=(TileParams(source="big.png", rows=2, cols=2),))
    work = tmp_path / "work"
    summary, out = ingest(src, work, dataset=ds)

    rows = read_jsonl(out / "manifest.jsonl")
    assert [(r["source"], r["tile"]) for r in rows] == [("big.png", "r1c1"), ("big.png", "r2c2"), ("other.png", None)]
    for r, (top, left) in zip(rows, [(0, 0), (32, 32)]):
        assert np.array_equal(np.asarray(Image.open(out / r["file"])), pixels[top : top + 32, left : left + 32])
    dropped = {d["tile"]: d["reason"] for d in read_jsonl(out / "dropped.jsonl")}
    assert dropped["r1c2"].startswith("blur: Laplacian variance 0.0") and dropped["r2c1"].startswith("exposure: 100.0%")
    assert summary["tiling"] == [{"source": "big.png", "rows": 2, "cols": 2, "kept": 2, "dropped": 2}]

    # Rerun: every sector and metric comes from the store (no new entries, same output).
    entries = sorted(p for p in (work / "store").rglob("*") if p.is_file())
    ingest(src, work, dataset=ds)
    assert sorted(p for p in (work / "store").rglob("*") if p.is_file()) == entries
    # Another grid is new work: 3 × 1 sectors (and their metrics) are added.
    ingest(
        src,
        work,
        dataset=DatasetParams(
            tile=(TileParams(source="*.png", rows=3, cols=1),), tile_min_sharpness=0, tile_max_clipped=1
        ),
    )
    assert len([p for p in (work / "store" / "tile-sector").rglob("*.png")]) == 4 + 3 + 3

    with pytest.raises(ValueError, match=r"`dataset.tile\[0\].source` = 'nope.png' matches no ingested image"):
        ingest(src, work, dataset=DatasetParams(tile=(TileParams(source="nope.png"),)))


# ---------------------------------------------------------------- quality gates


def test_dhash_sees_resized_copies_and_tells_different_images_apart() -> None:
    img = Image.fromarray(noise((48, 48), 3)).filter(ImageFilter.GaussianBlur(2))
    other = Image.fromarray(noise((48, 48), 4)).filter(ImageFilter.GaussianBlur(2))
    assert craft.hamming(craft.dhash(img), craft.dhash(img.resize((96, 96), Image.Resampling.LANCZOS))) <= 4
    assert craft.hamming(craft.dhash(img), craft.dhash(other)) > 12
    assert craft.near_duplicates([0b1011, 0b1010, 0b0100], [10, 20, 30], 1) == {0: 1}  # the larger (20) kept
    assert craft.near_duplicates([5, 5], [1, 1], -1) == {}


def test_ingest_gates_resolution_near_duplicates_and_blur(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    base = Image.fromarray(noise((40, 40), 11)).filter(ImageFilter.GaussianBlur(1))
    base.save(src / "a_small.png")
    base.resize((80, 80), Image.Resampling.LANCZOS).save(src / "b_large.jpg", quality=92)  # same picture, bigger
    Image.fromarray(noise((60, 60), 12)).filter(ImageFilter.GaussianBlur(4)).save(src / "c_blurred.png")
    Image.fromarray(noise((60, 60), 13)).save(src / "d_sharp.png")
    ds = DatasetParams(min_side=64, min_sharpness=20.0)
    summary, out = ingest(src, tmp_path / "work", dataset=ds)

    assert [r["source"] for r in read_jsonl(out / "manifest.jsonl")] == ["b_large.jpg", "d_sharp.png"]
    near = [d for d in read_jsonl(out / "duplicates.jsonl") if d["distance"] > 0 or d["source"] == "a_small.png"]
    assert [(d["source"], d["kept"]) for d in near] == [("a_small.png", "b_large.jpg")] and near[0]["distance"] <= 4
    assert [d["source"] for d in read_jsonl(out / "dropped.jsonl")] == ["c_blurred.png"]
    assert "`dataset.min_sharpness` 20.0" in read_jsonl(out / "dropped.jsonl")[0]["reason"]
    quality = summary["quality"]
    assert quality["min_side"] == 64 and [r["source"] for r in quality["low_resolution"]] == ["d_sharp.png"]
    assert quality["near_duplicates"] == 1 and quality["blurred"] == 1
    sharpness = {r["source"]: r["sharpness"] for r in summary["dsb"]["images"]}
    assert sharpness["d_sharp.png"] > 1000  # the blur score of every kept image is in the report


# ---------------------------------------------------------------- anti-AI-filter cleanup


def test_psnr_known_value() -> None:
    a = Image.new("RGB", (8, 8), (100, 100, 100))
    b = Image.new("RGB", (8, 8), (110, 110, 110))  # MSE 100 → 10·log10(255² / 100) = 28.13 dB
    assert craft.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 100)) == pytest.approx(28.13, abs=0.01)
    assert craft.psnr(a, a) == math.inf


def adversarial_pair(size: int = 64) -> tuple[Image.Image, Image.Image]:
    """A smooth picture and the same with a ±12 high-frequency pattern added (an 'anti-AI filter')."""
    y, x = np.mgrid[0:size, 0:size]
    smooth = np.stack([40 + 2 * x, 60 + 2 * y, 120 + x - y // 2], axis=-1).astype(np.float64)
    pattern = 12 * np.where((x + y) % 2 == 0, 1, -1)[..., None]
    as_img = lambda a: Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))  # noqa: E731
    return as_img(smooth), as_img(smooth + pattern)


def test_cleanup_removes_a_high_frequency_pattern() -> None:
    smooth, attacked = adversarial_pair()
    cleaned = craft.clean_adversarial(attacked)
    assert cleaned.size == attacked.size
    assert craft.psnr(smooth, cleaned) > craft.psnr(smooth, attacked) + 10  # the pattern is mostly gone


def test_ingest_cleanup_is_opt_in_and_reports_psnr(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    smooth, attacked = adversarial_pair()
    attacked.save(src / "attacked.png")
    summary, out = ingest(src, tmp_path / "work")
    assert summary["cleanup"] == []
    summary, out = ingest(src, tmp_path / "work", clean_adversarial=True)
    [row] = read_jsonl(out / "manifest.jsonl")
    written = Image.open(out / row["file"])
    assert np.array_equal(np.asarray(written), np.asarray(craft.clean_adversarial(attacked)))
    [report] = summary["cleanup"]
    assert report["source"] == "attacked.png"
    assert report["psnr_db"] == pytest.approx(craft.psnr(attacked, written), abs=0.01) and report["psnr_db"] < 40
