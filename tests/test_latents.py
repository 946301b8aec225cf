"""Stage `latents`: bucket making and selection, VAE encoding with the tiny SDXL model, what the
latent cache keys on (pixels, bucket, flip, VAE weights), and params validation."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from loraforge.data.images import read_jsonl, resize_cover_crop
from loraforge.models.loading import load_vae, resolve_model
from loraforge.pipeline.params import ModelParams, validate_stage
from loraforge.pipeline.runner import Paths, StageEnv
from loraforge.pipeline.spec import load_pipeline
from loraforge.store.items import ItemStore
from stages import ingest as ingest_stage
from stages import upscale as upscale_stage
from loraforge.data.buckets import make_buckets, select_bucket
from loraforge.models.vae import encode_batch
from stages.latents import Params, run

SDXL = ModelParams(base="builtin:tiny-sdxl", device="cpu")
SD15 = ModelParams(base="builtin:tiny-sd15", device="cpu")
# name -> (width, height) and the bucket it gets at resolution 128, step 32 (the tiny defaults).
IMAGES = {
    "wide.png": ((210, 120), (160, 96)),  # aspect 1.75 -> 160x96 (1.67); covers at 168x96, crops 4 px each side
    "tall.png": ((120, 200), (96, 160)),
    "square.png": ((150, 150), (128, 128)),
    "small.png": ((72, 50), (64, 32)),  # below 128² px: its own size, floored to the step, never upscaled
}


def picture(path: Path, size: tuple[int, int], seed: int) -> None:
    """A smooth random image (noise would make the VAE test values less meaningful)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(coarse).resize(size, Image.Resampling.BILINEAR).save(path)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Any:
    """The tiny VAE gains nothing from threads, and on a busy 2-core box two spinning OpenMP
    threads made this module ~5x slower; restored afterwards for the other modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ingest(src: Path, work: Path, state_dir: Path) -> Path:
    out = work / "ingested"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = StageEnv(store=ItemStore(work / "store"), state_dir=state_dir, show_progress=False)
    ingest_stage.run(ingest_stage.Params(source=str(src)), Paths(source=src), Paths(images=out), env)
    return out


def write_images(src: Path) -> Path:
    """The four IMAGES as smooth random pictures in `src`."""
    for seed, (name, (size, _)) in enumerate(IMAGES.items()):
        picture(src / name, size, seed)
    return src


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return write_images(tmp_path / "src")


def latents(
    images: Path, work: Path, state_dir: Path, model: ModelParams = SDXL, **params: Any
) -> tuple[dict[str, Any], Path]:
    """Run the stage as the runner would: a fresh output folder, a store that persists in `work`."""
    out = work / "latents"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = StageEnv(store=ItemStore(work / "store"), state_dir=state_dir, show_progress=False)
    summary = run(Params(model=model, **{"bucket_step": 32, **params}), Paths(images=images), Paths(latents=out), env)
    return summary, out


def tensors(out: Path) -> dict[str, torch.Tensor]:
    """Latent per manifest file name."""
    return {r["file"]: load_file(out / r["file"])["latent"] for r in read_jsonl(out / "manifest.jsonl")}


# ---------------------------------------------------------------------------------------------
# Buckets


@pytest.mark.parametrize(
    ("resolution", "step", "lo", "hi"),
    [
        (128, 32, 64, 256),
        (128, 8, 32, 512),
        (512, 64, 256, 1024),
        (1024, 64, 512, 2048),
        (1024, 32, 256, 4096),
        (128, 32, 40, 250),
    ],
)
def test_make_buckets(resolution: int, step: int, lo: int, hi: int) -> None:
    buckets = make_buckets(resolution, step, lo, hi)
    assert buckets and len(set(buckets)) == len(buckets)
    for w, h in buckets:
        assert w * h <= resolution * resolution
        assert w % step == 0 and h % step == 0
        assert lo <= w <= hi and lo <= h <= hi
        assert (h, w) in buckets  # both orientations
    assert any(w > h for w, h in buckets) and any(w < h for w, h in buckets)
    aspects = [w / h for w, h in buckets]
    assert aspects == sorted(aspects)
    if resolution % step == 0:
        assert (resolution, resolution) in buckets  # the square bucket is the full resolution


def test_make_buckets_sdxl_matches_kohya() -> None:
    buckets = make_buckets(1024, 64, 512, 2048)
    for bucket in [(1024, 1024), (896, 1152), (1152, 896), (832, 1216), (768, 1344), (640, 1536), (512, 2048)]:
        assert bucket in buckets
    # Each width gets the largest height that fits the area (one of the two orientations is that pair).
    for w, h in buckets:
        assert any(a * (b + 64) > 1024 * 1024 or b + 64 > 2048 for a, b in ((w, h), (h, w)))
    assert all(w * h > 0.9 * 1024 * 1024 for w, h in buckets if max(w, h) <= 1536)  # close to the full area


def test_select_bucket() -> None:
    buckets = make_buckets(128, 32, 64, 256)
    for size, bucket in IMAGES.values():
        assert select_bucket(*size, buckets, 128, 32) == bucket
    assert select_bucket(2000, 1000, buckets, 128, 32) == (160, 96)  # 2.0: 1.67 is closer than 3.0 (in log space)
    assert select_bucket(1000, 3000, buckets, 128, 32) == (64, 192)
    sdxl = make_buckets(1024, 64, 512, 2048)
    assert select_bucket(4000, 3000, sdxl, 1024, 64) == (1152, 896)  # landscape photo
    assert select_bucket(3000, 4000, sdxl, 1024, 64) == (896, 1152)  # portrait photo
    assert select_bucket(2048, 2048, sdxl, 1024, 64) == (1024, 1024)
    for w, h in [(1920, 1080), (1080, 1920), (5000, 1000), (1000, 5000), (1500, 1400)]:
        bw, bh = select_bucket(w, h, sdxl, 1024, 64)
        assert (bw > bh) == (w > h) and (bw, bh) in sdxl
    # Smaller than the bucket area: its own step-aligned size, never upscaled.
    assert select_bucket(700, 500, sdxl, 1024, 64) == (640, 448)
    assert select_bucket(500, 700, sdxl, 1024, 64) == (448, 640)
    assert select_bucket(1000, 1000, sdxl, 1024, 64) == (960, 960)
    for w, h in [(700, 500), (130, 1000), (999, 999)]:
        bw, bh = select_bucket(w, h, sdxl, 1024, 64)
        assert bw <= w and bh <= h and bw % 64 == 0 and bh % 64 == 0


# ---------------------------------------------------------------------------------------------
# The stage


def test_latents_match_buckets_and_record_sdxl_conditioning(dataset: Path, tmp_path: Path, state_dir: Path) -> None:
    work = tmp_path / "work"
    images = ingest(dataset, work, state_dir)
    summary, out = latents(images, work, state_dir)
    rows = {r["source"]: r for r in read_jsonl(images / "manifest.jsonl")}
    manifest = {r["id"]: r for r in read_jsonl(out / "manifest.jsonl")}
    assert len(manifest) == 4
    vae = load_vae(resolve_model(SDXL, state_dir), torch.device("cpu"))
    for name, ((w, h), (bw, bh)) in IMAGES.items():
        m = manifest[rows[name]["id"]]
        assert m["bucket"] == [bw, bh] and m["flip"] is False and m["repeats"] == 1
        assert m["file"] == f"{m['id']}.safetensors"
        assert m["original_size"] == [h, w]
        with Image.open(images / rows[name]["file"]) as img:
            crop, top_left, original = resize_cover_crop(img.convert("RGB"), bw, bh)
        assert m["crop_top_left"] == list(top_left) and list(original) == [h, w]
        latent = load_file(out / m["file"])["latent"]
        assert latent.shape == (4, bh // 8, bw // 8) and latent.dtype == torch.float32
        assert torch.isfinite(latent).all() and latent.abs().sum() > 0
        # The posterior mean of exactly that crop: deterministic, so a cached latent is the latent.
        assert torch.allclose(latent, encode_batch(vae, [crop], [False], torch.float32)[0], atol=1e-5)
    assert manifest[rows["wide.png"]["id"]]["crop_top_left"] == [0, 4]  # 210x120 -> 168x96 -> centre 160
    assert summary["items"] == summary["computed"] == 4 and summary["reused"] == 0
    assert summary["resolution"] == 128
    assert summary["buckets"] == {"128x128": 1, "160x96": 1, "64x32": 1, "96x160": 1}


def test_rerun_reuses_and_a_changed_image_is_the_only_work(dataset: Path, tmp_path: Path, state_dir: Path) -> None:
    work = tmp_path / "work"
    images = ingest(dataset, work, state_dir)
    latents(images, work, state_dir)
    before = tensors(work / "latents")
    manifest = (work / "latents" / "manifest.jsonl").read_text(encoding="utf-8")

    summary, out = latents(images, work, state_dir)
    assert (summary["computed"], summary["reused"]) == (0, 4)
    assert (out / "manifest.jsonl").read_text(encoding="utf-8") == manifest
    assert all(torch.equal(t, before[f]) for f, t in tensors(out).items())

    picture(dataset / "square.png", IMAGES["square.png"][0], seed=99)  # same size, other pixels
    images = ingest(dataset, work, state_dir)
    summary, out = latents(images, work, state_dir)
    assert (summary["computed"], summary["reused"]) == (1, 3)
    after = tensors(out)
    square_id = next(r["id"] for r in read_jsonl(images / "manifest.jsonl") if r["source"] == "square.png")
    assert f"{square_id}.safetensors" not in before
    assert {f for f in after if f in before} == set(after) - {f"{square_id}.safetensors"}


def test_flip_doubles_items_with_mirrored_latents(dataset: Path, tmp_path: Path, state_dir: Path) -> None:
    work = tmp_path / "work"
    images = ingest(dataset, work, state_dir)
    latents(images, work, state_dir)
    summary, out = latents(images, work, state_dir, flip=True)
    assert summary["items"] == 8 and (summary["computed"], summary["reused"]) == (
        4,
        4,
    )  # only the mirrored ones are new
    rows = read_jsonl(out / "manifest.jsonl")
    assert [r["flip"] for r in rows] == [False, True] * 4
    vae = load_vae(resolve_model(SDXL, state_dir), torch.device("cpu"))
    sources = {r["id"]: r for r in read_jsonl(images / "manifest.jsonl")}
    for plain, mirrored in zip(rows[::2], rows[1::2]):
        assert mirrored["file"] == f"{plain['id']}-flip.safetensors" and mirrored["id"] == plain["id"]
        assert mirrored["bucket"] == plain["bucket"] and mirrored["original_size"] == plain["original_size"]
        a, b = load_file(out / plain["file"])["latent"], load_file(out / mirrored["file"])["latent"]
        assert a.shape == b.shape and not torch.allclose(a, b, atol=1e-3)
        with Image.open(images / sources[plain["id"]]["file"]) as img:
            crop, _, _ = resize_cover_crop(img.convert("RGB"), *plain["bucket"])
        expected = encode_batch(vae, [crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)], [False], torch.float32)[0]
        assert torch.allclose(b, expected, atol=1e-5)  # the latent of the mirrored picture


def test_bucket_step_change_re_encodes_what_changed_bucket(dataset: Path, tmp_path: Path, state_dir: Path) -> None:
    work = tmp_path / "work"
    images = ingest(dataset, work, state_dir)
    _, out = latents(images, work, state_dir)
    old = {r["id"]: r["bucket"] for r in read_jsonl(out / "manifest.jsonl")}
    summary, out = latents(images, work, state_dir, bucket_step=64)
    new = {r["id"]: r["bucket"] for r in read_jsonl(out / "manifest.jsonl")}
    changed = sum(old[i] != new[i] for i in old)
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in new.values())
    assert changed >= 2 and (summary["computed"], summary["reused"]) == (changed, 4 - changed)
    for r in read_jsonl(out / "manifest.jsonl"):
        assert load_file(out / r["file"])["latent"].shape[1:] == (r["bucket"][1] // 8, r["bucket"][0] // 8)


def test_another_vae_re_encodes_everything(dataset: Path, tmp_path: Path, state_dir: Path) -> None:
    work = tmp_path / "work"
    images = ingest(dataset, work, state_dir)
    latents(images, work, state_dir)
    before = tensors(work / "latents")
    summary, out = latents(images, work, state_dir, model=SD15)  # same resolution, other VAE weights
    assert (summary["computed"], summary["reused"]) == (4, 0)
    after = tensors(out)
    assert after.keys() == before.keys()
    assert all(after[f].shape == before[f].shape and not torch.allclose(after[f], before[f]) for f in after)
    summary, _ = latents(images, work, state_dir)
    assert (summary["computed"], summary["reused"]) == (0, 4)  # the SDXL entries are still there


def test_vae_identity_is_its_weights_not_its_name(
    dataset: Path, tmp_path: Path, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stages.latents

    work = tmp_path / "work"
    images = ingest(dataset, work, state_dir)
    latents(images, work, state_dir)
    real = stages.latents.component_hash
    asked: list[str] = []

    def retrained(info: Any, component: str, state: Path) -> str:  # same name, new weights
        asked.append(component)
        return "0" * 32 if component == "vae" else real(info, component, state)

    monkeypatch.setattr(stages.latents, "component_hash", retrained)
    summary, _ = latents(images, work, state_dir)
    assert asked == ["vae"] and (summary["computed"], summary["reused"]) == (4, 0)
    monkeypatch.setattr(stages.latents, "component_hash", real)
    summary, _ = latents(images, work, state_dir)
    assert (summary["computed"], summary["reused"]) == (0, 4)


def test_upscale_settings_reach_the_latent_keys(tmp_path: Path, state_dir: Path) -> None:
    """An upscaled image with other pixels must not reuse the latent of the old upscale, even when
    it lands in the same bucket (upscale hands on a pixel hash of the new pixels)."""
    src = tmp_path / "src"
    picture(src / "small.png", (90, 60), seed=5)
    work = tmp_path / "work"
    images = ingest(src, work, state_dir)
    up = work / "upscaled"
    env = StageEnv(store=ItemStore(work / "store"), state_dir=state_dir, show_progress=False)
    buckets = []
    for min_side in (150, 160, 150):
        shutil.rmtree(up, ignore_errors=True)
        up.mkdir()
        upscale_stage.run(
            upscale_stage.Params(model=SDXL, min_side=min_side), Paths(images=images), Paths(images=up), env
        )
        summary, out = latents(up, work, state_dir)
        buckets.append(read_jsonl(out / "manifest.jsonl")[0]["bucket"])
        if min_side == 160:
            assert (summary["computed"], summary["reused"]) == (1, 0)
    assert buckets[0] == buckets[1]  # same bucket, so only the pixels can tell them apart
    assert (summary["computed"], summary["reused"]) == (0, 1)  # back to 150: the first latent again


def test_params_are_validated(repo_root: Path) -> None:
    with pytest.raises(pydantic.ValidationError, match=r"`latents.bucket_step` must be a multiple of 8.*got 12"):
        Params(model=SDXL, bucket_step=12)
    with pytest.raises(pydantic.ValidationError, match="bucket_step"):
        Params(model=SDXL, bucket_step=4)
    with pytest.raises(pydantic.ValidationError, match="vae_dtype"):
        Params(model=SDXL, vae_dtype="float8")
    with pytest.raises(pydantic.ValidationError, match="resolution"):
        Params(model=SDXL, resolution=32)
    assert Params(model=SDXL, bucket_step=8).bucket_step == 8

    stage = load_pipeline(repo_root).stages["latents"]
    params, problems = validate_stage(stage, {"latents": {"bucket_step": 20}})
    assert params is None and len(problems) == 1 and "`latents.bucket_step`" in problems[0] and "20" in problems[0]


def test_min_bucket_above_max_bucket_is_refused_by_name():
    with pytest.raises(
        pydantic.ValidationError, match=r"`latents.min_bucket` \(512\) must not exceed `latents.max_bucket` \(256\)"
    ):
        Params(model=SDXL, min_bucket=512, max_bucket=256)
