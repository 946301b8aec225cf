"""The whole pipeline through real `dvc repro` in a temp git repo: outputs, skips, partial reruns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from loraforge.store.fingerprint import hash_tree
from tests.helpers import FAST_PARAMS, make_project, ran_stages, run, set_params

pytestmark = pytest.mark.slow
ALL = ["ingest", "upscale", "caption", "latents", "finetune", "extract", "resize", "evaluate"]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    # one image held out for the validation loss: finetune writes validation.tsv, evaluate reads it
    finetune = {**FAST_PARAMS["finetune"], "validation_split": 1}
    project = make_project(tmp_path_factory.mktemp("dvc") / "project", {"finetune": finetune})
    result = run(["dvc", "repro"], project)
    assert ran_stages(result.stdout) == ALL, result.stdout
    return project


def report(project: Path, stage: str) -> dict:
    return json.loads((project / "reports" / f"{stage}.json").read_text())


def test_first_repro_builds_a_kohya_lora_and_every_report(project):
    for stage in ALL:
        r = report(project, stage)
        assert r["stage"] == stage and {"items", "computed", "reused", "seconds"} <= set(r)
    with safe_open(str(project / "models" / "lora.safetensors"), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for k in keys)
    assert {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1] for k in keys if not k.endswith(".alpha")} == {
        "lora_down.weight",
        "lora_up.weight",
    }
    assert any(k.startswith("lora_te1_") for k in keys), "text encoder was trained and must be extracted"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_network_dim"] == "8"
    assert (project / "reports" / "eval" / "index.html").is_file()
    metrics = json.loads((project / "reports" / "eval" / "metrics.json").read_text())
    assert metrics["final"]["lora_effect"] > 0, "the LoRA must change the images at weight 1"
    validation = (project / "reports" / "finetune" / "validation.tsv").read_text().splitlines()
    assert validation[0].split("\t")[:2] == ["epoch", "validation_loss"] and len(validation) == 3  # 2 saved epochs
    assert all("validation_loss" in row for row in metrics["epochs"].values())
    best = json.loads((project / "reports" / "eval" / "best.json").read_text())
    assert any("lowest validation loss" in reason for reason in best["reasons"])
    assert "validation loss" in (project / "reports" / "eval" / "index.html").read_text()
    assert report(project, "upscale")["computed"] >= 1, "the demo has images below min_side"
    vae = report(project, "latents")["vae_check"]  # on in the demo's params.yaml
    assert vae["images"] == vae["computed"] == report(project, "latents")["items"]
    assert all((project / "reports" / w["sheet"]).is_file() for w in vae["worst"]) and len(vae["worst"]) == 4


def test_second_repro_runs_nothing(project):
    result = run(["dvc", "repro"], project)
    assert ran_stages(result.stdout) == []
    # `dvc status` always lists the guard stage (`always_changed: true`), and nothing else
    assert json.loads(run(["dvc", "status", "--json"], project).stdout) == {"check": ["always changed"]}


def test_a_bad_param_stops_before_any_output_is_touched_and_the_fix_reruns_nothing(project):
    """issue 10: a typo in params.yaml must not cost the finished run (DVC deletes a stage's
    outputs just before running it; the `check` guard stage fails first)."""
    outputs = ["models/checkpoints", "models/lora.safetensors", "reports/finetune", "data/latents"]
    before = {path: hash_tree(project / path) for path in outputs}
    lock, good = (project / "dvc.lock").read_text(), (project / "params.yaml").read_text()
    set_params(project, {"finetune": {"lr": -1}})
    result = run(["dvc", "repro"], project, check=False)
    assert result.returncode != 0
    assert ran_stages(result.stdout, guard=True) == ["check"]
    assert "`finetune.lr` = -1: Input should be greater than 0" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert {path: hash_tree(project / path) for path in outputs} == before
    assert (project / "dvc.lock").read_text() == lock

    (project / "params.yaml").write_text(good)
    result = run(["dvc", "repro"], project)
    assert ran_stages(result.stdout, guard=True) == ["check"]  # only the guard, whose mark is unchanged
    assert {path: hash_tree(project / path) for path in outputs} == before


def test_finished_checkpoints_survive_a_failed_rerun_and_come_back_without_retraining(project):
    """issue 10: a rerun that fails inside finetune (here: a missing `reg_images` folder, which
    only the stage itself can find) has had its outputs deleted by DVC; putting params.yaml back
    restores the finished run's checkpoints from DVC's run cache instead of training again."""
    before = hash_tree(project / "models" / "checkpoints")
    good = (project / "params.yaml").read_text()
    set_params(project, {"finetune": {"seed": 7, "reg_images": "no/such/folder"}})
    result = run(["dvc", "repro"], project, check=False)
    assert result.returncode != 0 and ran_stages(result.stdout) == ["finetune"]
    assert "`finetune.reg_images`" in result.stdout + result.stderr and "Traceback" not in result.stdout + result.stderr
    (project / "params.yaml").write_text(good)
    result = run(["dvc", "repro"], project)
    assert ran_stages(result.stdout) == []  # nothing trained again
    assert "Stage 'finetune' is cached - skipping run, checking out outputs" in result.stdout
    assert hash_tree(project / "models" / "checkpoints") == before


def test_changing_the_trigger_reruns_caption_and_downstream_only(project):
    set_params(project, {"caption": {"trigger": "zxqstyle"}})
    result = run(["dvc", "repro"], project)
    assert ran_stages(result.stdout) == ["caption", "finetune", "extract", "resize", "evaluate"]
    captions = (project / "data" / "captions" / "manifest.jsonl").read_text()
    assert "zxqstyle" in captions and "lfxstyle" not in captions


def test_adding_one_image_computes_exactly_one_latent(project):
    demo = project / "data" / "demo"
    source = next(p for p in sorted(demo.iterdir()) if p.suffix == ".png")
    from PIL import Image, ImageOps

    with Image.open(source) as img:
        ImageOps.mirror(img.convert("RGB")).save(demo / "a mirrored copy of a shape.png")
    result = run(["dvc", "repro"], project)
    assert "latents" in ran_stages(result.stdout)
    latents = report(project, "latents")
    assert latents["computed"] == 1 and latents["reused"] == latents["items"] - 1
    assert (latents["vae_check"]["computed"], latents["vae_check"]["reused"]) == (1, latents["items"] - 1)
    assert report(project, "ingest")["computed"] == 1


def test_a_wd14_captioner_runs_under_dvc_and_a_threshold_change_reruns_no_model(tmp_path):
    from tests.test_captioners import build_tagger

    project = make_project(tmp_path / "p")
    build_tagger(project / "taggers" / "tiny")
    set_params(project, {"caption": {"captioner": "wd14", "captioner_path": "taggers/tiny", "merge": "append"}})
    result = run(["dvc", "repro", "caption"], project)
    assert ran_stages(result.stdout) == ["ingest", "upscale", "caption"]
    first = report(project, "caption")
    assert first["generated"] == first["machine_captioned"] == first["items"] > 0
    assert any("+wd14" in source for source in first["by_source"])

    set_params(project, {"caption": {"wd14_general_threshold": 0.99}})
    result = run(["dvc", "repro", "caption"], project)
    assert ran_stages(result.stdout) == ["caption"]
    again = report(project, "caption")
    assert again["generated"] == 0 and again["reused"] == first["items"]  # tags re-selected from cached scores


def test_replacing_a_file_a_param_names_reruns_the_stage_that_uses_it(tmp_path):
    """issue 11: `upscale.model_path` is a real input: same path, new weights -> upscale reruns;
    the same bytes rewritten (new mtime) -> nothing reruns."""
    from tests.test_upscale import esrgan_file

    project = make_project(tmp_path / "p")
    (project / "upscalers").mkdir()
    weights = esrgan_file(project / "upscalers" / "4x.safetensors", "realesrgan")
    set_params(project, {"upscale": {"method": "model", "model_path": "upscalers/4x.safetensors", "tile": 64}})
    result = run(["dvc", "repro", "upscale"], project)
    assert ran_stages(result.stdout) == ["ingest", "upscale"]
    assert report(project, "upscale")["computed"] >= 1
    inputs = json.loads((project / "reports" / "inputs" / "upscale.json").read_text())
    assert list(inputs["files"]) == ["upscale.model_path"]

    weights.write_bytes(weights.read_bytes())  # same content, new mtime
    assert ran_stages(run(["dvc", "repro", "upscale"], project).stdout) == []
    esrgan_file(weights, "realesrgan", seed=1)  # same path, new weights
    result = run(["dvc", "repro", "upscale"], project)
    assert ran_stages(result.stdout) == ["upscale"]
    assert report(project, "upscale")["reused"] == 0
