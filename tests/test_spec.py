"""pipeline.yaml, the generated dvc.yaml, params validation and the import-weight rules."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loraforge.pipeline.dvcgen import render, sync, top_level_plots
from loraforge.pipeline.params import ParamsError, load_all_params, load_stage_params
from loraforge.pipeline.spec import STAGE_ORDER, SpecError, load_pipeline

REPO = Path(__file__).resolve().parents[1]


def make_project(tmp_path: Path, params: dict | None = None) -> Path:
    shutil.copy(REPO / "pipeline.yaml", tmp_path / "pipeline.yaml")
    text = (REPO / "params.yaml").read_text() if params is None else yaml.safe_dump(params)
    (tmp_path / "params.yaml").write_text(text)
    return tmp_path


def test_pipeline_declares_the_eight_stages_in_order():
    pipeline = load_pipeline(REPO)
    assert tuple(pipeline.stages) == STAGE_ORDER
    assert pipeline.upstream("latents") == ["upscale"]
    assert pipeline.downstream("caption") == ["finetune", "extract", "resize", "evaluate"]


def test_committed_dvc_yaml_is_not_stale():
    result = subprocess.run(
        [sys.executable, "-m", "loraforge", "sync-dvc", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_sync_dvc_check_detects_a_stale_file(tmp_path):
    project = make_project(tmp_path)
    sync(project)
    assert sync(project, check=True)
    spec = yaml.safe_load((project / "pipeline.yaml").read_text())
    spec["stages"]["resize"]["params"].append("model")
    (project / "pipeline.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    assert not sync(project, check=True)
    result = subprocess.run(
        [sys.executable, "-m", "loraforge", "sync-dvc", "--check"], cwd=project, capture_output=True, text=True
    )
    assert result.returncode == 1 and "stale" in result.stderr


def test_dvc_stage_blocks_carry_code_inputs_params_and_report():
    doc = yaml.safe_load(render(REPO, load_pipeline(REPO), top_level_plots(REPO)))
    latents = doc["stages"]["latents"]
    assert latents["cmd"] == "loraforge stage latents"
    assert "stages/latents.py" in latents["deps"] and "data/upscaled" in latents["deps"]
    assert "data/captions" not in latents["deps"], "captions must not be an input of latents"
    assert latents["params"] == ["latents", "model"]
    assert {"reports/latents.json": {"cache": False}} in latents["metrics"]
    assert "${ingest.source}" in doc["stages"]["ingest"]["deps"]


def test_spec_errors_name_the_stage(tmp_path):
    project = make_project(tmp_path)
    spec = yaml.safe_load((project / "pipeline.yaml").read_text())
    spec["stages"]["upscale"]["outputs"]["images"] = "data/ingested"
    (project / "pipeline.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(SpecError, match="written by both `ingest` and `upscale`"):
        load_pipeline(project)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("ingest", "max_reject_ratio", 2, r"`ingest.max_reject_ratio` = 2: Input should be less than or equal to 1"),
        ("latents", "bucket_step", "big", r"`latents.bucket_step` = 'big': Input should be a valid integer"),
        ("resize", "method", "svd", r"`resize.method` = 'svd': Input should be 'fixed', 'sv_ratio'"),
        ("finetune", "lr", -1, r"`finetune.lr` = -1: Input should be greater than 0"),
        ("caption", "triger", "x", r"`caption.triger` is not a known key \(known: .*trigger"),
    ],
)
def test_bad_params_stop_with_the_key_value_and_what_is_allowed(tmp_path, section, key, value, message):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params[section][key] = value
    project = make_project(tmp_path, params)
    with pytest.raises(ParamsError, match=message):
        load_all_params(project, load_pipeline(project))


def test_unknown_section_and_misplaced_model_key(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["finetun"] = {"epochs": 1}
    params["latents"]["model"] = {"base": "x"}
    project = make_project(tmp_path, params)
    with pytest.raises(ParamsError) as err:
        load_all_params(project, load_pipeline(project))
    assert "`finetun` is not a known section" in str(err.value)
    assert "`latents.model`: set it in the top-level `model` section" in str(err.value)


def test_yaml_floats_without_a_dot_are_accepted(tmp_path):
    """PyYAML reads `1e-6` as a string; the schema must still take it as a float."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    project = make_project(tmp_path, params)
    text = (project / "params.yaml").read_text().replace("lr: 0.0003", "lr: 1e-6")
    (project / "params.yaml").write_text(text)
    assert load_stage_params(project, load_pipeline(project), "finetune").lr == pytest.approx(1e-6)


def test_bad_params_stop_the_stage_command_before_any_work(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ingest"]["max_reject_ratio"] = -0.5
    project = make_project(tmp_path, params)
    result = subprocess.run(
        [sys.executable, "-m", "loraforge", "stage", "ingest"], cwd=project, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "ingest.max_reject_ratio" in result.stderr and "-0.5" in result.stderr
    assert not (project / "data").exists() and not (project / "reports").exists()


def test_spec_params_and_flow_import_without_torch():
    code = (
        "import sys, pathlib\n"
        "import loraforge.pipeline.spec, loraforge.pipeline.params, loraforge.pipeline.dvcgen\n"
        "import loraforge.pipeline.runner, flows.pipeline\n"
        "from loraforge.pipeline.params import load_all_params\n"
        "from loraforge.pipeline.spec import load_pipeline\n"
        "load_all_params(pathlib.Path('.'), load_pipeline(pathlib.Path('.')))\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_stage_command_validates_the_whole_file(tmp_path):
    """What `dvc repro` runs must refuse a misspelt section too, not only `loraforge check`."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["injest"] = {"source": "data/demo"}
    params["finetune"]["lr"] = -1  # another stage's section: still refused by `stage upscale`
    project = make_project(tmp_path, params)
    result = subprocess.run(
        [sys.executable, "-m", "loraforge", "stage", "upscale"], cwd=project, capture_output=True, text=True
    )
    assert result.returncode == 2, result.stderr
    assert "`injest` is not a known section" in result.stderr and "`finetune.lr` = -1" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (project / "data").exists()


def test_check_fingerprints_the_files_params_name_and_writes_nothing_when_invalid(tmp_path):
    project = make_project(tmp_path)
    (project / "nets").mkdir()
    (project / "nets" / "4x.safetensors").write_bytes(b"weights v1")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["upscale"]["model_path"] = "nets/4x.safetensors"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    check = [sys.executable, "-m", "loraforge", "check", "--fingerprint"]
    subprocess.run(check, cwd=project, check=True, capture_output=True)
    record = project / "reports" / "inputs" / "upscale.json"
    first = record.read_bytes()
    # the demo's base is a shipped model folder: its content counts too
    assert list(yaml.safe_load(first)["files"]) == ["model.base", "upscale.model_path"]
    assert yaml.safe_load((project / "reports" / "inputs" / "resize.json").read_text()) == {"files": {}}
    subprocess.run(check, cwd=project, check=True, capture_output=True)
    assert record.read_bytes() == first  # nothing changed: same bytes, so DVC reruns nothing
    (project / "nets" / "4x.safetensors").write_bytes(b"weights v2")
    subprocess.run(check, cwd=project, check=True, capture_output=True)
    assert record.read_bytes() != first
    shutil.rmtree(project / "reports")
    params["finetune"]["lr"] = -1
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run(check, cwd=project, capture_output=True, text=True)
    assert result.returncode == 2 and "`finetune.lr` = -1" in result.stderr
    assert not (project / "reports").exists()


def test_every_stage_depends_on_the_check_guard():
    doc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    check = doc["stages"]["check"]
    assert list(doc["stages"])[0] == "check" and check["always_changed"] is True
    assert "params.yaml" in check["deps"] and "stages/finetune_params.py" in check["deps"]
    for name in STAGE_ORDER:
        assert f"reports/inputs/{name}.json" in doc["stages"][name]["deps"], name
        assert {f"reports/inputs/{name}.json": {"cache": False}} in check["outs"]
