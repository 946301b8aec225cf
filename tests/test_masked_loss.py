"""Masked loss (issue 14, item 2): masks from an image's alpha channel or its `<stem>-mask.png`,
carried through ingest, upscale and latents (at latent resolution, in the latent's entry), and
weighting the diffusion loss: at `unmasked_weight` 0, pixels outside the mask get no gradient."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from loraforge.data.images import pixel_hash, read_jsonl, resize_cover_crop, to_rgb
from loraforge.models.loading import component_hash, resolve_model
from loraforge.pipeline.params import DatasetParams, ModelParams, TileParams
from loraforge.pipeline.runner import Paths, StageEnv
from loraforge.store.items import ItemStore
from loraforge.models.tiny import build_tiny_sd15
from loraforge.training import data, losses
from loraforge.training.validation import held_out_items
from stages import finetune
from stages import latents as latents_stage
from stages import upscale as upscale_stage
from tests.helpers import run_ingest as ingest


class Spy:
    """Wraps the tiny UNet: its prediction becomes a leaf whose gradient the test reads (the real
    forward ran; the loss's backward stops at the prediction), and may have `shift` added."""

    def __init__(self, unet: Any, shift: torch.Tensor | None = None) -> None:
        self.unet, self.shift, self.pred = unet, shift, None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.unet(*args, **kwargs)
        self.pred = out.sample.detach().requires_grad_(True)  # (B, 4, h, w)
        out.sample = self.pred
        if self.shift is not None:
            out.sample = out.sample + self.shift
        return out


@pytest.fixture(scope="module")
def tiny() -> dict[str, Any]:
    torch.manual_seed(0)
    parts = build_tiny_sd15()
    return {"unet": parts["unet"].eval(), "scheduler": parts["scheduler"]}


def half_mask() -> torch.Tensor:
    """(2, 1, 16, 16): sample 0 trains on its left half (and a soft column), sample 1 on a square."""
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, :, :7] = 1.0
    mask[0, :, :, 7] = 0.5
    mask[1, :, 4:12, 4:12] = 1.0
    return mask


def masked_loss(tiny: dict[str, Any], spy: Spy, mask: torch.Tensor | None, **settings: Any) -> torch.Tensor:
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))  # (B, 4, h, w)
    cond = {"hidden": torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(2))}  # (B, 77, D)
    gen = torch.Generator().manual_seed(3)
    s = losses.LossSettings(**settings)
    return losses.diffusion_loss(spy, tiny["scheduler"], latents, cond, gen, s, mask=mask)


def test_pixels_outside_the_mask_get_zero_gradient_at_weight_zero(tiny: dict[str, Any]) -> None:
    mask = half_mask()
    spy = Spy(tiny["unet"])
    loss = masked_loss(tiny, spy, mask, masked_loss=True, unmasked_weight=0.0)
    loss.backward()
    grad = spy.pred.grad  # (2, 4, 16, 16)
    outside = (mask == 0).expand_as(grad)
    assert torch.count_nonzero(grad[outside]) == 0, "no gradient outside the mask"
    assert (grad[~outside] != 0).float().mean() > 0.99, "inside the mask (soft column included) it trains"

    # the loss is blind to what happens outside the mask: a wrong prediction there (= another target) changes nothing
    shift = 5 * torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4)) * (mask == 0)
    with torch.no_grad():
        shifted = masked_loss(tiny, Spy(tiny["unet"], shift), mask, masked_loss=True, unmasked_weight=0.0)
        plain = masked_loss(tiny, Spy(tiny["unet"], shift), mask, masked_loss=False)
    assert shifted.item() == pytest.approx(loss.item(), rel=1e-6)
    assert plain.item() > 2 * loss.item(), "without masked_loss the shifted pixels count"


def test_unmasked_weight_above_zero_trains_everywhere_and_one_is_no_mask(tiny: dict[str, Any]) -> None:
    mask = half_mask()
    spy = Spy(tiny["unet"])
    masked_loss(tiny, spy, mask, masked_loss=True, unmasked_weight=0.25).backward()
    grad = spy.pred.grad
    inside, outside = (mask == 1).expand_as(grad), (mask == 0).expand_as(grad)
    assert (grad[outside] != 0).float().mean() > 0.99
    # weight 0.25 outside, 1 inside: on comparable errors the gradient is smaller outside
    assert grad[outside].abs().mean() < grad[inside].abs().mean()
    with torch.no_grad():
        full = masked_loss(tiny, Spy(tiny["unet"]), mask, masked_loss=True, unmasked_weight=1.0)
        none = masked_loss(tiny, Spy(tiny["unet"]), None, masked_loss=True)
        off = masked_loss(tiny, Spy(tiny["unet"]), mask, masked_loss=False)
    assert full.item() == pytest.approx(off.item(), rel=1e-6) and none.item() == pytest.approx(off.item(), rel=1e-6)


def test_weighted_mean_formula() -> None:
    pred, target = torch.zeros(1, 2, 2, 2), torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 2, 2).repeat(1, 2, 1, 1)
    mask = torch.tensor([1.0, 0.5, 0.0, 0.0]).reshape(1, 1, 2, 2)
    w = losses.mask_weights(mask, 0.1)  # 1, 0.55, 0.1, 0.1
    expected = (1 * 1 + 0.55 * 4 + 0.1 * 9 + 0.1 * 16) / (1 + 0.55 + 0.1 + 0.1)
    assert losses.per_sample_loss(pred, target, "l2", 0.1, w).item() == pytest.approx(expected)
    empty = losses.per_sample_loss(pred, target, "l2", 0.1, losses.mask_weights(torch.zeros(1, 1, 2, 2), 0.0))
    assert empty.item() == 0.0  # an all-zero mask trains nothing (no NaN)


# ---------------------------------------------------------------- ingest: where masks come from


def smooth(path: Path, size: tuple[int, int], seed: int, alpha: np.ndarray | None = None) -> None:
    """A smooth random picture (RGBA when `alpha` (H, W) uint8 is given)."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize(size, Image.Resampling.BILINEAR)
    if alpha is not None:
        img.putalpha(Image.fromarray(alpha))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def left_half(size: tuple[int, int], soft: bool = False) -> np.ndarray:
    """(H, W) uint8 mask: 255 on the left half (a ramp across it with `soft`), 0 elsewhere."""
    w, h = size
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[:, : w // 2] = np.linspace(255, 64, w // 2).astype(np.uint8) if soft else 255
    return mask


def write_mask(path: Path, mask: np.ndarray) -> None:
    Image.fromarray(mask).save(path)


def masked_source(src: Path) -> Path:
    """a.png + a-mask.png; b.png with an alpha channel; c.jpg plain (captioned); z-mask.png alone."""
    smooth(src / "a.png", (150, 150), 0)
    write_mask(src / "a-mask.png", left_half((150, 150)))
    alpha = np.full((120, 210), 255, dtype=np.uint8)
    alpha[60:, :] = 0  # the bottom half transparent
    smooth(src / "5_cats" / "b.png", (210, 120), 1, alpha)
    smooth(src / "c.png", (120, 200), 2)
    (src / "c.txt").write_text("a caption", encoding="utf-8")
    write_mask(src / "z-mask.png", left_half((64, 64)))
    return src


def pixels(path: Path, mode: str) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert(mode))


def test_ingest_reads_masks_from_mask_files_and_alpha(tmp_path: Path) -> None:
    src = masked_source(tmp_path / "src")
    summary, out = ingest(src, tmp_path / "work")
    rows = {r["source"]: r for r in read_jsonl(out / "manifest.jsonl")}
    assert sorted(rows) == ["5_cats/b.png", "a.png", "c.png"], "a mask file is never an image"
    assert rows["a.png"]["mask_source"] == "a-mask.png" and rows["5_cats/b.png"]["mask_source"] == "alpha"
    assert np.array_equal(pixels(out / rows["a.png"]["mask"], "L"), left_half((150, 150)))
    b_mask = pixels(out / rows["5_cats/b.png"]["mask"], "L")
    assert (b_mask[:60] == 255).all() and (b_mask[60:] == 0).all()
    # the RGB image is what it was before masks: alpha flattened onto the background, same bytes
    with Image.open(src / "5_cats" / "b.png") as img:
        flat = to_rgb(img.convert("RGBA"), (255, 255, 255))
    assert rows["5_cats/b.png"]["pixel_hash"] == pixel_hash(flat)
    assert "mask" not in rows["c.png"] and list(rows["c.png"])[-1] == "tile", "no mask: the row as before"
    assert not (out / "masks" / f"{rows['c.png']['id']}.png").exists()
    for row in rows.values():
        if "mask" in row:
            assert row["mask_hash"] == pixel_hash(Image.open(out / row["mask"]))
    assert summary["masks"] == 2 and summary["orphan_masks"] == ["z-mask.png"]
    listed = [*rows, *summary["ignored"], "a-mask.png", "c.txt"]  # a mask, like a caption, belongs to its image
    assert sorted(listed) == sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())

    # a store filled before masks: entries of files without transparency stay valid, the others decode again
    manifest = (out / "manifest.jsonl").read_bytes()
    for meta in (tmp_path / "work" / "store" / "ingested-image").rglob("*.json"):
        meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "mask_hash"}))
    old, out = ingest(src, tmp_path / "work")
    assert (old["computed"], old["reused"]) == (2, 1) and (out / "manifest.jsonl").read_bytes() == manifest

    # a changed mask decodes that image again, only it; a mask of the wrong size rejects its image
    write_mask(src / "a-mask.png", left_half((150, 150), soft=True))
    again, out = ingest(src, tmp_path / "work")
    assert (again["computed"], again["reused"]) == (1, 2)
    row = {r["source"]: r for r in read_jsonl(out / "manifest.jsonl")}["a.png"]
    assert row["pixel_hash"] == rows["a.png"]["pixel_hash"] and row["mask_hash"] != rows["a.png"]["mask_hash"]
    write_mask(src / "a-mask.png", left_half((100, 150)))
    _, out = ingest(src, tmp_path / "work", max_reject_ratio=0.5)
    (reject,) = read_jsonl(out / "rejects.jsonl")
    assert reject == {"source": "a.png", "reason": "mask a-mask.png is 100x150, its image is 150x150"}


# ---------------------------------------------------------------- latents: the mask on the latent grid


def encode(images: Path, work: Path, state_dir: Path) -> tuple[dict[str, Any], Path]:
    out = work / "latents"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = StageEnv(store=ItemStore(work / "store"), state_dir=state_dir, show_progress=False)
    params = latents_stage.Params(model=ModelParams(base="builtin:tiny-sd15", device="cpu"), bucket_step=32, flip=True)
    return latents_stage.run(params, Paths(images=images), Paths(latents=out), env), out


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Any:
    """The tiny models gain nothing from threads on a busy box; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory, state_dir: Path) -> dict[str, Any]:
    """`masked_source` ingested and encoded (tiny SD1.5, flip on): src, work, images, out, summary."""
    root = tmp_path_factory.mktemp("masked")
    src, work = masked_source(root / "src"), root / "work"
    _, images = ingest(src, work)
    summary, out = encode(images, work, state_dir)
    return {"src": src, "work": work, "images": images, "out": out, "summary": summary}


def test_latents_carry_the_mask_at_latent_resolution(encoded: dict[str, Any], tmp_path: Path, state_dir: Path) -> None:
    work, images, out, summary = encoded["work"], encoded["images"], encoded["out"], encoded["summary"]
    rows = {r["source"]: r for r in read_jsonl(images / "manifest.jsonl")}
    latents = {(r["id"], r["flip"]): r for r in read_jsonl(out / "manifest.jsonl")}
    entry = {key: load_file(out / r["file"]) for key, r in latents.items()}
    a, b, c = (rows[name]["id"] for name in ("a.png", "5_cats/b.png", "c.png"))

    mask = entry[a, False]["mask"]  # 150x150 -> bucket 128x128 -> (1, 16, 16); the left half trains
    assert mask.shape == (1, 16, 16) == (1, *entry[a, False]["latent"].shape[1:]) and mask.dtype == torch.float32
    assert (mask[..., :7] > 0.99).all() and (mask[..., 9:] < 0.01).all() and 0 <= mask.min() <= mask.max() <= 1
    with Image.open(images / rows["a.png"]["mask"]) as img:  # the image's own crop, area-averaged 8x8
        crop = np.asarray(resize_cover_crop(img, 128, 128, Image.Resampling.BOX)[0], dtype=np.float32) / 255
    assert torch.allclose(mask[0], torch.from_numpy(crop.reshape(16, 8, 16, 8).mean(axis=(1, 3))), atol=1e-6)
    assert torch.equal(entry[a, True]["mask"], torch.flip(mask, dims=[-1])), "the flipped copy's mask is flipped"
    alpha = entry[b, False]["mask"]  # 210x120 -> 160x96: (1, 12, 20); the opaque top half trains
    assert alpha.shape == (1, 12, 20) and (alpha[:, :6] > 0.99).all() and (alpha[:, 6:] < 0.01).all()
    assert "mask" not in entry[c, False] and "masked" not in latents[c, False] and latents[a, False]["masked"]

    # an image without a mask keeps its key (caches made before masks stay valid)
    row, vae = (
        rows["c.png"],
        component_hash(resolve_model(ModelParams(base="builtin:tiny-sd15"), state_dir), "vae", state_dir),
    )
    key = ItemStore(work / "store").item(
        "latent", image=row["pixel_hash"], bucket=(96, 160), flip=False, vae=vae, dtype="float32"
    )
    assert key.get(".safetensors") is not None and torch.equal(
        load_file(key.get(".safetensors"))["latent"], entry[c, False]["latent"]
    )

    # the trainer's batch: masks (B, 1, h, w), all ones for an image without one
    examples = [{**latents[a, False], "path": out / latents[a, False]["file"]}]
    lat, masks = data.load_batch(examples, 0.18215, masked=True)
    assert lat.shape == (1, 4, 16, 16) and torch.equal(masks[0], mask)
    assert torch.equal(
        data.load_batch([{"path": out / latents[c, False]["file"]}], 1.0, True)[1], torch.ones(1, 1, 20, 12)
    )
    assert data.load_batch(examples, 1.0, masked=False)[1] is None
    # a held-out image keeps its mask for the validation loss (all ones without one)
    lone = {"path": out / latents[c, False]["file"]}
    held = {item["path"]: item["mask"] for item in held_out_items(examples + [lone], 1.0)}
    assert torch.equal(held[examples[0]["path"]], mask) and torch.equal(held[lone["path"]], torch.ones(1, 20, 12))

    # a changed mask re-encodes that image (and its flipped copy) only (in a copy: the fixture is shared)
    src, work = tmp_path / "src", tmp_path / "work"
    shutil.copytree(encoded["src"], src)
    shutil.copytree(encoded["work"], work)
    write_mask(src / "a-mask.png", 255 - left_half((150, 150)))
    _, images = ingest(src, work)
    again, out = encode(images, work, state_dir)
    assert (summary["computed"], again["computed"], again["reused"]) == (6, 2, 4)
    flipped = load_file(out / f"{a}.safetensors")["mask"]
    assert (flipped[..., :7] < 0.01).all() and (flipped[..., 9:] > 0.99).all()


# ---------------------------------------------------------------- upscale: the mask follows its image


def test_upscale_resizes_the_mask_with_its_image(tmp_path: Path, state_dir: Path) -> None:
    src, work = masked_source(tmp_path / "src"), tmp_path / "work"
    _, images = ingest(src, work)
    out = work / "upscaled"
    out.mkdir()
    env = StageEnv(store=ItemStore(work / "store"), state_dir=state_dir, show_progress=False)
    params = upscale_stage.Params(model=ModelParams(base="builtin:tiny-sd15", device="cpu"), min_side=140)
    upscale_stage.run(params, Paths(images=images), Paths(images=out), env)
    before = {r["source"]: r for r in read_jsonl(images / "manifest.jsonl")}
    rows = {r["source"]: r for r in read_jsonl(out / "manifest.jsonl")}
    assert rows["a.png"]["upscaled_from"] is None and rows["a.png"]["mask_hash"] == before["a.png"]["mask_hash"]
    b = rows["5_cats/b.png"]  # 210x120 -> 245x140, and its mask with it
    assert (b["width"], b["height"]) == (245, 140) and b["mask_hash"] != before["5_cats/b.png"]["mask_hash"]
    for row in (rows["a.png"], b):
        with Image.open(out / row["mask"]) as mask:
            assert mask.size == (row["width"], row["height"]) and row["mask_hash"] == pixel_hash(mask)
    mask = pixels(out / b["mask"], "L")
    assert (mask[:65] == 255).all() and (mask[75:] == 0).all()  # the opaque top half, scaled
    assert "mask" not in rows["c.png"]


# ---------------------------------------------------------------- finetune: the loop hands the masks to the loss


def test_finetune_trains_with_the_masks(
    encoded: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out, rows = encoded["out"], read_jsonl(encoded["images"] / "manifest.jsonl")
    captions = tmp_path / "captions"
    captions.mkdir()
    (captions / "manifest.jsonl").write_text("".join(json.dumps({"id": r["id"], "caption": "x"}) + "\n" for r in rows))
    seen: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    real = finetune.diffusion_loss

    def spy(unet: Any, scheduler: Any, latents: torch.Tensor, *args: Any) -> torch.Tensor:
        seen.append((latents, args[3] if len(args) > 3 else None))
        return real(unet, scheduler, latents, *args)

    monkeypatch.setattr(finetune, "diffusion_loss", spy)
    model = ModelParams(base="builtin:tiny-sd15", device="cpu")
    params = finetune.Params(model=model, epochs=1, batch_size=2, lr=1e-4, masked_loss=True, save_dtype="float32")
    outputs = Paths(checkpoints=tmp_path / "ckpt", loss=tmp_path / "loss")
    outputs.checkpoints.mkdir()
    env = StageEnv(store=ItemStore(encoded["work"] / "store"), state_dir=tmp_path / "state", show_progress=False)
    summary = finetune.run(params, Paths(latents=out, captions=captions), outputs, env)
    assert summary["plan"]["masked_images"] == 2 and "masked loss: 2 of 3 images have a mask" in capsys.readouterr().out
    assert len(seen) == 1 + 5 + 1  # batches of 2 in one bucket: a and its flipped copy; b (5_cats: 5 repeats); c
    stored = {r["file"]: load_file(out / r["file"]).get("mask") for r in read_jsonl(out / "manifest.jsonl")}
    expected = {tuple(m.shape[1:]): m for m in stored.values() if m is not None}
    for latents, masks in seen:
        assert masks is not None and masks.shape == (2, 1, *latents.shape[2:])
        shape = tuple(latents.shape[2:])
        if shape in expected:  # a masked image's batch: its mask and the flipped one (either order)
            assert {masks[0].sum().item(), masks[1].sum().item()} == {expected[shape].sum().item()}
            assert not torch.equal(masks, torch.ones_like(masks))
        else:
            assert torch.equal(masks, torch.ones_like(masks))  # c has no mask: all ones

    # masked_loss on a dataset without masks: trains unmasked, with a warning line
    plain = tmp_path / "plain"
    plain.mkdir()
    c = next(r for r in read_jsonl(out / "manifest.jsonl") if "masked" not in r)
    shutil.copy(out / c["file"], plain / c["file"])
    (plain / "manifest.jsonl").write_text(json.dumps(c) + "\n")
    _, _, plan = finetune.plan_steps(params, Paths(latents=plain, captions=captions), env)
    assert (
        plan["masked_images"] == 0 and "WARNING: `finetune.masked_loss` is on but no image" in capsys.readouterr().out
    )


def test_tiling_cuts_the_mask_with_each_sector(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(30, 226, (64, 64, 3), dtype=np.uint8)).save(src / "big.png")
    mask = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    write_mask(src / "big-mask.png", mask)
    ds = DatasetParams(tile=(TileParams(source="big.png", rows=2, cols=2),), tile_min_sharpness=0, tile_max_clipped=1)
    _, out = ingest(src, tmp_path / "work", dataset=ds)
    rows = read_jsonl(out / "manifest.jsonl")
    assert [r["tile"] for r in rows] == ["r1c1", "r1c2", "r2c1", "r2c2"]
    for r, (top, left) in zip(rows, [(0, 0), (0, 32), (32, 0), (32, 32)]):
        assert np.array_equal(pixels(out / r["mask"], "L"), mask[top : top + 32, left : left + 32])
        assert r["mask_hash"] == pixel_hash(Image.open(out / r["mask"])) and r["mask_source"] == "big-mask.png"
