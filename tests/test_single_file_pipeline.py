"""The issue's Done-when: the tiny SD1.5 and SDXL pipelines written as original-layout single
files, the whole pipeline run from each file offline (ingest → evaluate, stage by stage as the
runner runs them), and the final LoRA loaded into a diffusers pipeline where it changes the image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from loraforge.pipeline.filedeps import file_fingerprints
from loraforge.models.loading import load_pipeline, resolve_model
from loraforge.pipeline.params import ModelParams
from loraforge.pipeline.runner import run_stage
from loraforge.pipeline.spec import load_pipeline as load_spec
from loraforge.models.weights import HashCache
from tests.helpers import make_project, set_params
from tests.test_single_file import write_single_file


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_whole_pipeline_from_a_single_file_offline(arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = make_project(tmp_path / "p", git=False)
    file, config, _ = write_single_file(arch, root / "base", torch.float16)  # a pruned fp16 file, as shared
    model = {"base": "base/" + file.name, "config": "base/" + config.name, "device": "cpu"}
    set_params(root, {"model": model, "finetune": {"epochs": 1}})
    spec = load_spec(root)
    for stage in spec.stages:
        run_stage(root, stage)
    # the file and its config folder are content inputs of every stage that loads the model
    raw = yaml.safe_load((root / "params.yaml").read_text())
    for name in ("ingest", "latents", "finetune", "evaluate"):
        found = file_fingerprints(root, spec.stages[name], raw, HashCache(tmp_path / "hashes.json"))
        assert {"model.base", "model.config"} <= found.keys(), name
    reports = {name: json.loads((root / "reports" / f"{name}.json").read_text()) for name in spec.stages}
    assert reports["latents"]["computed"] > 0 and reports["finetune"]["epochs_saved"] == ["epoch-0001"]
    assert reports["evaluate"]["items"] > 0
    lora = root / "models" / "lora.safetensors"
    assert lora.is_file()
    info = resolve_model(ModelParams(**model), root / ".loraforge")
    assert info.path.name.startswith(f"single-{arch}-") and info.arch == arch
    pipe = load_pipeline(info, torch.device("cpu"))

    def image() -> torch.Tensor:
        out = pipe("a photo", num_inference_steps=2, height=64, width=64, output_type="pt",
                   generator=torch.Generator().manual_seed(0))  # fmt: skip
        return out.images

    base = image()
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    assert (image() - base).abs().max() > 1e-4
