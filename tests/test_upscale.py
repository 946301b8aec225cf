"""Stage `upscale`: small images up to `min_side` (aspect kept), big ones untouched, per-image caching,
upscaler-file safety, tiling, and ESRGAN-family networks loaded through spandrel's own loader."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import pytest
from PIL import Image

from loraforge.data.images import pixel_hash, read_jsonl
from loraforge.pipeline.params import ModelParams
from loraforge.pipeline.runner import Paths, StageEnv
from loraforge.store.items import ItemStore
from stages import ingest as ingest_stage
from stages.upscale import Params, model_upscale, needs_upscale, run

MODEL = ModelParams(base="builtin:tiny-sdxl", device="cpu")
# name -> (width, height): two below 128 px on the short side, one exactly 128, one above.
SIZES = {"wide.png": (64, 48), "tall.png": (40, 100), "edge.png": (128, 200), "big.png": (160, 140)}


def picture(path: Path, size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


@pytest.fixture
def ingested(tmp_path: Path, state_dir: Path) -> Path:
    """The ingest stage's output for four generated images (see SIZES)."""
    src = tmp_path / "src"
    for seed, (name, size) in enumerate(SIZES.items()):
        picture(src / name, size, seed)
    out = tmp_path / "ingested"
    out.mkdir()
    env = StageEnv(store=ItemStore(tmp_path / "store"), state_dir=state_dir, show_progress=False)
    ingest_stage.run(ingest_stage.Params(source=str(src)), Paths(source=src), Paths(images=out), env)
    return out


def upscale(ingested: Path, work: Path, state_dir: Path, **params: Any) -> tuple[dict[str, Any], Path]:
    """Run the stage as the runner would: a fresh output folder, a store that persists in `work`."""
    out = work / "upscaled"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = StageEnv(store=ItemStore(work / "store"), state_dir=state_dir, show_progress=False)
    inputs = Paths(images=ingested)
    if params.get("model_path") and Path(params["model_path"]).exists():  # as the runner hands `files`
        inputs["upscaler"] = Path(params["model_path"])
    summary = run(Params(model=MODEL, **params), inputs, Paths(images=out), env)
    return summary, out


def by_source(folder: Path) -> dict[str, dict[str, Any]]:
    return {r["source"]: r for r in read_jsonl(folder / "manifest.jsonl")}


class NearestNet:
    """Stands in for a spandrel descriptor: a fixed-scale nearest-neighbour upscaler (local, so
    tiling must not change its output), with the `scale` and `device` attributes spandrel has."""

    def __init__(self, scale: int) -> None:
        import torch

        self.scale = scale
        self.device = torch.device("cpu")
        self.calls = 0

    def __call__(self, x: Any) -> Any:  # (1, 3, h, w) -> (1, 3, h·scale, w·scale)
        self.calls += 1
        return x.repeat_interleave(self.scale, dim=2).repeat_interleave(self.scale, dim=3)


def test_needs_upscale() -> None:
    assert needs_upscale(100, 200, 128)
    assert needs_upscale(300, 127, 128)
    assert not needs_upscale(128, 128, 128)
    assert not needs_upscale(128, 900, 128)
    assert not needs_upscale(2000, 1500, 1024)


def test_small_images_reach_min_side_and_big_ones_pass_through(ingested: Path, tmp_path: Path, state_dir: Path) -> None:
    summary, out = upscale(ingested, tmp_path / "work", state_dir, min_side=100)
    rows, before = by_source(out), by_source(ingested)
    assert list(rows) == list(before)  # same images, same order
    assert (rows["wide.png"]["width"], rows["wide.png"]["height"]) == (133, 100)  # 64x48 · 100/48
    assert (rows["tall.png"]["width"], rows["tall.png"]["height"]) == (100, 250)  # 40x100 · 100/40
    for name in ("wide.png", "tall.png"):
        row = rows[name]
        w0, h0 = SIZES[name]
        assert row["upscaled_from"] == [w0, h0]
        assert min(row["width"], row["height"]) == 100
        assert abs(row["width"] / row["height"] - w0 / h0) < 1 / 100  # aspect kept to the pixel
        with Image.open(out / row["file"]) as img:
            assert img.size == (row["width"], row["height"]) and img.mode == "RGB"
            # Downstream caches key on pixel_hash, so it must describe the upscaled pixels.
            assert row["pixel_hash"] == pixel_hash(img.convert("RGB"))
        assert row["pixel_hash"] != before[name]["pixel_hash"]
        assert {k: row[k] for k in ("id", "file", "caption", "repeats")} == {
            k: before[name][k] for k in ("id", "file", "caption", "repeats")
        }
    # Images at or above min_side are never touched, never downscaled: the very same file.
    for name in ("edge.png", "big.png"):
        row = rows[name]
        assert row == {**before[name], "upscaled_from": None}
        assert (row["width"], row["height"]) == SIZES[name]
        src, dst = ingested / row["file"], out / row["file"]
        assert src.stat().st_ino == dst.stat().st_ino or src.read_bytes() == dst.read_bytes()
    assert summary == {
        "items": 4,
        "computed": 2,
        "reused": 0,
        "passed_through": 2,
        "min_side": 100,
        "method": "lanczos",
    }


def test_default_min_side_is_the_models_native_resolution(ingested: Path, tmp_path: Path, state_dir: Path) -> None:
    summary, out = upscale(ingested, tmp_path / "work", state_dir)
    assert summary["min_side"] == 128  # builtins are 128 px models
    rows = by_source(out)
    assert (rows["wide.png"]["width"], rows["wide.png"]["height"]) == (171, 128)
    assert (rows["tall.png"]["width"], rows["tall.png"]["height"]) == (128, 320)
    assert rows["edge.png"]["upscaled_from"] is None  # exactly 128 is big enough
    assert (summary["computed"], summary["passed_through"]) == (2, 2)


def test_rerun_reuses_and_min_side_change_recomputes(ingested: Path, tmp_path: Path, state_dir: Path) -> None:
    work = tmp_path / "work"
    first, out = upscale(ingested, work, state_dir, min_side=100)
    manifest = (out / "manifest.jsonl").read_text(encoding="utf-8")
    pixels = {r["source"]: np.asarray(Image.open(out / r["file"])) for r in read_jsonl(out / "manifest.jsonl")}

    second, out = upscale(ingested, work, state_dir, min_side=100)
    assert (second["computed"], second["reused"]) == (0, first["computed"]) == (0, 2)
    assert (out / "manifest.jsonl").read_text(encoding="utf-8") == manifest
    for r in read_jsonl(out / "manifest.jsonl"):
        assert np.array_equal(np.asarray(Image.open(out / r["file"])), pixels[r["source"]])

    third, out = upscale(ingested, work, state_dir, min_side=110)
    assert (third["computed"], third["reused"], third["passed_through"]) == (2, 0, 2)
    assert min(by_source(out)["wide.png"]["width"], by_source(out)["wide.png"]["height"]) == 110

    # Raising min_side to 140 pulls the 128 px image in too; the 140 px one still passes through.
    fourth, out = upscale(ingested, work, state_dir, min_side=140)
    assert (fourth["computed"], fourth["passed_through"]) == (3, 1)
    assert by_source(out)["edge.png"]["width"] == 140 and by_source(out)["big.png"]["upscaled_from"] is None


def test_model_method_needs_a_model_path(ingested: Path, tmp_path: Path, state_dir: Path) -> None:
    with pytest.raises(ValueError, match="`upscale.model_path`"):
        upscale(ingested, tmp_path / "work", state_dir, method="model")


def test_pickle_upscaler_needs_allow_pickle(ingested: Path, tmp_path: Path, state_dir: Path) -> None:
    weights = tmp_path / "4x_esrgan.pth"
    weights.write_bytes(b"not really a pickle")
    with pytest.raises(ValueError, match="upscale.allow_pickle") as e:
        upscale(ingested, tmp_path / "work", state_dir, method="model", model_path=str(weights))
    assert str(weights) in str(e.value)
    assert not (tmp_path / "work" / "store").exists()  # refused before any work


def test_missing_upscaler_file_is_named(ingested: Path, tmp_path: Path, state_dir: Path) -> None:
    missing = tmp_path / "nowhere" / "4x.safetensors"
    with pytest.raises(FileNotFoundError, match="`upscale.model_path`") as e:
        upscale(ingested, tmp_path / "work", state_dir, method="model", model_path=str(missing))
    assert str(missing) in str(e.value)


def test_params_are_validated() -> None:
    with pytest.raises(pydantic.ValidationError, match="method"):
        Params(model=MODEL, method="bicubic")
    with pytest.raises(pydantic.ValidationError, match="min_side"):
        Params(model=MODEL, min_side=4)
    with pytest.raises(pydantic.ValidationError, match="tile"):
        Params(model=MODEL, tile=8)
    with pytest.raises(pydantic.ValidationError, match="not_a_key|unexpected"):
        Params(model=MODEL, not_a_key=1)


@pytest.mark.parametrize("scale", [2, 4])
def test_model_upscale_lands_on_min_side_and_tiles_seamlessly(scale: int) -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))  # 70x50
    # 2x undershoots 128 (100 px), 4x overshoots it (200 px): both must end at exactly 128.
    whole = model_upscale(image, NearestNet(scale), min_side=128, tile=1024)
    net = NearestNet(scale)
    tiled = model_upscale(image, net, min_side=128, tile=32)
    assert whole.size == tiled.size == (179, 128)  # 70 · 128/50 = 179.2
    assert net.calls == 3 * 2  # ceil(70/32) × ceil(50/32) tiles
    assert np.array_equal(np.asarray(whole), np.asarray(tiled))


def test_model_method_with_a_stand_in_network(
    ingested: Path, tmp_path: Path, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stages.upscale as upscale_module

    loads: list[Path] = []

    def fake_loader(path: Path, device: str, allow_pickle: bool) -> NearestNet:
        loads.append(path)
        return NearestNet(4)

    monkeypatch.setattr(upscale_module, "load_upscaler", fake_loader)
    weights = tmp_path / "4x.safetensors"
    weights.write_bytes(b"weights v1")
    work = tmp_path / "work"
    lanczos, _ = upscale(ingested, work, state_dir, min_side=100)
    summary, out = upscale(ingested, work, state_dir, min_side=100, method="model", model_path=str(weights))
    assert summary["computed"] == 2 and summary["method"] == "model"  # not the Lanczos entries
    assert len(loads) == 1  # loaded once, for all images
    rows = by_source(out)
    assert (rows["wide.png"]["width"], rows["wide.png"]["height"]) == (133, 100)
    assert rows["big.png"]["upscaled_from"] is None

    again, _ = upscale(ingested, work, state_dir, min_side=100, method="model", model_path=str(weights))
    assert (again["computed"], again["reused"]) == (0, 2) and len(loads) == 1  # no load when all cached

    weights.write_bytes(b"weights v2")  # same name, other weights: the key is the file's hash
    changed, _ = upscale(ingested, work, state_dir, min_side=100, method="model", model_path=str(weights))
    assert changed["computed"] == 2


# ---------------------------------------------------------------- real ESRGAN-family files


def esrgan_file(path: Path, layout: str, seed: int = 0) -> Path:
    """A small 4x RRDB network (8 filters, 1 block) as a safetensors file, in the original ESRGAN
    key layout (`model.0.weight`, ...) or xinntao's RealESRGAN layout (`conv_first.weight`, `body.0.rdb1...`)."""
    import torch
    from safetensors.torch import save_file
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    if layout == "esrgan":  # spandrel's own class, so the keys are exactly the old-arch names
        state = ESRGAN(num_filters=8, num_blocks=1, scale=4).state_dict()
    else:
        nf, gc, state = 8, 32, {}

        def conv(name: str, out: int, cin: int) -> None:  # weights big enough that context matters
            state[f"{name}.weight"] = torch.randn(out, cin, 3, 3) * 0.1
            state[f"{name}.bias"] = torch.randn(out) * 0.01

        conv("conv_first", nf, 3)
        for r in (1, 2, 3):
            for c in range(1, 6):
                conv(f"body.0.rdb{r}.conv{c}", gc if c < 5 else nf, nf + (c - 1) * gc)
        for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
            conv(name, nf, nf)
        conv("conv_last", 3, nf)
        state["conv_last.bias"] = torch.full((3,), 0.5)  # mid-grey output, so nothing clamps to black
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.mark.parametrize("layout", ["esrgan", "realesrgan"])
def test_an_esrgan_file_upscales_through_spandrels_loader(
    layout: str, ingested: Path, tmp_path: Path, state_dir: Path
) -> None:
    from stages.upscale import load_upscaler

    weights = esrgan_file(tmp_path / f"4x_{layout}.safetensors", layout)
    net = load_upscaler(weights, "cpu", allow_pickle=False)
    assert net.architecture.name == "ESRGAN" and net.scale == 4  # detected by spandrel from the keys
    work = tmp_path / "work"
    summary, out = upscale(ingested, work, state_dir, min_side=100, method="model", model_path=str(weights))
    assert (summary["computed"], summary["passed_through"]) == (2, 2)
    rows = by_source(out)
    assert (rows["wide.png"]["width"], rows["wide.png"]["height"]) == (133, 100)  # 4x, then down to exactly 100
    with Image.open(ingested / rows["wide.png"]["file"]) as small, Image.open(out / rows["wide.png"]["file"]) as big:
        lanczos = np.asarray(small.convert("RGB").resize(big.size, Image.Resampling.LANCZOS), dtype=np.int16)
        assert np.abs(np.asarray(big, dtype=np.int16) - lanczos).mean() > 5  # the network's pixels, not Lanczos
    again, _ = upscale(ingested, work, state_dir, min_side=100, method="model", model_path=str(weights))
    assert (again["computed"], again["reused"]) == (0, 2)
    esrgan_file(weights, layout, seed=1)  # the same path, new weights: the cache key is the file's content
    third, _ = upscale(ingested, work, state_dir, min_side=100, method="model", model_path=str(weights))
    assert (third["computed"], third["reused"]) == (2, 0)


def test_overlapping_tiles_remove_the_seams_of_a_real_network(tmp_path: Path) -> None:
    from stages.upscale import load_upscaler

    net = load_upscaler(esrgan_file(tmp_path / "4x.safetensors", "realesrgan"), "cpu", allow_pickle=False)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    whole = np.asarray(model_upscale(image, net, min_side=192, tile=256), dtype=np.int16)  # one pass
    seams = np.asarray(model_upscale(image, net, min_side=192, tile=32, overlap=0), dtype=np.int16)
    joined = np.asarray(model_upscale(image, net, min_side=192, tile=32, overlap=32), dtype=np.int16)
    assert whole.shape == seams.shape == joined.shape == (192, 256, 3)
    assert np.abs(seams - whole).max() > 20  # tile borders without context differ visibly
    assert np.abs(joined - whole).max() <= 1  # with context, the same as one pass (±1 from float rounding)


def test_a_pickle_upscaler_loads_only_with_allow_pickle(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from stages.upscale import load_upscaler

    pth = tmp_path / "4x.pth"
    torch.save(load_file(str(esrgan_file(tmp_path / "4x.safetensors", "esrgan"))), pth)  # a real pickle
    with pytest.raises(ValueError, match="upscale.allow_pickle"):
        load_upscaler(pth, "cpu", allow_pickle=False)
    assert load_upscaler(pth, "cpu", allow_pickle=True).scale == 4  # read with weights_only=True


def test_a_file_that_is_not_an_upscaler_is_refused_by_name(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from stages.upscale import load_upscaler

    other = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, str(other))
    with pytest.raises(
        ValueError, match=r"`upscale.model_path` .*lora.safetensors: not an architecture spandrel knows"
    ):
        load_upscaler(other, "cpu", allow_pickle=False)
