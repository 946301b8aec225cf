"""The training plan: each formula against the guides' own worked numbers, the assembled plan,
and `loraforge plan` on a real project folder."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import yaml

from loraforge.planning import steps as p
from loraforge.planning import command as plan_cli
from loraforge.data.images import read_jsonl, write_jsonl

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- 000 guide


def test_steps_000() -> None:
    # "((10*35)/1)*9=3,150" and with batch size 4 "((10*35)/4)*9=787.5 (kohya itself will round this up)"
    assert p.steps(10, 35, 1, 9) == 3150
    assert p.steps(10, 35, 4, 9) == 787.5
    assert p.kohya_steps(10, 35, 4, 9) == 88 * 9 >= 787.5  # ceil(350 / 4) = 88 steps per epoch
    with pytest.raises(ValueError, match="`batch` must be > 0"):
        p.steps(10, 35, 0, 9)


def test_repeats_for_steps_000() -> None:
    # "3500/10=350", "350/9=38.88888888888889, I advice to always round up so it would be 39"
    assert p.repeats_for_steps(3500, 10, 9) == 39
    assert p.repeats_for_steps(3500, 10, 10) == 35  # an exact division is not rounded up
    assert p.repeats_for_steps(3500, 10, 9, batch=4) == 156  # 4 images per step need 4× the repeats


# ---------------------------------------------------------------- 002 guide


def test_spf_002() -> None:
    # "For 1e-5, this is 200 steps, if you use Text Encoder, then 100 ... for 1e-6 it is 2000"
    assert p.spf(1e-5, False) == pytest.approx(200) and p.spf(1e-5, True) == pytest.approx(100)
    assert p.spf(1e-6, False) == pytest.approx(2000)


def test_resolution_factor_002() -> None:
    # 768 on a 512 model: "SPF = 450 without TE, SPF = 225 s TE" = SPF_B × RC, RC = (768 / 512)²
    assert p.rc(768, 512) == 2.25
    assert p.spf(1e-5, False) * p.rc(768, 512) == pytest.approx(450)
    assert p.spf(1e-5, True) * p.rc(768, 512) == pytest.approx(225)
    # Dynamic resolution, 512 + 768: "(1000 + 2250) / 2 = 1625" (5 frames at SPF 200)
    assert p.dynamic_resolution_steps(5, 200, [512, 768], 512) == pytest.approx(1625)


def test_batch_size_formula_002() -> None:
    # "for SPF=200, SPF_A=134"; with TE, SPF_A = SPF
    assert p.spf_a(200, False) == 134 and p.spf_a(100, True) == 100
    assert p.ads(100, 5) == 400
    # "10 frames training with TE. With BS=1, max_train_steps=1000 ... BS=2, 778 ... BS=5, 626 ... BS=10, 601"
    assert [round(p.max_train_steps(10, 100, True, bs)) for bs in (1, 2, 5, 10)] == [1000, 778, 626, 601]
    # "100 frames. With BS=1, 10000 ... BS=2, 7142 ... BS=4, 5150 ... BS=5, 4651 ... BS=10, 3447"
    assert [round(p.max_train_steps(100, 100, True, bs)) for bs in (1, 2, 4, 5, 10)] == [10000, 7142, 5150, 4651, 3447]


def test_gradient_accumulation_formula_002() -> None:
    # max_train_steps = FN × SPF × √GA (the guide gives no worked number): GA 4 doubles the steps.
    assert p.max_train_steps(10, 200, False, bs=1, ga=4) == pytest.approx(4000)
    # With both: (FN × SPF + ADS) / √BS × √GA; BS = GA cancels the root, leaving FN × SPF + ADS.
    assert p.max_train_steps(10, 100, True, bs=4, ga=4) == pytest.approx(10 * 100 + 100 * 3)


def test_class_images_002() -> None:
    # "num_class_images = FN * 200; For Text Encoder: num_class_images = FN * 100"
    assert p.num_class_images(5, False) == 1000 and p.num_class_images(5, True) == 500


def test_strength_and_lr_002() -> None:
    # "LR=1e-6: medium = 10, hard = 20"
    assert p.frames_for_strength(1e-6, p.STRENGTH["medium"]) == pytest.approx(10)
    assert p.frames_for_strength(1e-6, p.STRENGTH["hard"]) == pytest.approx(20)
    # "FN = 125, F = 1, LR = 8e-8"
    assert p.lr_for_frames(125, 1) == pytest.approx(8e-8)
    assert plan_cli.parse_strength("very_soft") == 0.33 and plan_cli.parse_strength("1.5") == 1.5
    with pytest.raises(ValueError, match="`--strength` must be one of low_end"):
        plan_cli.parse_strength("strong")


def test_scheduler_multipliers_002() -> None:
    # "constant - 1, linear/cosine/cosine_with_restarts-2, polynomial - ~2"
    assert p.scheduler_steps(1000, "constant") == 1000
    assert [p.scheduler_steps(1000, s) for s in ("linear", "cosine", "cosine_with_restarts", "polynomial")] == [
        2000
    ] * 4
    with pytest.raises(ValueError, match="`lr_scheduler` must be one of"):
        p.scheduler_steps(1000, "step")


# ---------------------------------------------------------------- the plan


def test_build_plan_applies_every_formula() -> None:
    rows = [{"repeats": 2}] * 5 + [{"repeats": 1}] * 5
    plan = p.build_plan(
        rows,
        repeats=1,
        batch=2,
        ga=1,
        epochs=9,
        lr=1e-6,
        text_encoder=True,
        scheduler="cosine",
        resolution=768,
        base_resolution=512,
        target_steps=3500,
    )
    assert plan["images"] == 10 and plan["samples_per_epoch"] == 15
    assert plan["steps_000"]["steps"] == 15 / 2 * 9 and plan["steps_000"]["kohya_steps"] == 8 * 9
    assert plan["steps_000"]["repeats_for_target"] == p.repeats_for_steps(3500, 10, 9, 2)
    db = plan["dreambooth_002"]
    assert db["spf"] == pytest.approx(1000) and db["rc"] == 2.25 and db["spf_at_resolution"] == pytest.approx(2250)
    assert db["max_train_steps"] == round(p.max_train_steps(10, 2250, True, 2))
    assert db["max_train_steps_with_scheduler"] == round(2 * p.max_train_steps(10, 2250, True, 2))
    assert db["num_class_images"] == 1000 and db["lr_for_frames"] == pytest.approx(1e-6)
    rows_table = p.plan_table(plan)
    assert {"section": "dreambooth_002", "quantity": "rc", "value": 2.25} in rows_table
    assert "[steps_000]" in p.format_table(rows_table)
    with pytest.raises(ValueError, match="holds no images"):
        p.build_plan(
            [],
            repeats=1,
            batch=1,
            ga=1,
            epochs=1,
            lr=1e-6,
            text_encoder=False,
            scheduler="constant",
            resolution=512,
            base_resolution=512,
        )


def test_plan_command_writes_reports_plan_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("pipeline.yaml", "params.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["finetune"].update({"epochs": 9, "batch_size": 1, "lr": 1e-5, "train_text_encoder": False})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    parser = argparse.ArgumentParser()
    plan_cli.add_plan_command(parser.add_subparsers())

    args = parser.parse_args(["plan", "--root", str(tmp_path), "--target-steps", "3500"])
    assert args.func(args) == 2 and "run `loraforge stage ingest`" in capsys.readouterr().err

    write_jsonl(tmp_path / "data" / "ingested" / "manifest.jsonl", [{"id": str(i), "repeats": 1} for i in range(10)])
    assert args.func(args) == 0
    plan = json.loads((tmp_path / "reports" / "plan.json").read_text())
    assert plan["images"] == 10 and plan["steps_000"]["repeats_for_target"] == 39  # the 000 guide's 3500 / 10 / 9
    assert plan["dreambooth_002"]["spf"] == pytest.approx(200)  # LR 1e-5 without TE
    assert "repeats_for_target" in capsys.readouterr().out


def test_flipped_copies_count_as_examples_as_finetune_trains_them(tmp_path: Path) -> None:
    """`latents.flip` trains every image twice per repeat: the plan's samples and steps double,
    and equal the examples finetune builds from the same manifests."""
    from loraforge.pipeline.runner import run_stage
    from loraforge.training.data import load_examples
    from tests.helpers import FAST_MODEL, make_project

    project = make_project(tmp_path / "p", {"model": FAST_MODEL, "latents": {"flip": True}}, git=False)
    for stage in ("ingest", "upscale", "caption", "latents"):
        run_stage(project, stage)
    plan = plan_cli.plan_for_project(project)
    rows = read_jsonl(project / "data" / "ingested" / "manifest.jsonl")
    assert plan["samples_per_epoch"] == 2 * sum(int(r.get("repeats", 1)) for r in rows)
    examples = load_examples(project / "data" / "latents", project / "data" / "captions", repeats=1)
    assert plan["samples_per_epoch"] == len(examples)
