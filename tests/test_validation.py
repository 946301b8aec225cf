"""finetune's validation loss (issue 14, item 1): the held-out split, fixed draws that repeat
exactly, the rows that survive a resume, and the recommendation that prefers the lowest
validation loss. Runs `finetune.run` on hand-made latents (no ingest/VAE: a flat colour, a
checkerboard, Gaussian patterns), so an over-trained run fits in a test."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from loraforge.evaluation.epoch_metrics import validation_losses
from loraforge.errors import InputError
from loraforge.evaluation.metrics import Limits, recommend
from loraforge.pipeline.runner import Paths, StageEnv
from loraforge.store.items import ItemStore
from loraforge.training import validation
from stages import finetune
from stages.finetune import setup, step_settings, validation_set

H = 8  # latent side: 64 px images
TRAIN_ID = "ffff000000000000"  # the largest id: never held out
BASE = {"model": {"base": "builtin:tiny-sd15", "device": "cpu"}, "save_dtype": "float32", "lr": 1e-3}


def flat() -> torch.Tensor:
    return torch.tensor([4.0, -3.0, 2.0, -1.0]).view(4, 1, 1).expand(4, H, H).clone()  # (4, H, H), one colour


def checker() -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(H), torch.arange(H), indexing="ij")
    c = ((x + y) % 2) * 2 - 1.0
    return torch.stack([c * 5, -c * 4, c * 3, -c * 5])  # (4, H, H)


def latents_project(root: Path, latents: dict[str, torch.Tensor]) -> Paths:
    """A latents folder (manifest, safetensors, buckets.json) and a captions folder, by id."""
    lat, cap = root / "latents", root / "captions"
    lat.mkdir(parents=True)
    cap.mkdir()
    rows = [
        {"id": i, "file": f"{i}.safetensors", "bucket": [H * 8, H * 8], "flip": False, "repeats": 1}
        | {"original_size": [H * 8, H * 8], "crop_top_left": [0, 0]}
        for i in latents
    ]
    for i, x in latents.items():
        save_file({"latent": x.contiguous()}, str(lat / f"{i}.safetensors"))
    (lat / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (lat / "buckets.json").write_text(json.dumps({"resolution": H * 8, "step": 64, "min_side": 64, "max_side": 64}))
    captions = [{"id": i, "caption": "sks, a pattern", "trigger": "sks"} for i in latents]
    (cap / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in captions))
    return Paths(latents=lat, captions=cap)


def env_of(state: Path) -> StageEnv:
    return StageEnv(store=ItemStore(state / "store"), state_dir=state, show_progress=False)


def run(inputs: Paths, out: Path, state: Path, **overrides: Any) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    outputs = Paths(checkpoints=out / "checkpoints", loss=out / "loss")
    outputs.checkpoints.mkdir(parents=True)
    return finetune.run(finetune.Params(**{**BASE, **overrides}), inputs, outputs, env_of(state))


def tsv(path: Path) -> list[dict[str, float]]:
    head, *rows = path.read_text().splitlines()
    return [dict(zip(head.split("\t"), map(float, r.split("\t")))) for r in rows]


@pytest.fixture(scope="module")
def four(tmp_path_factory) -> Paths:
    """One flat training image and three patterns that sort first (held out by a split of 3)."""
    gen = torch.Generator().manual_seed(0)
    images = {TRAIN_ID: flat(), "0000000000000001": checker(), "0000000000000002": -checker()}
    images["0000000000000003"] = torch.randn(4, H, H, generator=gen) * 5
    return latents_project(tmp_path_factory.mktemp("val"), images)


def examples(ids: list[str], repeats: int = 2) -> list[dict[str, Any]]:
    return [{"id": i, "path": Path(f"{i}{f}.safetensors"), "bucket": [64, 64]} for i in ids for f in ("", "-flip")] * (
        repeats
    )


def test_a_split_holds_out_the_smallest_hashes_with_every_repeat_and_stays_when_images_are_added():
    ids = ["c3", "a1", "e5", "b2", "d4"]
    train, held = validation.split_examples(examples(ids), 2)  # a count
    assert {e["id"] for e in held} == {"a1", "b2"} and len(held) == 8  # both flips, both repeats
    assert {e["id"] for e in train} == {"c3", "d4", "e5"} and len(train) == 12
    _, more = validation.split_examples(examples([*ids, "f6", "g7"]), 2)
    assert {e["id"] for e in more} == {"a1", "b2"}  # larger hashes added: the same images held out
    assert {e["id"] for e in validation.split_examples(examples(ids), 0.2)[1]} == {"a1"}  # a share, rounded
    assert {e["id"] for e in validation.split_examples(examples(ids), 0.01)[1]} == {"a1"}  # at least one
    assert validation.split_examples(examples(ids), 0) == (examples(ids), [])


def test_bad_validation_settings_stop_naming_the_key(four, tmp_path):
    with pytest.raises(InputError, match=r"`finetune.validation_split` 4 holds out 4 of 4 images"):
        validation.split_examples(examples(["a", "b", "c", "d"]), 4)
    with pytest.raises(ValueError, match="validation_split.*share in \\(0, 1\\)"):
        finetune.Params(**BASE, validation_split=1.0)
    with pytest.raises(ValueError, match="`finetune.validation_split`.*or `finetune.validation_folder`, not both"):
        finetune.Params(**BASE, validation_split=1, validation_folder="val")
    with pytest.raises(InputError, match="`finetune.validation_folder` folder .*missing does not exist"):
        run(four, tmp_path / "o", tmp_path / "state", validation_folder="missing")


def test_validation_rows_repeat_exactly_from_the_checkpoint_and_survive_a_resume(four, tmp_path):
    state = tmp_path / "state"
    opts = {"epochs": 2, "validation_split": 3, "ema_decay": 0.5, "resume": "auto", "seed": 3}
    report = run(four, tmp_path / "a", state, **opts)
    assert report["plan"]["images"] == 1 and report["plan"]["examples_per_epoch"] == 1  # held out: never trained
    rows = tsv(tmp_path / "a" / "loss" / "validation.tsv")
    assert [r["epoch"] for r in rows] == [1, 2] and all("validation_loss_ema" in r for r in rows)
    assert rows[0]["train_loss"] == pytest.approx(tsv(tmp_path / "a" / "loss" / "epochs.tsv")[0]["loss"], rel=1e-5)
    # recomputed from the saved epoch-2 weights, with another finetune.seed: the same value
    again = recomputed(four, tmp_path / "a", state, {**opts, "seed": 11})
    assert again == pytest.approx(report["validation"][1]["validation_loss"], rel=1e-6)
    assert report["validation"][0]["validation_loss"] != report["validation"][1]["validation_loss"]
    # evaluate ranks the epochs by the weights the LoRAs come from: extract's report says which
    loss, extract = tmp_path / "a" / "loss", tmp_path / "extract.json"
    extract.write_text(json.dumps({"from_ema": True}))
    assert validation_losses(loss, extract) == {r["epoch"]: r["validation_loss_ema"] for r in rows}
    extract.write_text(json.dumps({"from_ema": False}))
    raw = {r["epoch"]: r["validation_loss"] for r in rows}
    assert validation_losses(loss, extract) == validation_losses(loss, None) == raw
    assert raw != {r["epoch"]: r["validation_loss_ema"] for r in rows}  # the columns differ: the choice shows
    assert validation_losses(tmp_path / "no-such-folder", extract) == {}
    # the finished run resumes from its last state: the rows of the earlier epochs come back with it
    run(four, tmp_path / "b", state, **opts)
    assert tsv(tmp_path / "b" / "loss" / "validation.tsv") == rows


def recomputed(inputs: Paths, out: Path, state: Path, opts: dict[str, Any], epoch: int = 2) -> float:
    """The validation loss of a saved epoch (mode full), computed twice here in one process: the same value."""
    params = finetune.Params(**{**BASE, **opts})
    t = setup(params, torch.device("cpu"), 2, env_of(state), None)
    t.unet.load_state_dict(load_file(str(out / "checkpoints" / f"epoch-{epoch:04d}" / "unet.safetensors")))
    held = validation.split_examples(_examples(inputs), params.validation_split)[1]
    items = validation_set(params, held, t, inputs, env_of(state), torch.device("cpu"))
    s = step_settings(params, []).loss
    value = validation.validation_loss(t, items, s, params.validation_timesteps)
    assert value == validation.validation_loss(t, items, s, params.validation_timesteps)
    return value


def test_with_two_processes_the_validation_loss_is_that_of_the_saved_weights(four, tmp_path):
    opts = {"epochs": 2, "validation_split": 3, "num_processes": 2}
    report = run(four, tmp_path / "o", tmp_path / "state", **opts)
    assert report["processes"] == 2 and [r["epoch"] for r in report["validation"]] == [1, 2]
    again = recomputed(four, tmp_path / "o", tmp_path / "state", {**opts, "num_processes": 1})
    assert again == pytest.approx(report["validation"][1]["validation_loss"], rel=1e-5)


def test_dropout_is_off_and_modes_come_back_in_the_validation_loss_of_a_lora(four, tmp_path):
    params = finetune.Params(**{**BASE, "mode": "lora", "network_dropout": 0.5, "rank_dropout": 0.5, "ema_decay": 0.5})
    params = finetune.Params(**{**dataclasses.asdict(params), "validation_split": 3})
    t = setup(params, torch.device("cpu"), 1, env_of(tmp_path), None)
    with torch.no_grad():
        for p in t.trained["unet"].parameters():
            p.normal_(0, 0.3)  # a LoRA that changes the output, so dropout would show
    items = validation_set(params, validation.split_examples(_examples(four), 3)[1], t, four, env_of(tmp_path), "cpu")
    s = step_settings(params, []).loss
    modes = [m.training for m in (t.unet, t.trained["unet"], *t.trained["unet"].modules())]
    assert t.trained["unet"].training
    first = validation.validation_row(t, items, s, 4, 1)
    assert validation.validation_row(t, items, s, 4, 1) == first  # no random dropout
    assert first["validation_loss_ema"] != first["validation_loss"]  # the EMA (still at the start) differs
    assert [m.training for m in (t.unet, t.trained["unet"], *t.trained["unet"].modules())] == modes  # modes back
    assert validation.validation_row(t, items, s, 4, 1) == first  # and the raw weights with it


def _examples(inputs: Paths) -> list[dict[str, Any]]:
    from loraforge.training import data

    return data.load_examples(inputs.latents, inputs.captions, 1)


def test_a_validation_folder_is_encoded_through_the_store_with_sidecar_captions(four, tmp_path, capsys):
    folder = tmp_path / "project" / "val"
    folder.mkdir(parents=True)
    for name, colour in (("red", (200, 30, 30)), ("sky", (90, 160, 230))):
        Image.new("RGB", (64, 64), colour).save(folder / f"{name}.png")
    (folder / "sky.txt").write_text("sks, blue sky")
    state = tmp_path / "project" / ".loraforge"
    report = run(four, tmp_path / "o", state, epochs=1, validation_folder="val")
    assert report["plan"]["images"] == 4  # no image held out of training
    assert [r["epoch"] for r in tsv(tmp_path / "o" / "loss" / "validation.tsv")] == [1]
    params = finetune.Params(**BASE, validation_folder="val")
    t = setup(params, torch.device("cpu"), 1, env_of(state), None)
    items = validation_set(params, [], t, four, env_of(state), torch.device("cpu"))
    assert sorted(i["caption"] for i in items) == ["sks, blue sky", "val"] and items[0]["latent"].shape == (4, 8, 8)
    # its content is part of the resume fingerprint: the rows a state keeps were measured on it
    run(four, tmp_path / "o", state, epochs=1, validation_folder="val", resume="auto")
    run(four, tmp_path / "o", state, epochs=1, validation_folder="val", resume="auto")
    assert "resumed from state-epoch-0001" in capsys.readouterr().out
    Image.new("RGB", (64, 64), (10, 200, 10)).save(folder / "red.png")
    run(four, tmp_path / "o", state, epochs=1, validation_folder="val", resume="auto")
    assert "resumed" not in capsys.readouterr().out


def test_an_over_trained_run_raises_the_validation_loss_and_the_recommendation_picks_an_earlier_epoch(tmp_path):
    """One Gaussian-pattern image trained at a high LR until it is memorised: the model then
    denoises everything towards it, so the loss on dissimilar held-out images (flat colours, a
    checkerboard) rises after a minimum while the train loss keeps falling."""
    gen = torch.Generator().manual_seed(0)
    images = {TRAIN_ID: torch.randn(4, H, H, generator=gen) * 5, "0000000000000001": flat()}
    images |= {"0000000000000002": -flat(), "0000000000000003": checker()}
    inputs = latents_project(tmp_path, images)
    opts = {"epochs": 120, "save_every_n_epochs": 10, "repeats": 8, "batch_size": 8, "lr": 5e-3, "weight_decay": 0}
    run(inputs, tmp_path / "o", tmp_path / "state", validation_split=3, validation_timesteps=10, **opts)
    rows = tsv(tmp_path / "o" / "loss" / "validation.tsv")
    best = min(rows, key=lambda r: r["validation_loss"])
    last = rows[-1]
    assert best["epoch"] < last["epoch"] and last["validation_loss"] > 1.1 * best["validation_loss"]  # it rises
    assert last["train_loss"] < best["train_loss"]  # while the train loss falls
    chosen = recommend([{"epoch": r["epoch"], "loss": r["train_loss"], **r} for r in rows], Limits())
    assert chosen["epoch"] == best["epoch"] < last["epoch"]
    assert any("lowest validation loss" in reason for reason in chosen["reasons"])


def test_the_recommendation_prefers_the_lowest_validation_loss_among_passing_epochs():
    rows = [
        {"epoch": 1, "loss": 0.5, "validation_loss": 0.40},
        {"epoch": 2, "loss": 0.3, "validation_loss": 0.30, "saturation_rise": 0.9},  # overfit: skipped
        {"epoch": 3, "loss": 0.4, "validation_loss": 0.35},
        {"epoch": 4, "loss": 0.2, "validation_loss": 0.35},
        {"epoch": 5, "loss": 0.1, "validation_loss": 0.50},
    ]
    best = recommend(rows, Limits())
    assert best["epoch"] == 3 and "the lowest validation loss of the epochs that passed (0.35)" in best["reasons"]
    without = recommend([{k: v for k, v in r.items() if k != "validation_loss"} for r in rows], Limits())
    assert without["epoch"] == 5 and "the latest epoch that passed" in without["reasons"][-1]  # the old rule
    rows[2]["validation_loss"] = 0.36
    assert recommend(rows, Limits())["epoch"] == 4  # lowest, not the train-loss minimum
