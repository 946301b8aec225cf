"""finetune → extract → resize → evaluate through the stage runner on tiny SD1.5 (the DVC
end-to-end test covers SDXL): real training, real checkpoints, real diffusers generation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraforge.data.images import read_jsonl
from loraforge.lora.format import load_lora
from loraforge.pipeline.runner import run_stage
from loraforge.training import data as training_data
from loraforge.training import settings
from tests.helpers import make_project, set_params

PREP = ["ingest", "upscale", "caption", "latents"]


@pytest.fixture(scope="module")
def sd15(tmp_path_factory) -> Path:
    """A project on tiny SD1.5 with data prepared and finetune/extract/resize/evaluate run once."""
    project = make_project(tmp_path_factory.mktemp("sd15") / "p", git=False)
    set_params(
        project,
        {
            "model": {"base": "builtin:tiny-sd15"},
            "finetune": {"epochs": 2, "save_every_n_epochs": 1, "save_dtype": "float32"},
            "extract": {"save_dtype": "float32"},
            "resize": {"save_dtype": "float32"},
        },
    )
    for stage in [*PREP, "finetune", "extract", "resize", "evaluate"]:
        run_stage(project, stage)
    return project


def report(project: Path, stage: str) -> dict:
    return json.loads((project / "reports" / f"{stage}.json").read_text())


def epoch_means(folder: Path) -> dict[int, float]:
    """Mean of each epoch's step losses in `steps.tsv` (recomputed from the rows, as printed)."""
    head, *rows = (folder / "steps.tsv").read_text().splitlines()
    cols = head.split("\t")
    by_epoch: dict[int, list[float]] = {}
    for row in rows:
        values = dict(zip(cols, row.split("\t")))
        by_epoch.setdefault(int(values["epoch"]), []).append(float(values["loss"]))
    return {epoch: sum(losses) / len(losses) for epoch, losses in by_epoch.items()}


# ---------------------------------------------------------------- pure helpers


def examples(buckets: list[tuple[int, int]], repeats: int = 1) -> list[dict]:
    return [{"id": str(i), "bucket": list(b), "repeats": repeats} for i, b in enumerate(buckets)]


def test_batches_never_mix_buckets_and_depend_only_on_seed_and_epoch():
    data = examples([(64, 64)] * 5 + [(96, 32)] * 3)
    batches = training_data.epoch_batches(data, 2, seed=1, epoch=1)
    assert all(len({tuple(e["bucket"]) for e in b}) == 1 for b in batches)
    assert sorted(e["id"] for b in batches for e in b) == sorted(e["id"] for e in data)
    assert len(batches) == 3 + 2  # ceil(5/2) + ceil(3/2)
    assert batches == training_data.epoch_batches(data, 2, seed=1, epoch=1)
    assert batches != training_data.epoch_batches(data, 2, seed=1, epoch=2)


def test_plan_reports_the_guide_formula_and_the_exact_count():
    data = examples([(64, 64)] * 4 + [(96, 32)] * 1) * 2  # 5 images × 2 repeats
    plan = training_data.plan(data, batch_size=2, epochs=10, gradient_accumulation=2, processes=1, seed=42)
    assert plan["formula_steps"] == 5 * 10  # images × repeats / batch × epochs
    assert plan["steps_per_epoch"] == 4 + 1 and plan["steps"] == 50
    assert plan["optimizer_steps"] == 3 * 10
    assert plan["images"] == 5


def test_fp16_on_cpu_runs_with_a_note_that_bf16_is_faster(capsys):
    settings.check_precision("fp16", torch.device("cpu"))
    assert "slower than `bf16`" in capsys.readouterr().out
    settings.check_precision("bf16", torch.device("cpu"))
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------- finetune


def test_finetune_saves_a_checkpoint_per_epoch_that_moved_from_the_base(sd15):
    from loraforge.models.loading import weight_files, resolve_model
    from loraforge.pipeline.params import ModelParams

    ckpts = project_ckpts = sorted((sd15 / "models" / "checkpoints").iterdir())
    assert [p.name for p in project_ckpts] == ["epoch-0001", "epoch-0002"]
    info = resolve_model(ModelParams(base="builtin:tiny-sd15"), sd15 / ".loraforge")
    base = load_file(str(weight_files(info, "unet")[0]))
    tuned = load_file(str(ckpts[-1] / "unet.safetensors"))
    assert base.keys() == tuned.keys()
    assert max((tuned[k] - base[k]).abs().max().item() for k in base) > 1e-4
    assert (ckpts[-1] / "text_encoder.safetensors").is_file() and not (
        ckpts[-1] / "text_encoder_2.safetensors"
    ).exists()
    steps = (sd15 / "reports" / "finetune" / "steps.tsv").read_text().splitlines()
    r = report(sd15, "finetune")
    assert steps[0].split("\t") == ["step", "epoch", "loss", "lr"] and len(steps) - 1 == r["plan"]["steps"]
    means = epoch_means(sd15 / "reports" / "finetune")
    assert (r["loss_first_epoch"], r["loss_last_epoch"]) == pytest.approx((means[1], means[2]), rel=1e-5)
    epochs = (sd15 / "reports" / "finetune" / "epochs.tsv").read_text().splitlines()
    assert epochs == ["epoch\tloss", f"1\t{r['loss_first_epoch']:.6g}", f"2\t{r['loss_last_epoch']:.6g}"]


def test_finetune_is_reproducible_with_the_same_seed(sd15, tmp_path):
    first = load_file(str(sd15 / "models" / "checkpoints" / "epoch-0001" / "unet.safetensors"))
    set_params(sd15, {"finetune": {"epochs": 1}})
    try:
        run_stage(sd15, "finetune")
        again = load_file(str(sd15 / "models" / "checkpoints" / "epoch-0001" / "unet.safetensors"))
    finally:
        set_params(sd15, {"finetune": {"epochs": 2}})
        run_stage(sd15, "finetune")
    assert all(torch.equal(first[k], again[k]) for k in first)


# ---------------------------------------------------------------- extract, resize, evaluate


def test_extract_writes_a_kohya_lora_per_epoch_with_the_text_encoder(sd15):
    files = sorted((sd15 / "models" / "extracted").glob("*.safetensors"))
    assert [f.name for f in files] == ["lora-epoch-0001.safetensors", "lora-epoch-0002.safetensors"]
    tensors, meta = load_lora(files[-1])
    assert any(k.startswith("lora_te_") for k in tensors) and any(k.startswith("lora_unet_") for k in tensors)
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_epoch"] == "2"
    assert json.loads(meta["ss_text_encoders"]) == {"text_encoder": True}


def test_min_diff_above_the_change_leaves_the_text_encoder_out_and_says_so(sd15, capsys):
    set_params(sd15, {"extract": {"min_diff": 10.0}})
    try:
        run_stage(sd15, "extract")
        out = capsys.readouterr().out
        tensors, meta = load_lora(sd15 / "models" / "extracted" / "lora-epoch-0002.safetensors")
        assert "text_encoder left out" in out and "extract.min_diff" in out
        assert not any(k.startswith("lora_te_") for k in tensors)
        assert json.loads(meta["ss_text_encoders"]) == {"text_encoder": False}
    finally:
        set_params(sd15, {"extract": {"min_diff": 1e-6}})
        run_stage(sd15, "extract")


def test_resize_caps_ranks_and_ships_the_last_epoch(sd15):
    final = sd15 / "models" / "lora.safetensors"
    assert final.read_bytes() == (sd15 / "models" / "loras" / "lora-epoch-0002.safetensors").read_bytes()
    tensors, meta = load_lora(final)
    ranks = {t.shape[0] for k, t in tensors.items() if k.endswith(".lora_down.weight")}
    assert max(ranks) <= 8 and meta["ss_network_dim"] == "8"
    # the share of each layer's update ‖(alpha/rank)·up@down‖ the resized file keeps, recomputed from both files
    before, _ = load_lora(sd15 / "models" / "extracted" / "lora-epoch-0002.safetensors")

    def update_norm(t: dict, layer: str) -> float:
        up, down = t[f"{layer}.lora_up.weight"].flatten(1).double(), t[f"{layer}.lora_down.weight"].flatten(1).double()
        return (float(t[f"{layer}.alpha"]) / down.shape[0] * up @ down).norm().item()

    layers = [k.removesuffix(".lora_down.weight") for k in tensors if k.endswith(".lora_down.weight")]
    kept = [update_norm(tensors, k) / update_norm(before, k) for k in layers]
    r = report(sd15, "resize")
    assert r["files"]["lora-epoch-0002.safetensors"]["layers"] == len(layers)
    assert r["files"]["lora-epoch-0002.safetensors"]["mean_fro_retained"] == pytest.approx(
        sum(kept) / len(kept), rel=1e-4
    )


def test_evaluate_renders_every_epoch_and_the_lora_changes_only_weight_one(sd15):
    import yaml

    r = report(sd15, "evaluate")
    assert r["epochs"] == ["epoch-0001", "epoch-0002"]
    p = yaml.safe_load((sd15 / "params.yaml").read_text())["evaluate"]
    fixed = len(p["prompts"]) * len(p["seeds"])
    captions = min(p.get("caption_prompts", 4), len(read_jsonl(sd15 / "data" / "captions" / "manifest.jsonl")))
    others = p.get("random_prompts", 4) + captions  # random prompts and training captions, at weights 0 and 1
    per_epoch = fixed * len(p["weights"]) + 2 * others
    shared = fixed * (0.0 in p["weights"]) + others  # the weight-0 (base) images are shared by both epochs
    assert r["items"] == 2 * per_epoch and r["reused"] == shared and r["computed"] == 2 * per_epoch - shared
    metrics = json.loads((sd15 / "reports" / "eval" / "metrics.json").read_text())
    assert all(m["lora_effect"] > 0 for m in metrics["epochs"].values())
    page = (sd15 / "reports" / "eval" / "index.html").read_text()
    assert 'src="grids/epoch-0001.png"' in page and 'src="grids/epoch-0002.png"' in page
    from PIL import Image

    with Image.open(sd15 / "reports" / "eval" / "grids" / "epoch-0002.png") as grid:
        assert grid.size == (64 * len(p["weights"]), 64 * fixed)  # columns: weights; rows: prompts × seeds


def test_evaluate_rerun_reuses_every_image(sd15):
    run_stage(sd15, "evaluate")
    r = report(sd15, "evaluate")
    assert r["computed"] == 0 and r["reused"] == r["items"]


def test_extracted_lora_loads_in_diffusers_and_matters_only_at_weight_one(sd15):
    from loraforge.models.loading import load_pipeline, resolve_model
    from loraforge.pipeline.params import ModelParams

    info = resolve_model(ModelParams(base="builtin:tiny-sd15"), sd15 / ".loraforge")
    pipe = load_pipeline(info, torch.device("cpu"))

    def image(**kw):
        return torch.from_numpy(
            pipe(
                "lfxstyle",
                num_inference_steps=2,
                width=64,
                height=64,
                output_type="np",
                generator=torch.Generator().manual_seed(0),
                **kw,
            ).images
        )

    base = image()
    pipe.load_lora_weights(str(sd15 / "models"), weight_name="lora.safetensors", adapter_name="shipped")
    pipe.set_adapters(["shipped"], adapter_weights=[0.0])
    assert torch.equal(image(), base)
    pipe.set_adapters(["shipped"], adapter_weights=[1.0])
    assert (image() - base).abs().max() > 1e-3


def test_gradient_checkpointing_and_bf16_autocast_train_on_cpu(sd15):
    work = sd15.parent / "bf16"
    shutil.copytree(sd15, work, ignore=shutil.ignore_patterns("models", "reports"))
    set_params(work, {"finetune": {"epochs": 1, "gradient_checkpointing": True, "mixed_precision": "bf16"}})
    run_stage(work, "finetune")
    r = report(work, "finetune")
    assert r["mixed_precision"] == "bf16"
    assert r["loss_last_epoch"] == pytest.approx(epoch_means(work / "reports" / "finetune")[1], rel=1e-5)
    state = load_file(str(work / "models" / "checkpoints" / "epoch-0001" / "unet.safetensors"))
    assert all(torch.isfinite(t).all() for t in state.values())


def test_conv_dim_adds_the_resnet_convolutions(sd15):
    set_params(sd15, {"extract": {"conv_dim": 4}})
    try:
        run_stage(sd15, "extract")
        tensors, _ = load_lora(sd15 / "models" / "extracted" / "lora-epoch-0002.safetensors")
        conv = [k for k in tensors if "_resnets_" in k and k.endswith("_conv1.lora_down.weight")]
        assert conv and all(tensors[k].shape[0] == 4 and tensors[k].dim() == 4 for k in conv)
    finally:
        set_params(sd15, {"extract": {"conv_dim": 0}})
        run_stage(sd15, "extract")


def _copy(sd15: Path, name: str) -> Path:
    work = sd15.parent / name
    shutil.copytree(sd15, work, ignore=shutil.ignore_patterns("models", "reports"))
    return work


def test_extract_from_ema_uses_the_ema_weights_and_refuses_without_them(sd15):
    work = _copy(sd15, "ema")
    set_params(work, {"finetune": {"epochs": 1, "ema_decay": 0.9}})
    for stage in ("finetune", "extract"):
        run_stage(work, stage)
    raw, meta = load_lora(work / "models" / "extracted" / "lora-epoch-0001.safetensors")
    assert json.loads(meta["ss_training_params"])["ema_decay"] == 0.9 and meta["ss_dataset_hash"] not in ("", "unknown")
    set_params(work, {"extract": {"from_ema": True}})
    run_stage(work, "extract")
    ema, _ = load_lora(work / "models" / "extracted" / "lora-epoch-0001.safetensors")
    key = next(k for k in raw if k.endswith(".lora_up.weight"))
    assert raw.keys() == ema.keys() and not torch.equal(raw[key], ema[key])
    set_params(work, {"finetune": {"ema_decay": 0.0}})
    run_stage(work, "finetune")
    with pytest.raises(ValueError, match="`extract.from_ema` is set but .* has no EMA weights"):
        run_stage(work, "extract")


def test_direct_lora_checkpoints_pass_through_extract_and_resize(sd15):
    work = _copy(sd15, "direct")
    set_params(work, {"finetune": {"epochs": 1, "mode": "lora", "network_dim": 8, "network_alpha": 4, "lr": 1e-3}})
    for stage in ("finetune", "extract", "resize"):
        run_stage(work, stage)
    trained = (work / "models" / "checkpoints" / "epoch-0001" / "lora.safetensors").read_bytes()
    assert (work / "models" / "extracted" / "lora-epoch-0001.safetensors").read_bytes() == trained
    assert report(work, "extract")["epochs"]["epoch-0001"]["passed_through"] is True
    tensors, meta = load_lora(work / "models" / "lora.safetensors")
    assert meta["ss_network_dim"] == "8" and any(k.startswith("lora_unet_") for k in tensors)
