"""The embedded tiny models, the shipped tokenizer, and model resolution, hashing and loading."""

from __future__ import annotations

import filecmp
import importlib.util
import json
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest

import loraforge.models.weights as weights
from loraforge.models.hub import hub_patterns
from loraforge.models.loading import (
    ModelInfo,
    component_hash,
    load_noise_scheduler,
    load_pipeline,
    load_text_encoders,
    load_unet,
    resolve_device,
    resolve_model,
    weight_files,
)
from loraforge.pipeline.params import ModelParams
from loraforge.models.tiny import TOKENIZER_DIR, load_tiny_tokenizer, save_builtin

COMMON_WORDS = (
    "a photo of the woman man riding bicycle moon red blue green circle square painting style "
    "detailed background portrait landscape in on with and sky tree dog cat"
).split()


@pytest.fixture(scope="module")
def sd15(state_dir: Path) -> ModelInfo:
    return resolve_model(ModelParams(base="builtin:tiny-sd15"), state_dir)


@pytest.fixture(scope="module")
def sdxl(state_dir: Path) -> ModelInfo:
    return resolve_model(ModelParams(base="builtin:tiny-sdxl"), state_dir)


@pytest.fixture()
def sd15_copy(sd15: ModelInfo, tmp_path: Path) -> Path:
    """A private copy of the tiny SD1.5 folder, free to modify."""
    return Path(shutil.copytree(sd15.path, tmp_path / "sd15"))


# --- tokenizer -------------------------------------------------------------------------------


def test_tokenizer_loads_and_round_trips() -> None:
    from transformers import AutoTokenizer, CLIPTokenizer

    tok = load_tiny_tokenizer()
    assert isinstance(AutoTokenizer.from_pretrained(TOKENIZER_DIR), CLIPTokenizer)
    assert tok.model_max_length == 77
    assert len(tok) == len(json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8")))  # 1328 tokens
    # CLIP's layout: the two special tokens are the last ids, pad = EOS.
    assert (tok.bos_token_id, tok.eos_token_id) == (len(tok) - 2, len(tok) - 1)
    assert tok.pad_token_id == tok.eos_token_id

    caption = "A photo of a woman riding a bicycle under the moon"
    ids = tok(caption).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.eos_token_id not in ids[1:-1]  # byte-level: nothing falls back to unk (= EOS)
    assert tok.decode(ids, skip_special_tokens=True) == caption.lower()

    padded = tok("lfxstyle, red circle", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77


def test_common_words_are_one_or_two_tokens() -> None:
    tok = load_tiny_tokenizer()
    lengths = {w: len(tok(w, add_special_tokens=False).input_ids) for w in COMMON_WORDS}
    assert max(lengths.values()) <= 2, lengths


def test_tokenizer_script_reproduces_committed_files(tmp_path: Path, repo_root: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "make_tiny_tokenizer", repo_root / "scripts" / "make_tiny_tokenizer.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.write(tmp_path, script.VOCAB_SIZE)
    names = sorted(p.name for p in TOKENIZER_DIR.iterdir())
    match, mismatch, errors = filecmp.cmpfiles(TOKENIZER_DIR, tmp_path, names, shallow=False)
    assert (mismatch, errors) == ([], []), "rerun scripts/make_tiny_tokenizer.py and commit its output"


# --- tiny models -----------------------------------------------------------------------------


def test_modules_import_without_torch() -> None:
    code = (
        "import sys, loraforge.models.loading, loraforge.models.tiny\n"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_save_builtin_is_deterministic(tmp_path: Path) -> None:
    save_builtin("tiny-sd15", tmp_path / "a")
    save_builtin("tiny-sd15", tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.safetensors"))
    assert len(files) == 3  # unet, vae, text_encoder
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    total = sum((tmp_path / "a" / rel).stat().st_size for rel in files)
    assert total < 5_000_000


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_builtin_pipeline_generates(name: str, request: pytest.FixtureRequest) -> None:
    import numpy as np
    import torch

    info: ModelInfo = request.getfixturevalue(name)
    pipe = load_pipeline(info, resolve_device("cpu"))
    expected = "StableDiffusionXLPipeline" if name == "sdxl" else "StableDiffusionPipeline"
    assert type(pipe).__name__ == expected

    def generate(seed: int) -> np.ndarray:
        generator = torch.Generator().manual_seed(seed)
        out = pipe("a red circle", num_inference_steps=2, height=64, width=64, generator=generator, output_type="np")
        return out.images

    images = generate(0)
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()
    np.testing.assert_array_equal(images, generate(0))
    assert not np.array_equal(images, generate(1))


def test_builtin_layouts(sd15: ModelInfo, sdxl: ModelInfo) -> None:
    import torch

    unet15, unetxl = load_unet(sd15, torch.device("cpu")), load_unet(sdxl, torch.device("cpu"))
    # SD1.5 projects in/out of attention with 1×1 convs, SDXL with linears, as the real models do.
    assert isinstance(unet15.down_blocks[0].attentions[0].proj_in, torch.nn.Conv2d)
    assert isinstance(unetxl.down_blocks[1].attentions[0].proj_in, torch.nn.Linear)
    assert unetxl.config.cross_attention_dim == 64  # 32 + 32: both encoders' hidden states
    pairs = load_text_encoders(sdxl, torch.device("cpu"))
    assert [type(e).__name__ for _, e in pairs] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
    assert [type(e).__name__ for _, e in load_text_encoders(sd15, torch.device("cpu"))] == ["CLIPTextModel"]
    scheduler = load_noise_scheduler(sdxl)
    assert type(scheduler).__name__ == "DDPMScheduler"
    assert (scheduler.config.num_train_timesteps, scheduler.config.prediction_type) == (1000, "epsilon")


# --- resolving model.base --------------------------------------------------------------------


def test_resolve_builtin_is_idempotent(state_dir: Path, sd15: ModelInfo, sdxl: ModelInfo) -> None:
    assert (sd15.arch, sdxl.arch) == ("sd15", "sdxl")
    for info in (sd15, sdxl):
        assert (info.native_resolution, info.vae_scale_factor) == (128, 8)
    assert (sd15.scaling_factor, sdxl.scaling_factor) == (0.18215, 0.13025)
    mtime = (sdxl.path / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    again = resolve_model(ModelParams(base="builtin:tiny-sdxl"), state_dir)
    assert again == sdxl
    assert (sdxl.path / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == mtime
    assert not [p for p in (state_dir / "models").iterdir() if p.name.startswith(".tmp")]


def test_unknown_builtin_lists_builtins(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"`model.base`.*builtin:tiny-sd15.*builtin:tiny-sdxl"):
        resolve_model(ModelParams(base="builtin:tiny-sd3"), tmp_path)


def test_a_trained_builtin_is_read_from_its_shipped_folder(
    sd15: ModelInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import loraforge.models.hub as hub
    from loraforge.pipeline import filedeps

    monkeypatch.setattr(hub, "SHIPPED_MODELS", tmp_path / "shipped")
    monkeypatch.setattr(filedeps, "SHIPPED_MODELS", tmp_path / "shipped")
    with pytest.raises(ValueError, match=r"`model.base` = `builtin:shapes-sd15`: .*shipped/shapes-sd15 is missing.*"):
        resolve_model(ModelParams(base="builtin:shapes-sd15"), tmp_path / "state")
    assert filedeps.existing_path(tmp_path, "builtin:shapes-sd15") is None  # counts by its value, like a hub id
    shutil.copytree(sd15.path, tmp_path / "shipped" / "shapes-sd15")  # stands in for the exported weights
    info = resolve_model(ModelParams(base="builtin:shapes-sd15"), tmp_path / "state")
    assert (info.path, info.arch) == (tmp_path / "shipped" / "shapes-sd15", "sd15")
    assert not (tmp_path / "state" / "models").exists()  # read in place, never copied
    assert filedeps.existing_path(tmp_path, "builtin:shapes-sd15") == tmp_path / "shipped" / "shapes-sd15"


def test_local_folder(sd15_copy: Path, tmp_path: Path) -> None:
    info = resolve_model(ModelParams(base=str(sd15_copy)), tmp_path / "state")
    assert (info.path, info.arch, info.native_resolution, info.source) == (sd15_copy, "sd15", 128, str(sd15_copy))
    relative = resolve_model(ModelParams(base="sd15"), tmp_path / "state", root=tmp_path)
    assert relative.path == sd15_copy


def test_bad_local_paths_name_model_base(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"`model.base`.*no such folder"):
        resolve_model(ModelParams(base=str(tmp_path / "missing")), tmp_path)
    with pytest.raises(ValueError, match=r"`model.base`.*no such folder"):
        resolve_model(ModelParams(base="missing-model"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"`model.base`.*model_index.json"):
        resolve_model(ModelParams(base=str(tmp_path / "empty")), tmp_path)


def test_hub_id_offline_fails_with_model_base(tmp_path: Path) -> None:
    # HF_HUB_OFFLINE=1 (conftest): nothing is cached, so this must fail without touching the network.
    with pytest.raises(ValueError, match=r"`model.base` = 'someone/some-model'.*Hugging Face hub"):
        resolve_model(ModelParams(base="someone/some-model"), tmp_path)


def test_hub_patterns_skip_variants_and_other_formats() -> None:
    patterns = hub_patterns(("unet", "tokenizer"), pickle=False)
    wanted = [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "tokenizer/merges.txt",
    ]
    unwanted = [
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "unet/model.onnx",
        "vae/config.json",
        "safety_checker/model.safetensors",
    ]
    assert all(any(fnmatch(f, p) for p in patterns) for f in wanted)
    assert not any(fnmatch(f, p) for f in unwanted for p in patterns)


# --- pickle policy ---------------------------------------------------------------------------


def _pickle_unet(folder: Path) -> None:
    """Replace the UNet's safetensors with the same weights as a torch pickle."""
    import torch
    from safetensors.torch import load_file

    unet = folder / "unet"
    torch.save(load_file(unet / "diffusion_pytorch_model.safetensors"), unet / "diffusion_pytorch_model.bin")
    (unet / "diffusion_pytorch_model.safetensors").unlink()


def test_pickle_weights_refused_unless_allowed(sd15_copy: Path, tmp_path: Path) -> None:
    import torch

    _pickle_unet(sd15_copy)
    with pytest.raises(ValueError, match=r"pickle.*`model.allow_pickle: true`"):
        resolve_model(ModelParams(base=str(sd15_copy)), tmp_path)
    info = resolve_model(ModelParams(base=str(sd15_copy), allow_pickle=True), tmp_path)
    assert [p.name for p in weight_files(info, "unet")] == ["diffusion_pytorch_model.bin"]
    assert load_unet(info, torch.device("cpu")).config.sample_size == 16


def test_weight_files_follow_shard_index_and_skip_variants(sd15_copy: Path, tmp_path: Path) -> None:
    unet = sd15_copy / "unet"
    shutil.copy(unet / "diffusion_pytorch_model.safetensors", unet / "diffusion_pytorch_model.fp16.safetensors")
    info = resolve_model(ModelParams(base=str(sd15_copy)), tmp_path)
    assert [p.name for p in weight_files(info, "unet")] == ["diffusion_pytorch_model.safetensors"]

    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": {"conv_in.weight": "diffusion_pytorch_model-00001-of-00001.safetensors"}}
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert [p.name for p in weight_files(info, "unet")] == ["diffusion_pytorch_model-00001-of-00001.safetensors"]


# --- hashes ----------------------------------------------------------------------------------


def test_component_hash_is_cached_and_tracks_weights(
    sd15_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    info = resolve_model(ModelParams(base=str(sd15_copy)), state)
    reads: list[Path] = []
    real_hash_file = weights.hash_file
    monkeypatch.setattr(weights, "hash_file", lambda p: reads.append(p) or real_hash_file(p))

    first = component_hash(info, "vae", state)
    assert sorted(p.name for p in reads) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert (state / "hashcache.json").is_file()
    reads.clear()
    assert component_hash(info, "vae", state) == first
    assert reads == []  # served from state/hashcache.json
    assert component_hash(info, "unet", state) != first

    vae_weights = sd15_copy / "vae" / "diffusion_pytorch_model.safetensors"
    shutil.copy(sd15_copy / "unet" / "diffusion_pytorch_model.safetensors", vae_weights)
    reads.clear()
    assert component_hash(info, "vae", state) != first
    assert [p.name for p in reads] == ["diffusion_pytorch_model.safetensors"]


def test_builtin_hashes_are_stable_across_state_dirs(sd15: ModelInfo, state_dir: Path, tmp_path: Path) -> None:
    # A model's identity is its content: a fresh materialisation hashes the same.
    fresh = resolve_model(ModelParams(base="builtin:tiny-sd15"), tmp_path)
    for component in ("unet", "vae", "text_encoder", "tokenizer"):
        assert component_hash(fresh, component, tmp_path) == component_hash(sd15, component, state_dir)


# --- devices ---------------------------------------------------------------------------------


def test_resolve_device() -> None:
    import torch

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"`model.device` is `cuda`"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match=r"`model.device`"):
        resolve_device("tpu")
